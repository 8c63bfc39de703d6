"""Every config file loads, and the paper configs hold the SPEC's values."""

import importlib.util
from pathlib import Path

import pytest

from data_pipelines.demo_corpus import corpus
from ssps_jax import config as config_lib

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_there_are_configs():
    assert {p.stem for p in CONFIGS} >= {"simclr_ecapa", "simclr_resnet34", "demo_simclr"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates_once_its_data_exists(path, demo_dir):
    config = _load(path)
    config.data.train_csv = str(demo_dir / corpus.TRAIN_CSV)
    config.data.base_dir = str(demo_dir)
    config.eval.trials = (str(demo_dir / corpus.TRIALS),)
    config_lib.validate(config, device_count=8)


@pytest.mark.parametrize("name, encoder", [("simclr_ecapa", "ecapa_tdnn"), ("simclr_resnet34", "resnet34")])
def test_paper_simclr_configs(name, encoder):
    config = _load(next(p for p in CONFIGS if p.stem == name))
    assert config.model.encoder == encoder
    assert (config.simclr.temperature, config.simclr.projector) == (0.03, False)
    assert (config.optim.optimizer, config.optim.learning_rate, config.optim.weight_decay) == ("adam", 1e-3, 0.0)
    assert (config.optim.schedule, config.optim.decay_rate, config.optim.decay_every_epochs) == ("step", 0.95, 5)
    assert (config.train.global_batch_size, config.train.epochs) == (256, 100)
    assert config.data.crops.frame_seconds == 2.0
    assert config.model.mel.n_mels == 40
    if encoder == "ecapa_tdnn":
        assert tuple(config.model.ecapa_tdnn.channels) == (1024, 1024, 1024, 1024, 3072)


@pytest.mark.parametrize(
    "name, sampling, clusters, neighbours, queue, epochs",
    [
        ("simclr_ssps_ecapa", "kmeans-repr", 25000, 1, 25000, 120),
        ("simclr_ssps_ecapa_6k", "kmeans-repr", 6000, 0, 6000, 110),
    ],
)
def test_paper_ssps_configs(name, sampling, clusters, neighbours, queue, epochs):
    config = _load(next(p for p in CONFIGS if p.stem == name))
    s = config.ssps
    assert s.enabled and (s.sampling, s.start_epoch, s.kmeans_iterations) == (sampling, 100, 10)
    assert (s.kmeans_clusters, s.inter_sampling_size, s.pos_queue_size) == (clusters, neighbours, queue)
    assert config.train.epochs == epochs
    assert tuple(config.model.ecapa_tdnn.channels) == (1024, 1024, 1024, 1024, 3072)
