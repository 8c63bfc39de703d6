"""Supervised AAM-softmax: the loss against NumPy, labels looked up on the device, 8 devices == 1,
refusal of unlabelled data, training and resuming through `train`."""

import jax
import numpy as np
import pytest
from method_checks import N, assert_8_devices_equal_1, assert_resume_in_ssps_epoch_reproduces, tiny_method_config

from data_pipelines.errors import ConfigError
from ssps_jax import config as config_lib
from ssps_jax import sharding
from ssps_jax.build import build
from ssps_jax.methods import supervised

METHOD = supervised.METHOD


def _aam_numpy(cosines, labels, margin, scale):
    """AAM-softmax from angles: the target's angle grows by the margin while it stays below pi, else
    the target cosine drops by margin * sin(margin); then softmax cross-entropy of scale * logits."""
    cosines = cosines.astype(np.float64)
    losses, correct = [], []
    for row, label in zip(cosines, labels):
        logits = row.copy()
        theta = np.arccos(row[label])
        logits[label] = np.cos(theta + margin) if theta + margin < np.pi else row[label] - margin * np.sin(margin)
        logits = scale * logits
        losses.append(np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[label])
        correct.append(np.argmax(logits) == label)
    return np.mean(losses), np.mean(correct)


@pytest.mark.parametrize("margin, scale", [(0.2, 30.0), (0.0, 10.0), (0.5, 5.0)])
def test_aam_softmax_matches_numpy(margin, scale):
    rng = np.random.default_rng(0)
    cosines = np.tanh(rng.normal(size=(12, 7))).astype(np.float32)
    cosines[0, 3] = -0.99  # a target past pi - margin: the linear branch
    labels = rng.integers(0, 7, size=12)
    labels[0] = 3
    loss, accuracy = supervised.aam_softmax(cosines, labels, margin, scale)
    want_loss, want_accuracy = _aam_numpy(cosines, labels, margin, scale)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    assert float(accuracy) == pytest.approx(want_accuracy)
    # The gradient stays finite at |cos| = 1.
    cosines[1, labels[1]] = 1.0
    grad = jax.grad(lambda c: supervised.aam_softmax(c, labels, margin, scale)[0])(cosines)
    assert np.all(np.isfinite(grad))


def _config(demo_dir):
    config = tiny_method_config(demo_dir, "supervised")
    config.supervised.classes = 16  # the fixture corpus's train speakers
    return config


def test_supervised_step_on_8_devices_equals_1_with_labels_looked_up_by_index(demo_dir):
    config = _config(demo_dir)
    rng = np.random.default_rng(0)
    c = config.data.crops
    batch = {
        "views": rng.normal(size=(N, 2, round(c.frame_seconds * 16000))).astype(np.float32),
        "reference": rng.normal(size=(N, round(c.reference_seconds * 16000))).astype(np.float32),
        "index": rng.permutation(64)[:N].astype(np.int32),
    }
    table = (np.arange(64) * 7 % 16).astype(np.int32)

    def with_labels(state):
        return state.replace(method_state={"speaker_labels": table})

    initial, results = assert_8_devices_equal_1(METHOD, config, batch, extra=with_labels, loss_rtol=1e-5)
    # The loss is AAM-softmax of the batch's own labels (looked up by dataset index), on one device.
    with jax.enable_x64(True):
        cosines = METHOD.build_model(config).apply(
            {"params": initial.params, "batch_stats": initial.batch_stats},
            batch["views"].astype(np.float64),
            train=True,
            mutable=["batch_stats"],
        )[0]
    want, _ = _aam_numpy(np.asarray(cosines), table[batch["index"]], 0.2, 30.0)
    assert float(results[8][1]["loss"]) == pytest.approx(want, rel=1e-5)


def test_supervised_refuses_a_train_split_without_labels_or_with_more_speakers_than_classes(demo_dir):
    config = _config(demo_dir)
    mesh = sharding.make_mesh()
    with pytest.raises(ConfigError, match="supervised trains on speaker labels, but 64 of the 64 utterances"):
        build(config, mesh, 64)
    speaker = np.arange(64, dtype=np.int32) % 16
    speaker[5] = -1
    with pytest.raises(ConfigError, match="but 1 of the 64 utterances"):
        build(config, mesh, 64, labels=(speaker, speaker))
    with pytest.raises(ConfigError, match=r"config.supervised.classes: 16, but .* has 20 speakers"):
        build(config, mesh, 64, labels=(np.arange(64, dtype=np.int32) % 20, speaker))
    config.ssps.enabled = True
    with pytest.raises(ConfigError, match=r"config\.ssps\.enabled: the supervised baseline has no positive view"):
        config_lib.validate(config, device_count=8)


def test_supervised_trains_and_resumes_with_the_label_table(demo_dir, tmp_path):
    def make():
        config = _config(demo_dir)
        config.train.epochs = 2
        return config

    train = assert_resume_in_ssps_epoch_reproduces(make, tmp_path)
    first, last = np.mean([r["loss"] for r in train[:15]]), np.mean([r["loss"] for r in train[15:]])
    assert last < first
    assert all(0 <= r["accuracy"] <= 1 for r in train)
