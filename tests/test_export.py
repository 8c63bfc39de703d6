"""ONNX and StableHLO exports of a trained model reload and embed like JAX (ssps_jax/export.py).

The model is tiny_config's ECAPA-TDNN with params and BatchNorm statistics
moved away from initialisation (so every layer, the running statistics
included, shapes the output). The reference embeds each recording alone, at
its own length, with TrainedModel.embed_fn(); the exports embed them padded
into one batch (padding filled with noise) with their lengths, so a masking
bug in an export shows.
"""

import contextlib
import copy
import csv
import dataclasses
import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from data_pipelines import audio_io
from data_pipelines.demo_corpus import corpus
from data_pipelines.errors import InputError
from ssps_jax import export, sharding
from ssps_jax.build import build_for_inference
from ssps_jax.evaluation.embedding import l2_normalise
from ssps_jax.inference import TrainedModel

MAX_SECONDS = 2.0
LENGTH = round(MAX_SECONDS * audio_io.SAMPLE_RATE)
SECONDS = (2.0, 1.3)  # the recordings' lengths: one fills the export's L, one is padded
TOLERANCE = 1e-4  # max abs difference of L2-normalised embeddings


def _perturbed(variables: dict, seed: int = 0) -> dict:
    """Params scaled and shifted at random; BatchNorm means shifted and variances scaled (both stay valid)."""
    leaves, tree = jax.tree.flatten_with_path(jax.device_get(variables))
    rng = np.random.default_rng(seed)
    out = []
    for path, x in leaves:
        noise = rng.standard_normal(x.shape).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['var']"):
            out.append(x * np.exp(0.5 * noise))
        elif jax.tree_util.keystr(path).endswith("['mean']"):
            out.append(x + 0.5 * noise)
        else:
            out.append(x * (1 + 0.2 * noise) + 0.05 * noise)
    return jax.tree.unflatten(tree, out)


@pytest.fixture(scope="module")
def trained(demo_dir, tmp_path_factory):
    config = tiny_config(demo_dir)
    mesh = sharding.make_mesh()
    method, model, state = build_for_inference(config, mesh)
    variables = _perturbed(method.eval_variables(state))
    stats = jax.tree.leaves(variables["batch_stats"])
    assert not any(np.allclose(s, 0) or np.allclose(s, 1) for s in stats)  # away from init (mean 0, var 1)
    return TrainedModel(tmp_path_factory.mktemp("workdir"), 7, config, mesh, method, model, variables)


@pytest.fixture(scope="module")
def recordings(demo_dir):
    """Two test recordings of different speakers, cropped to SECONDS, as float32 in [-1, 1]."""
    with (demo_dir / corpus.TEST_CSV).open() as f:
        rows = list(csv.DictReader(f))
    other = next(r for r in rows if r["Speaker"] != rows[0]["Speaker"])
    waves = []
    for row, seconds in zip((rows[0], other), SECONDS):
        samples = audio_io.read_audio(demo_dir / row["File"]).samples[: round(seconds * audio_io.SAMPLE_RATE)]
        waves.append(samples.astype(np.float32) / 32768.0)
    assert [len(w) for w in waves] == [round(s * audio_io.SAMPLE_RATE) for s in SECONDS]
    return waves


@pytest.fixture(scope="module")
def reference(trained, recordings):
    """Each recording embedded alone by the model's embed (no padding), L2-normalised: (2, D)."""
    embed = jax.jit(trained.embed_fn())
    rows = [embed(trained.variables, w[None], np.array([len(w)], np.int32))[0] for w in recordings]
    return l2_normalise(np.stack(rows))


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory):
    """ONNX, then StableHLO, exported into one folder under one stem (README's commands): (paths, printed)."""
    folder = tmp_path_factory.mktemp("exports")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        onnx_path = export.export(trained, folder / "encoder.onnx", "onnx", MAX_SECONDS)
        stablehlo_path = export.export(trained, folder / "encoder.stablehlo", "stablehlo")
    return {"onnx": onnx_path, "stablehlo": stablehlo_path}, printed.getvalue()


