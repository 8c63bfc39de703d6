"""sslsv (PyTorch) checkpoints: import into a workdir, export back (ssps_jax/sslsv_checkpoint.py).

The sslsv side is built in torch with sslsv's module tree: the PyTorch baseline's ECAPA-TDNN inside its
SimCLR with sslsv's projector, plus torchaudio's two front-end buffers, saved as sslsv's Trainer saves.
Module fixtures share one import (and its compiled programs) between the tests.
"""

import json
import shutil
import warnings

import jax
import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_dino_config
from flax import traverse_util
from torch import nn

from data_pipelines.errors import InputError
from ssps_jax import features, sharding
from ssps_jax import train as train_lib
from ssps_jax.bench.torch_baseline import SimCLR as TorchSimCLR
from ssps_jax.bench.torch_baseline import build_encoder as build_torch_encoder
from ssps_jax.build import build_for_inference
from ssps_jax.checkpoint import Checkpointer
from ssps_jax.inference import TrainedModel, Verifier
from ssps_jax.sslsv_checkpoint import export_sslsv, import_sslsv

WINDOW = "encoder.features_extractor.0.spectrogram.window"
FILTERBANK = "encoder.features_extractor.0.mel_scale.fb"


def simclr_config(demo_dir):
    config = tiny_config(demo_dir)
    config.simclr.projector = True
    config.simclr.projector_hidden_dim = 24
    config.simclr.projector_output_dim = 12
    config.train.epochs = 1
    config.train.checkpoint_every_steps = 2
    return config


def resnet_config(demo_dir):
    config = tiny_config(demo_dir)
    config.model.encoder = "resnet34"
    config.model.resnet34.base_dim = 8
    config.model.resnet34.layers = (1, 1, 1, 1)
    return config


