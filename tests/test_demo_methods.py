"""`ssps-jax demo-methods`: each method's demo config trains its method, and the table reads the right runs."""

import json

import pytest

from data_pipelines.demo_corpus import corpus
from ssps_jax import config as config_lib
from ssps_jax import demo, demo_methods, methods
from ssps_jax.config_overrides import UsageError, load_config_file


def test_every_registered_method_has_a_demo_with_ssps_unless_it_trains_on_labels():
    assert set(demo_methods.demos()) == set(methods.REGISTRY)
    for name, file in demo_methods.demos().items():
        config = load_config_file(demo_methods.CONFIGS / file)
        assert config.method == name
        assert config.ssps.enabled != methods.get(name).needs_labels
        if config.ssps.enabled:  # SSPS epochs after the branch point
            assert 0 < config.ssps.start_epoch < config.train.epochs


def test_the_table_takes_the_fair_baseline_and_the_ssps_run(tmp_path, monkeypatch):
    def fake_demo(data, workdir, config):
        eer = {"simclr": 0.30, "vicreg": 0.40}[config.method]
        row = {"eer": eer, "min_dcf": 0.9, "step": 288}
        runs = {"untrained": {}, "base": {}, "fair": row, "ssps": {**row, "eer": eer * 0.9}}
        return {"runs": runs}

    def fake_train(config, workdir):
        workdir.mkdir(parents=True)
        record = {"kind": "eval", "step": 18, "demo_trials/cosine/eer": 0.1, "demo_trials/cosine/min_dcf_0.01": 0.5}
        (workdir / "metrics.jsonl").write_text(json.dumps(record) + "\n")

    monkeypatch.setattr(demo, "run", fake_demo)
    monkeypatch.setattr("ssps_jax.train.train", fake_train)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / corpus.TRAIN_CSV).write_text("File,Speaker,Session\n")
    rows = demo_methods.run(tmp_path / "data", tmp_path / "runs", ["simclr", "vicreg", "supervised"])
    assert [rows[m]["without_ssps"]["eer"] for m in ("simclr", "vicreg", "supervised")] == [0.30, 0.40, 0.1]
    assert rows["vicreg"]["with_ssps"]["eer"] == pytest.approx(0.36) and rows["supervised"]["with_ssps"] is None
    saved = json.loads((tmp_path / "runs" / "demo_methods.json").read_text())
    assert saved["methods"]["simclr"]["with_ssps"]["eer"] == pytest.approx(0.27)
    with pytest.raises(UsageError, match="unknown nonesuch"):
        demo_methods.run(tmp_path / "data", tmp_path / "runs", ["nonesuch"])


@pytest.mark.parametrize("name", ["vicreg_ecapa", "vicreg_ssps_ecapa", "moco_ssps_ecapa", "swav_ssps_ecapa"])
def test_paper_configs_of_the_journal_methods(name):
    config = load_config_file(demo_methods.CONFIGS / f"{name}.py")
    assert tuple(config.model.ecapa_tdnn.channels) == (1024, 1024, 1024, 1024, 3072)
    assert (config.train.global_batch_size, config.optim.optimizer, config.optim.learning_rate) == (256, "adam", 1e-3)
    if config.ssps.enabled:
        s = config.ssps
        assert (s.start_epoch, config.train.epochs, s.kmeans_clusters, s.pos_queue_size) == (100, 120, 25000, 25000)
    section = config[config.method]
    if config.method == "moco":
        assert (section.projector, section.temperature, section.queue_size) == (False, 0.03, 65536)
    else:
        assert (section.projector_hidden_dim, section.projector_output_dim) == (2048, 512)
    config_lib.validate(config, device_count=8, data_on_disk=False)