def test_exports_into_one_folder_keep_each_description(exports):
    paths, printed = exports
    folder = paths["onnx"].parent
    assert sorted(p.name for p in folder.iterdir()) == [
        "encoder.onnx",
        "encoder.onnx.json",
        "encoder.stablehlo",
        "encoder.stablehlo.json",
    ]
    for fmt, path in paths.items():
        meta = json.loads(export.metadata_path(path).read_text())
        assert (meta["format"], meta["artefact"]) == (fmt, path.name)
    lines = printed.splitlines()
    assert len(lines) == 2
    for line, fmt in zip(lines, ("onnx", "stablehlo")):
        assert line.startswith(f"wrote {paths[fmt]} ({fmt}: ") and line.endswith(f"{paths[fmt]}.json")


def _batch(waves, length, seed=1):
    """Waves padded to `length` with noise (an export that read past lengths would change), and their lengths."""
    rng = np.random.default_rng(seed)
    batch = rng.uniform(-0.5, 0.5, (len(waves), length)).astype(np.float32)
    for row, w in zip(batch, waves):
        row[: len(w)] = w
    return batch, np.array([len(w) for w in waves], np.int32)


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)))


def test_onnx_export_matches_jax(trained, exports, recordings, reference):
    path = exports[0]["onnx"]
    run = export.load_onnx(path)

    wave, lengths = _batch(recordings, LENGTH)
    got = run(wave, lengths)
    assert got.dtype == np.float32 and got.shape == reference.shape
    assert _max_diff(got, reference) < TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # The batch is symbolic: the shorter recording alone, with other padding, embeds the same.
    alone = run(*_batch(recordings[1:], LENGTH, seed=2))
    assert _max_diff(alone[0], reference[1]) < TOLERANCE
    _assert_refuses_bad_inputs(run, path, LENGTH)

    import onnx

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["wave", "lengths"] and [o.name for o in graph.output] == ["embedding"]
    assert not {"DFT", "Mod"} & {node.op_type for node in graph.node}  # the rewrites took

    meta = json.loads(export.metadata_path(path).read_text())
    assert meta["format"] == "onnx" and meta["step"] == 7 and meta["workdir"] == str(trained.workdir)
    assert meta["inputs"]["wave"]["shape"] == ["B", LENGTH]
    assert meta["output"]["shape"] == ["B", reference.shape[1]] and meta["l2_normalised"] is True
    assert meta["sample_rate"] == 16000 and meta["model"]["mel"]["n_mels"] == trained.config.model.mel.n_mels


def test_onnx_export_of_a_bfloat16_model_computes_in_float32(trained, recordings, reference, tmp_path):
    config = copy.deepcopy(trained.config)
    config.model.dtype = "bfloat16"
    bf16 = dataclasses.replace(trained, config=config, model=trained.method.build_model(config))
    path = export.export_onnx(bf16, tmp_path / "bf16.onnx", MAX_SECONDS)
    # The same variables in float32 (`reference`); bfloat16 activations would be ~1e-3 off (and do not convert).
    assert _max_diff(export.load_onnx(path)(*_batch(recordings, LENGTH)), reference) < TOLERANCE
    assert json.loads(export.metadata_path(path).read_text())["model"]["dtype"] == "float32"


def test_stablehlo_export_matches_jax(exports, recordings, reference):
    path = exports[0]["stablehlo"]
    run = export.load_stablehlo(path)

    got = run(*_batch(recordings, LENGTH))
    assert got.dtype == np.float32 and got.shape == reference.shape
    assert _max_diff(got, reference) < TOLERANCE
    # Batch and length are symbolic: the shorter recording alone, padded to another length.
    alone = run(*_batch(recordings[1:], len(recordings[1]) + 3000, seed=2))
    assert _max_diff(alone[0], reference[1]) < TOLERANCE

    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    assert set(exported.platforms) == set(export.STABLEHLO_PLATFORMS)
    # Full float32 convolutions and matmuls on every platform (a GPU's default TF32 is ~1e-4 off the CPU).
    assert set(re.findall(r"precision [A-Z]+", exported.mlir_module())) == {"precision HIGHEST"}
    meta = json.loads(export.metadata_path(path).read_text())
    assert meta["format"] == "stablehlo" and meta["inputs"]["wave"]["shape"] == ["B", "L"]
    assert meta["output"]["shape"] == ["B", reference.shape[1]] and meta["step"] == 7


