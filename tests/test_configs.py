"""Every config file loads, and the paper configs hold the paper's values (docs/method.md §5-§8)."""

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


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_files_have_no_setting_that_cannot_take_effect(path):
    assert config_lib.ineffective_settings(_load(path)) == []


def test_settings_that_cannot_take_effect_are_named():
    demo = config_lib.use_demo_ssps(config_lib.use_demo(config_lib.base_config()))
    demo.train.epochs = 1
    demo.train.stop_at_epoch = 0
    demo.optim.lr_scale = 0.5
    demo.optim.lr_scale_from_epoch = 1
    demo.eval.trials = ()
    demo.eval.at_start = True
    demo.dino.student_temperature = 0.2
    demo.optim.schedule = "warmup_cosine"
    demo.optim.warmup_epochs = 1
    lines = config_lib.ineffective_settings(demo)
    assert [line.split(":")[0] for line in lines] == [
        "config.ssps.start_epoch",
        "config.optim.lr_scale",
        "config.optim.warmup_epochs",
        "config.eval.at_start",
        "config.dino.student_temperature",
    ]
    assert lines[0] == (
        "config.ssps.start_epoch: SSPS would sample from epoch 13, after the last epoch (train.epochs = 1): "
        "this run trains without it"
    )
    # A run stopped before SSPS starts is meant to be continued with it (the demo's first stage): no warning.
    demo = config_lib.use_demo_ssps(config_lib.use_demo(config_lib.base_config()))
    demo.train.stop_at_epoch = demo.ssps.start_epoch
    assert config_lib.ineffective_settings(demo) == []


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


def test_paper_dino_ssps_config():
    config = _load(next(p for p in CONFIGS if p.stem == "dino_ssps_ecapa"))
    assert (config.method, config.data.crops.mode) == ("dino", "dino")
    assert (config.model.mel.n_mels, config.model.mel.window) == (80, "hann")
    assert tuple(config.model.ecapa_tdnn.channels) == (1024, 1024, 1024, 1024, 3072)
    assert (config.train.global_batch_size, config.train.epochs, config.ssps.start_epoch) == (128, 100, 80)
    assert (config.optim.optimizer, config.optim.learning_rate, config.optim.weight_decay) == ("sgd", 0.2, 5e-5)
    assert (config.optim.clip_grad_per_param, config.optim.decay_biases_and_norms) == (3.0, False)
    d = config.dino
    assert (d.head_hidden_dim, d.head_bottleneck_dim, d.head_output_dim) == (2048, 2048 // 8, 65536)
    assert (d.student_temperature, d.teacher_temperature, d.center_momentum) == (0.1, 0.04, 0.9)
    assert (d.start_tau, d.end_tau, d.freeze_last_layer_epochs) == (0.996, 1.0, 1)
    c = config.data.crops
    assert (c.global_count, c.global_seconds, c.local_count, c.local_seconds) == (2, 4.0, 4, 2.0)
    s = config.ssps
    assert (s.sampling, s.kmeans_clusters, s.inter_sampling_size, s.pos_queue_size) == ("kmeans-repr", 25000, 1, 25000)


@pytest.mark.parametrize(
    "method, what",
    [
        ("simclr", "a projector output"),
        ("vicreg", "a projector output"),
        ("swav", "a projector output"),
        ("moco", "a key"),
    ],
)
def test_ssps_kmeans_centroids_must_fit_where_the_projection_goes(method, what):
    config = config_lib.use_method(config_lib.use_voxceleb(config_lib.base_config()), method)
    config.ssps.enabled = True
    config.ssps.sampling = "kmeans"
    config[method].projector = True
    config[method].projector_output_dim = config.model.encoder_dim // 2
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, data_on_disk=False)
    assert str(e.value) == (
        f"config.ssps.sampling: 'kmeans' puts a centroid of encoder outputs in place of {what}: "
        f"needs {method}.projector_output_dim == model.encoder_dim"
    )
    config[method].projector_output_dim = config.model.encoder_dim
    config_lib.validate(config, data_on_disk=False)  # the same size: a centroid can stand in