def sslsv_simclr(config, seed) -> nn.Module:
    """sslsv's SimCLR (encoder + projector) in eval mode, with random weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    s = config.simclr
    encoder = with_front_end(build_torch_encoder(config.model), config)
    model = TorchSimCLR(encoder, (s.projector_hidden_dim, s.projector_output_dim))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(1234)
            elif isinstance(module, (nn.Conv1d, nn.Linear)) and module.bias is not None:
                module.bias.normal_(0, 0.1)
    return model.eval()


def with_front_end(encoder: nn.Module, config) -> nn.Module:
    """`encoder` with torchaudio's MelSpectrogram buffers where sslsv's BaseEncoder holds them."""
    mel = features.LogMelConfig(**config.model.mel)
    melspec, spectrogram, mel_scale = nn.Module(), nn.Module(), nn.Module()
    spectrogram.register_buffer("window", torch.hamming_window(mel.win_length))
    mel_scale.register_buffer("fb", torch.from_numpy(features.mel_filterbank(mel)))  # librosa's: within 3e-6
    melspec.spectrogram, melspec.mel_scale = spectrogram, mel_scale
    encoder.features_extractor = nn.Sequential(melspec)  # sslsv: Sequential(MelSpectrogram(...))
    return encoder


def sslsv_dino(config) -> nn.Module:
    """sslsv's DINO module tree: student and momentum encoder + DINOHead, and the loss's centre buffer."""
    d = config.dino

    def head():
        h = nn.Module()
        h.mlp = nn.Sequential(
            nn.Linear(config.model.encoder_dim, d.head_hidden_dim),
            nn.BatchNorm1d(d.head_hidden_dim),
            nn.GELU(),
            nn.Linear(d.head_hidden_dim, d.head_hidden_dim),
            nn.BatchNorm1d(d.head_hidden_dim),
            nn.GELU(),
            nn.Linear(d.head_hidden_dim, d.head_bottleneck_dim),
        )
        with warnings.catch_warnings():  # sslsv uses the deprecated weight_norm, whose names are weight_g / weight_v
            warnings.simplefilter("ignore", FutureWarning)
            h.last_layer = nn.utils.weight_norm(nn.Linear(d.head_bottleneck_dim, d.head_output_dim, bias=False))
        return h

    model = nn.Module()
    model.encoder = with_front_end(build_torch_encoder(config.model), config)
    model.encoder_momentum = with_front_end(build_torch_encoder(config.model), config)
    model.head, model.head_momentum, model.loss_fn = head(), head(), nn.Module()
    model.loss_fn.register_buffer("center", torch.zeros(1, d.head_output_dim))
    return model


def waves(seed=0):
    """Three waveforms of one embedding bucket (1.3 to 1.7 s)."""
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (20800, 27200, 24000)]


def torch_embeddings(model, audio):
    with torch.no_grad():
        y = np.stack([model.encoder(torch.from_numpy(w[None]))[0].numpy() for w in audio])
    return y / np.linalg.norm(y, axis=-1, keepdims=True)


def host_tree(state):
    tree = {"params": state.params, "batch_stats": state.batch_stats, **(state.method_state or {})}
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def restore(workdir, like):
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        return ckpt.restore(0, like)[0]
    finally:
        ckpt.close()


def edited(path, tmp_path, edit):
    data = torch.load(path, weights_only=True)
    edit(data["model"])
    torch.save(data, tmp_path / "edited.pt")
    return tmp_path / "edited.pt"


@pytest.fixture(scope="module")
def sslsv_file(demo_dir, tmp_path_factory):
    """(config, torch model, its sslsv checkpoint: {"epoch", "best_metric", "model", "optimizer"})."""
    config = simclr_config(demo_dir)
    model = sslsv_simclr(config, seed=0)
    path = tmp_path_factory.mktemp("sslsv") / "model_latest.pt"
    optimizer = torch.optim.Adam(model.parameters())
    torch.save(
        {"epoch": 7, "best_metric": 0.25, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, path
    )
    return config, model, path


@pytest.fixture(scope="module")
def imported(sslsv_file, tmp_path_factory):
    """(workdir, report) of the import of `sslsv_file`."""
    config, _, path = sslsv_file
    workdir = tmp_path_factory.mktemp("imported") / "w"
    return workdir, import_sslsv(path, config, workdir)


@pytest.fixture(scope="module")
def verifier(imported):
    return Verifier(TrainedModel.from_workdir(imported[0]))


def test_imported_sslsv_model_embeds_like_the_torch_model(sslsv_file, imported, verifier):
    _, model, path = sslsv_file
    workdir, report = imported
    np.testing.assert_allclose(verifier.embed(waves()), torch_embeddings(model, waves()), atol=1e-4)

    held = [k for k in model.state_dict() if not k.endswith("num_batches_tracked") and "features_extractor" not in k]
    assert report["imported"] == len(held) and report["sslsv_epoch"] == 7
    assert "encoder.blocks.0.norm.num_batches_tracked" in report["ignored"]["num_batches_tracked"]
    assert report["ignored"]["front end"] == sorted([FILTERBANK, WINDOW])
    assert report["fresh"] == ["optimizer state (and the schedules' step): starts fresh"]
    meta = json.loads((workdir / "checkpoints" / "0" / "meta" / "metadata").read_text())
    assert meta == {"step": 0, "epoch": 0, "imported": {"format": "sslsv", "from": str(path), "sslsv_epoch": 7}}
    # The projector came across too (embed does not use it): in our layout.
    kernel = np.asarray(verifier.trained.variables["params"]["projector"]["layers_3"]["kernel"])
    np.testing.assert_array_equal(kernel, model.projector[3].weight.detach().numpy().T)


def test_export_loads_strictly_into_sslsv_and_imports_back_exactly(sslsv_file, imported, verifier, tmp_path):
    config, model, _ = sslsv_file
    out = export_sslsv(verifier.trained, tmp_path / "out.pt")
    exported = torch.load(out, weights_only=True)["model"]

    other = sslsv_simclr(config, seed=1)
    other.load_state_dict(exported, strict=True)  # what sslsv's load_state_dict(strict=True) checks
    np.testing.assert_allclose(torch_embeddings(other, waves(1)), verifier.embed(waves(1)), atol=1e-4)
    for key, value in model.state_dict().items():  # the weights imported from `model`, bit for bit
        if not key.endswith(("num_batches_tracked", FILTERBANK)):
            assert torch.equal(exported[key], value), key
    assert exported["encoder.asp_bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(exported[WINDOW], torch.hamming_window(400))  # periodic, win_length samples
    reference = features.mel_filterbank(features.LogMelConfig(**config.model.mel))  # librosa's HTK filters
    assert exported[FILTERBANK].shape == (257, 16)
    np.testing.assert_allclose(exported[FILTERBANK].numpy(), reference, atol=1e-5)

    import_sslsv(out, config, tmp_path / "again")  # and back: every variable bit for bit
    back = TrainedModel.from_workdir(tmp_path / "again").variables
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, verifier.trained.variables
    )


def perturbed_workdir(config, workdir, seed=0):
    """A workdir whose checkpoint 0 holds random variables (DINO: a teacher other than the student, a centre)."""
    _, _, like = build_for_inference(config, sharding.make_mesh(), abstract=True)  # no model compiled
    rng = np.random.default_rng(seed)

    def random(x, positive=False):
        value = rng.standard_normal(x.shape).astype(x.dtype)
        value = np.abs(value) if positive else value
        return jax.make_array_from_callback(x.shape, x.sharding, lambda i: value[i])

    state = like.replace(
        step=jax.numpy.zeros((), like.step.dtype),
        rng=jax.random.PRNGKey(seed),
        params=jax.tree.map(random, like.params),
        batch_stats=jax.tree.map(lambda v: random(v, positive=True), like.batch_stats),
        method_state=jax.tree.map(random, like.method_state),
    )
    workdir.mkdir(parents=True)
    train_lib.save_config(config, workdir)
    ckpt = Checkpointer(workdir / "checkpoints")
    ckpt.save(0, state, None, {"step": 0, "epoch": 3, "imported": {"format": "test"}})
    ckpt.wait()
    ckpt.close()
    return state


@pytest.fixture(scope="module")
def dino_export(demo_dir, tmp_path_factory):
    """(config, perturbed state, its sslsv export) of a DINO workdir."""
    config = tiny_dino_config(demo_dir)
    root = tmp_path_factory.mktemp("dino")
    state = perturbed_workdir(config, root / "a")
    return config, state, export_sslsv(root / "a", root / "model.pt", 0)


@pytest.fixture(scope="module")
def resnet_export(demo_dir, tmp_path_factory):
    config = resnet_config(demo_dir)
    root = tmp_path_factory.mktemp("resnet")
    state = perturbed_workdir(config, root / "a")
    return config, state, export_sslsv(root / "a", root / "model.pt")


@pytest.fixture(scope="module")
def moco_export(demo_dir, tmp_path_factory):
    config = tiny_config(demo_dir)
    config.method = "moco"
    config.moco.projector_hidden_dim = 24
    config.moco.projector_output_dim = 12
    config.moco.queue_size = 48
    root = tmp_path_factory.mktemp("moco")
    state = perturbed_workdir(config, root / "a")
    return config, state, export_sslsv(root / "a", root / "model.pt")


@pytest.mark.parametrize("exported", ["dino_export", "resnet_export", "moco_export"])
def test_export_then_import_is_exact(request, tmp_path, exported):
    config, state, out = request.getfixturevalue(exported)
    saved = torch.load(out, weights_only=True)
    assert saved["epoch"] == 3
    report = import_sslsv(out, config, tmp_path / "b")
    original, again = host_tree(state), host_tree(restore(tmp_path / "b", state))
    assert sorted(again) == sorted(original)
    fresh = [("queue",)] if config.method == "moco" else []  # MoCo's queue is sslsv's own: not exported
    for path, value in original.items():
        if path not in fresh:
            assert again[path].dtype == value.dtype and np.array_equal(again[path], value), path
    expected = ["optimizer state (and the schedules' step): starts fresh"]
    expected += ["method state 'queue': initialised as at the start of training"] if fresh else []
    assert report["fresh"] == expected
    if config.method == "moco":
        key_network = original[("momentum", "params", "projector", "layers_6", "kernel")]
        np.testing.assert_array_equal(saved["model"]["projector_momentum.6.weight"].numpy(), key_network.T)
        assert "queue" not in saved["model"]
    elif config.method == "dino":
        keys = saved["model"]
        sslsv_dino(config).load_state_dict(keys, strict=True)  # what sslsv's load_state_dict(strict=True) checks
        teacher_v = original[("teacher", "params", "head", "last_layer", "weight_v")]
        assert not np.array_equal(teacher_v, original[("params", "head", "last_layer", "weight_v")])
        np.testing.assert_array_equal(keys["head_momentum.last_layer.weight_v"].numpy(), teacher_v.T)
        np.testing.assert_array_equal(keys["loss_fn.center"].numpy(), original[("center",)][None])
        assert keys["head_momentum.last_layer.weight_g"].shape == (64, 1)
        assert torch.all(keys["head.last_layer.weight_g"] == 1)
        assert torch.equal(keys[FILTERBANK], keys[FILTERBANK.replace("encoder.", "encoder_momentum.")])
    else:
        assert "encoder.block1.0.bn1.num_batches_tracked" in saved["model"]


def test_missing_and_unexpected_keys_are_named(sslsv_file, tmp_path):
    config, _, path = sslsv_file
    missing = edited(path, tmp_path, lambda sd: sd.pop("encoder.mfa.norm.running_var"))
    with pytest.raises(InputError, match=r"1 missing key\(s\) \[encoder\.mfa\.norm\.running_var\]"):
        import_sslsv(missing, config, tmp_path / "w1")
    extra = edited(path, tmp_path, lambda sd: sd.update({"encoder.extra.weight": torch.zeros(3)}))
    with pytest.raises(InputError, match=r"1 unexpected key\(s\) \[encoder\.extra\.weight\]"):
        import_sslsv(extra, config, tmp_path / "w2")
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()  # nothing written
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(InputError, match=r"notes\.pt is not a PyTorch checkpoint"):
        import_sslsv(tmp_path / "notes.pt", config, tmp_path / "w3")


def test_sslsv_ssps_queues_and_numpy_scalars_are_accepted(sslsv_file, tmp_path, caplog):
    config, _, path = sslsv_file
    data = torch.load(path, weights_only=True)
    data["model"]["ssps.train_embeddings_ref"] = torch.zeros(4, 16)  # model_latest.pt of an SSPS run
    data["best_metric"] = np.float64(0.25)  # not loadable with weights_only=True
    torch.save(data, tmp_path / "model.pt")
    report = import_sslsv(tmp_path / "model.pt", config, tmp_path / "w")
    assert report["ignored"]["ssps"] == ["ssps.train_embeddings_ref"]
    assert "loaded with the full unpickler" in caplog.text


def test_shape_and_front_end_mismatches_name_the_config_field(sslsv_file, tmp_path):
    config, _, path = sslsv_file
    other = config.copy_and_resolve_references()
    other.model.ecapa_tdnn.se_channels = 4
    expected = r"encoder\.blocks\.1\.se_block\.conv1\.conv\.bias is \(8,\), the config's model needs \(4,\) "
    with pytest.raises(InputError, match=expected + r"\(model\.ecapa_tdnn\.se_channels probably differs\)"):
        import_sslsv(path, other, tmp_path / "w")
    other = config.copy_and_resolve_references()
    other.model.ecapa_tdnn.channels = (16, 16, 32)
    with pytest.raises(
        InputError, match=r"encoder\.asp\.conv\.conv\.bias is \(48,\).*\(32,\) \(model\.ecapa_tdnn\.channels"
    ):
        import_sslsv(path, other, tmp_path / "w")
    other = config.copy_and_resolve_references()
    other.simclr.projector_output_dim = 10
    with pytest.raises(InputError, match=r"projector\.6\.bias is \(12,\).*\(10,\) \(simclr\.projector_hidden_dim"):
        import_sslsv(path, other, tmp_path / "w")
    other = config.copy_and_resolve_references()
    other.model.mel.n_mels = 24
    with pytest.raises(InputError, match=r"mel_scale\.fb has shape \(257, 16\).*\(257, 24\): model\.mel\.n_mels"):
        import_sslsv(path, other, tmp_path / "w")
    other = config.copy_and_resolve_references()
    other.model.mel.window = "hann"
    with pytest.raises(InputError, match=r"spectrogram\.window is not model\.mel\.window \('hann'\)"):
        import_sslsv(path, other, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_weight_g_other_than_one_and_existing_checkpoints_are_refused(dino_export, imported, sslsv_file, tmp_path):
    config, _, out = dino_export

    def double_g(state_dict):
        state_dict["head_momentum.last_layer.weight_g"] *= 2

    with pytest.raises(InputError, match=r"head_momentum\.last_layer\.weight_g is not all ones"):
        import_sslsv(edited(out, tmp_path, double_g), config, tmp_path / "w")
    workdir, _ = imported
    with pytest.raises(InputError, match=f"{workdir / 'checkpoints'} already holds checkpoints"):
        import_sslsv(sslsv_file[2], sslsv_file[0], workdir)


class Stop(Exception):
    pass


def test_imported_workdir_continues_training_from_the_imported_weights(sslsv_file, imported, verifier, tmp_path):
    config = sslsv_file[0]
    workdir = tmp_path / "w"
    shutil.copytree(imported[0], workdir)
    _, _, fresh = build_for_inference(config, sharding.make_mesh())
    # The imported state's step and base key are a fresh run's: only the weights differ.
    start = restore(workdir, fresh)
    assert int(start.step) == 0 and np.array_equal(np.asarray(start.rng), np.asarray(fresh.rng))
    imported_params = jax.tree.map(np.asarray, verifier.trained.variables["params"])
    first = {}

    def on_step(done, state):
        if done == 1:
            first.update(params=jax.tree.map(np.asarray, state.params), step=int(state.step))
        if done == 3:  # the checkpoint of step 2 is written: enough
            raise Stop

    with pytest.raises(Stop):
        train_lib.train(config, workdir, on_step=on_step)

    def distance(a, b):
        return sum(float(np.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    assert first["step"] == 1
    # One optimizer step from the imported weights, far from a fresh initialisation.
    assert 0 < distance(first["params"], imported_params) < 1e-3 * distance(first["params"], fresh.params)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [0, 2]