def _assert_refuses_bad_inputs(run, path, length):
    """Lengths the graph would embed as garbage, and rows of another fixed L, are errors naming the row."""
    wave = np.zeros((2, length), np.float32)
    low = round(export.MIN_SECONDS * audio_io.SAMPLE_RATE)
    for lengths, message in (
        ([length, length + 1], rf"lengths\[1\] = {length + 1} is outside \[{low}, {length}\]"),
        ([low - 1, length], rf"lengths\[0\] = {low - 1} is outside"),
        ([length], "lengths must be 2 integers, one per row"),
        ([1.5e4, 1.5e4], "lengths must be 2 integers"),
    ):
        with pytest.raises(InputError, match=re.escape(path.name) + ".*" + message):
            run(wave, np.array(lengths))
    with pytest.raises(InputError, match=rf"takes rows of exactly {length} samples .* got {length - 1}"):
        run(wave[:, :-1], np.array([low, low], np.int32))
    assert run(wave, np.array([low, length], np.int32)).shape[0] == 2  # both ends of the range are taken


def test_stablehlo_fixed_length(trained, tmp_path):
    path = export.export(trained, tmp_path / "fixed.stablehlo", "stablehlo", max_seconds=MAX_SECONDS)
    _assert_refuses_bad_inputs(export.load_stablehlo(path), path, LENGTH)
    wave, lengths = jax.export.deserialize(bytearray(path.read_bytes())).in_avals
    assert wave.shape[1] == LENGTH and lengths.shape == wave.shape[:1]
    assert json.loads(export.metadata_path(path).read_text())["inputs"]["wave"]["shape"] == ["B", LENGTH]


def test_real_dft_is_rfft():
    x = np.random.default_rng(0).standard_normal((3, 5, 512)).astype(np.float32)
    re, im = export.real_dft(jnp.asarray(x), 512)
    want = np.fft.rfft(x.astype(np.float64), axis=-1)
    np.testing.assert_allclose(re, want.real, atol=2e-4)
    np.testing.assert_allclose(im, want.imag, atol=2e-4)


def test_onnx_friendly_rewrite_keeps_values():
    def f(x, n):
        spectrum = jnp.fft.rfft(x, axis=-1)
        return jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2, (n // 160, n % 7)

    x = np.random.default_rng(0).standard_normal((2, 512)).astype(np.float32)
    n = np.array([-3210, 16000], np.int32)  # a negative value: floor division and modulo differ from truncation
    g = export.onnx_friendly(f)
    want, got = f(x, n), g(x, n)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(got[1][0], want[1][0])
    np.testing.assert_array_equal(got[1][1], want[1][1])
    primitives = _primitives(jax.make_jaxpr(g)(x, n).jaxpr)
    assert "fft" not in primitives and "rem" not in primitives and "rem" in _primitives(jax.make_jaxpr(f)(x, n).jaxpr)


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        if eqn.primitive.name == "jit":
            names |= _primitives(eqn.params["jaxpr"].jaxpr)
    return names


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t, d: export.export(t, d / "m.tflite", "tflite"), "unknown export format 'tflite'"),
        (lambda t, d: export.export_onnx(t, d / "missing" / "m.onnx"), "folder .*missing does not exist"),
        (lambda t, d: export.export_stablehlo(t, d / "missing" / "m.stablehlo"), "folder .*missing does not exist"),
        (lambda t, d: export.export_onnx(t, d / "m.onnx", 0.0), "max_seconds must be > 0, got 0.0"),
        (lambda t, d: export.export_stablehlo(t, d / "m.stablehlo", -1.0), "max_seconds must be > 0, got -1.0"),
        (lambda t, d: export.load_stablehlo(d / "nothing.stablehlo"), "nothing.stablehlo: no such exported model"),
    ],
)
def test_bad_input_is_a_clear_error(trained, tmp_path, call, message):
    with pytest.raises(InputError, match=message):
        call(trained, tmp_path)


def test_foreign_file_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.stablehlo"
    junk.write_bytes(b"not an artefact")
    with pytest.raises(InputError, match=r"junk\.stablehlo: not a serialized jax\.export artefact"):
        export.load_stablehlo(junk)
    with pytest.raises(InputError, match=r"junk\.stablehlo: onnxruntime cannot load it"):
        export.load_onnx(junk)
