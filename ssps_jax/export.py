"""Export a trained model as a standalone waveform -> embedding function: StableHLO and ONNX.

The exported function, in both formats:

    inputs   wave     float32 (B, L)  16 kHz mono samples in [-1, 1] (int16 PCM / 32768), rows zero- or
                                      anything-padded to L
             lengths  int32 (B,)      valid samples of each row, in [MIN_SECONDS * 16000, L]; the model
                                      ignores the samples past them (padding-masked, as evaluation embeds)
    output   embedding float32 (B, D) L2-normalised: the cosine score of two recordings is a dot product

It is the model's `embed` (DINO: the teacher's variables) with the checkpoint's
variables baked in as constants, then L2-normalised: the embedding evaluation
and `Verifier.embed` compute, up to float32 rounding. Beside every artefact
`export` writes `<artefact>.json` (`encoder.onnx.json`, `encoder.stablehlo.json`:
exports into one folder never overwrite each other's): workdir, checkpoint
step, model config, sample rate, input shapes, output dim. It prints both paths.

StableHLO (`jax.export`, `.stablehlo`): B and L are both symbolic, so one
artefact takes any batch of any length; `load_stablehlo` (or
`jax.export.deserialize` in any JAX >= the exporting one's serialization
version) compiles it per shape at call time. It is lowered for CPU, CUDA and
TPU at once (jax.export lowers for all three on any host), so the same file
runs on whichever backend the caller's JAX has, with full float32 matmuls and
convolutions everywhere (precision HIGHEST: a GPU's default TF32 put a CUDA
run ~1e-4 off the CPU's embeddings; with it, 2e-7). `max_seconds` fixes L
instead (for runtimes that want static shapes).

ONNX (jax2onnx, `.onnx`, opset 23): B is symbolic, L is fixed to
round(max_seconds * 16000) (default 20 s): jax2onnx's own symbolic dimensions
do not support the slice arithmetic of the per-row reflect padding
(ssps_jax.ops.reflect_pad), so callers pad to L and pass lengths; longer
recordings must be cropped. It computes in float32 whatever model.dtype (ONNX
runtimes have few bfloat16 kernels; the parameters are float32 anyway). Two
primitives are rewritten before conversion, in a jaxpr interpreter that runs
only here (training and evaluation numerics are untouched):
  * `fft` (the log-mel front end's rfft) becomes a real DFT, two matmuls with
    fixed cos/sin matrices: the same transform, and plain MatMul in ONNX
    (jax2onnx 0.17's rfft lowering emits a DFT node onnxruntime rejects when
    the batch is symbolic; MatMul runs on every ONNX runtime);
  * integer `rem` (from floor division of lengths) becomes x - (x / y) * y with
    truncating division, its exact definition (jax2onnx 0.17's integer `rem`
    lowering fails on a symbolic batch).
`load_onnx` runs the file with onnxruntime. Both loaders check the inputs
first (the graphs cannot): a length outside [MIN_SECONDS * 16000, L], or rows
of another L than a fixed-length artefact's, is an InputError naming the row.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax import lax
from jax.extend import core as jex_core

from data_pipelines import audio_io
from data_pipelines.errors import InputError
from data_pipelines.paths import is_remote
from ssps_jax.evaluation.verification import MIN_SECONDS
from ssps_jax.inference import TrainedModel
from ssps_jax.observe import say

SAMPLE_RATE = audio_io.SAMPLE_RATE
FORMATS = ("onnx", "stablehlo")
SUFFIXES = {"onnx": ".onnx", "stablehlo": ".stablehlo"}
STABLEHLO_PLATFORMS = ("cpu", "cuda", "tpu")
INPUT_NAMES = ("wave", "lengths")
OUTPUT_NAME = "embedding"


def embedding_function(trained: TrainedModel) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(wave (B, L) float32, lengths (B,) int32) -> (B, D) float32 L2-normalised: what both formats export."""
    # Host copies: the export bakes them in as constants, free of the mesh the model was restored on.
    variables = jax.device_get(trained.variables)
    embed = trained.embed_fn()

    def embedding(wave, lengths):
        e = embed(variables, wave, lengths).astype(jnp.float32)
        return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

    return embedding


# ---------------------------------------------------------------------------------------------------- StableHLO


def export_stablehlo(trained: TrainedModel, out: epath.PathLike, max_seconds: float | None = None) -> epath.Path:
    """Writes `out` (serialized jax.export.Exported) and `<out>.json`; returns `out`.

    B and L are symbolic; `max_seconds` fixes L to round(max_seconds * 16000) instead.
    """
    out = _destination(out, "stablehlo")
    length = None if max_seconds is None else _fixed_length(max_seconds)
    batch, symbolic_length = jax.export.symbolic_shape("B, L")
    # Full float32 matmuls and convolutions on every platform: GPUs default to TF32 and TPUs to bfloat16
    # passes, ~1e-3 off the CPU's embeddings; an artefact should embed alike wherever it runs.
    with jax.default_matmul_precision("highest"):
        exported = jax.export.export(jax.jit(embedding_function(trained)), platforms=STABLEHLO_PLATFORMS)(
            *_input_structs(batch, symbolic_length if length is None else length)
        )
    out.write_bytes(exported.serialize())
    dim = exported.out_avals[0].shape[-1]
    _write_metadata(trained, out, "stablehlo", length, dim, platforms=list(exported.platforms))
    return out


def load_stablehlo(path: epath.PathLike) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The function `export_stablehlo` wrote: (wave, lengths) -> (B, D) float32 embeddings (numpy)."""
    path = _existing(path)
    try:
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
    except Exception as e:  # flatbuffers raise whatever they hit on a foreign file
        raise InputError(f"{path}: not a serialized jax.export artefact ({e})") from e
    call = jax.jit(exported.call)

    fixed = exported.in_avals[0].shape[1]
    fixed = fixed if isinstance(fixed, int) else None  # a symbolic L is a dimension expression

    def embedding(wave, lengths):
        return np.asarray(call(*_checked(path, wave, lengths, fixed)))

    return embedding


# --------------------------------------------------------------------------------------------------------- ONNX


def export_onnx(trained: TrainedModel, out: epath.PathLike, max_seconds: float = 20.0) -> epath.Path:
    """Writes `out` (ONNX, opset 23; inputs "wave" (B, L), "lengths" (B,); output "embedding") and `<out>.json`.

    B is symbolic, L = round(max_seconds * 16000): pad shorter recordings, crop longer ones. It computes
    in float32, also for a model trained with model.dtype bfloat16 (the JSON's model.dtype says so).
    """
    out = _destination(out, "onnx")
    length = _fixed_length(max_seconds)
    trained = _float32(trained)
    embedding = embedding_function(trained)
    dim = jax.eval_shape(embedding, *_input_structs(1, length)).shape[-1]
    with _quiet_jax2onnx():
        from jax2onnx import to_onnx

        proto = to_onnx(
            onnx_friendly(embedding),
            list(_input_structs("B", length)),
            model_name="ssps_jax_embedding",
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
        )
    # jax2onnx annotates some intermediate values with wrong shapes (e.g. a transposed (B, C, T) as (B, T, C));
    # onnxruntime warns and ignores them. The inputs' and outputs' types are all a runtime needs: it infers the rest.
    del proto.graph.value_info[:]
    out.write_bytes(proto.SerializeToString())  # < 2 GB for every encoder here: one self-contained file (or object)
    _write_metadata(trained, out, "onnx", length, dim)
    return out


def load_onnx(path: epath.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """The model `export_onnx` wrote, in onnxruntime: (wave, lengths) -> (B, D) float32 embeddings."""
    path = _existing(path)
    try:
        import onnxruntime
    except ImportError as e:
        raise InputError(f"running an ONNX export here needs onnxruntime (the export extra): {e}") from e
    try:
        session = onnxruntime.InferenceSession(path.read_bytes(), providers=list(providers))
    except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf types
        raise InputError(f"{path}: onnxruntime cannot load it ({e})") from e

    fixed = session.get_inputs()[0].shape[1]  # export_onnx fixes L

    def embedding(wave, lengths):
        feeds = dict(zip(INPUT_NAMES, _checked(path, wave, lengths, fixed)))
        return session.run([OUTPUT_NAME], feeds)[0]

    return embedding


def _float32(trained: TrainedModel) -> TrainedModel:
    """`trained` computing in float32: ONNX runtimes run few operators in bfloat16 (onnxruntime's CPU: no Conv).

    Parameters and statistics are float32 whatever model.dtype says, so this only drops the rounding of
    activations: the embeddings of a bfloat16-trained model, computed more precisely.
    """
    if trained.config.model.dtype == "float32":
        return trained
    config = copy.deepcopy(trained.config)
    config.model.dtype = "float32"
    return dataclasses.replace(trained, config=config, model=trained.method.build_model(config))


@contextlib.contextmanager
def _quiet_jax2onnx():
    """jax2onnx without its noise, and a clear error when the "export" extra is not installed.

    On import it logs a traceback for each plugin whose library (equinox, dm-pix) is absent (ours need
    neither: `make venv` installs jax2onnx without them); onnx_ir warns about every constant whose
    type it infers; tracing with jax2onnx's float64-aware dtypes warns about float64 in float32 code.
    """
    loggers = [logging.getLogger(name) for name in ("jax2onnx.plugins.plugin_system", "onnx_ir.serde")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Explicitly requested dtype float64", UserWarning)
            try:
                import jax2onnx  # noqa: F401
            except ImportError as e:
                raise InputError(
                    "ONNX export needs jax2onnx, onnx and onnxruntime: pip install 'ssps-jax[export]' and "
                    f"pip install --no-deps jax2onnx==0.17.1 (setup.py says why; `make venv` does both): {e}"
                ) from e
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# The jaxpr rewrite used only for ONNX. A small interpreter, like jax.core.eval_jaxpr, that inlines nested
# `jit`s, resolves `lax.platform_dependent` to its CPU branch (an ONNX graph has no platform; the log-mel's
# CPU branch is the FFT, which becomes the real DFT below) and replaces two primitives; everything else is
# re-bound unchanged.


@dataclasses.dataclass(frozen=True)
class _Spectrum:
    """An rfft result kept as its real and imaginary parts, which `real` / `imag` take apart for free."""

    re: jax.Array
    im: jax.Array

    def complex(self) -> jax.Array:
        return lax.complex(self.re, self.im)


def real_dft(x: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """rfft of the last axis (length n) as matmuls: (Re, Im), each (..., n // 2 + 1).

    X[k] = sum_t x[t] exp(-2 pi i t k / n); the angles are reduced mod n in
    integers, then cos/sin taken in float64, so the matrices are exact to float32.
    """
    t, k = np.arange(n)[:, None], np.arange(n // 2 + 1)[None, :]
    angle = 2 * np.pi * ((t * k) % n) / n
    cos, sin = np.cos(angle).astype(np.float32), (-np.sin(angle)).astype(np.float32)
    x = x.astype(jnp.float32)
    hi = lax.Precision.HIGHEST  # a TPU/GPU would otherwise round the operands to bfloat16 / TF32
    return jnp.matmul(x, cos, precision=hi), jnp.matmul(x, sin, precision=hi)


def onnx_friendly(fn: Callable) -> Callable:
    """`fn` with platform-dependent code as on a CPU, rfft as a real DFT (matmuls) and integer rem as
    x - trunc(x / y) * y: same values, ONNX-clean."""

    def rewritten(*args):
        closed, out_shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shapes), outs)

    return rewritten


def _evaluate(jaxpr, consts, args):
    env = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    def materialise(value):
        return value.complex() if isinstance(value, _Spectrum) else value

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "jit":
            inner = eqn.params["jaxpr"]
            outs = _evaluate(inner.jaxpr, inner.consts, ins)
        elif name == "fft" and eqn.params["fft_type"] == lax.FftType.RFFT and len(eqn.params["fft_lengths"]) == 1:
            outs = [_Spectrum(*real_dft(ins[0], eqn.params["fft_lengths"][0]))]
        elif name in ("real", "imag") and isinstance(ins[0], _Spectrum):
            outs = [ins[0].re if name == "real" else ins[0].im]
        elif name == "platform_index":  # lax.platform_dependent (the log-mel): ONNX takes the CPU formulation
            outs = [next(i for i, p in enumerate(eqn.params["platforms"]) if p is not None and "cpu" in p)]
        elif name == "cond" and isinstance(ins[0], int):  # the branch platform_index chose, inlined
            branch = eqn.params["branches"][ins[0]]
            outs = _evaluate(branch.jaxpr, branch.consts, ins[1:])
        elif name == "rem" and jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.integer):
            x, y = ins
            outs = [lax.sub(x, lax.mul(lax.div(x, y), y))]  # lax.div truncates towards zero, as rem does
        else:
            with eqn.ctx.manager:  # as jax.core.eval_jaxpr re-binds an equation
                outs = eqn.primitive.bind(*map(materialise, ins), **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        for var, value in zip(eqn.outvars, outs):
            env[var] = value
    return [materialise(read(v)) for v in jaxpr.outvars]


# ---------------------------------------------------------------------------------------------------- Shared


def export(trained: TrainedModel, out: epath.PathLike, fmt: str, max_seconds: float | None = None) -> epath.Path:
    """`export_onnx` or `export_stablehlo` by name; max_seconds None: each format's default."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        return export_onnx(trained, out) if max_seconds is None else export_onnx(trained, out, max_seconds)
    return export_stablehlo(trained, out, max_seconds)


def metadata_path(artefact: epath.PathLike) -> epath.Path:
    """The JSON written beside an exported artefact: its name + `.json` (one per artefact, whatever its format)."""
    artefact = epath.Path(artefact)
    return artefact.with_name(artefact.name + ".json")


def _input_structs(batch, length) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    return jax.ShapeDtypeStruct((batch, length), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32)


def _destination(out: epath.PathLike, fmt: str) -> epath.Path:
    out = epath.Path(out)
    if not is_remote(out) and not out.parent.is_dir():  # an object store has no folders to check
        raise InputError(f"cannot write {out}: folder {out.parent} does not exist")
    return out


def _existing(path: epath.PathLike) -> epath.Path:
    path = epath.Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such exported model")
    return path


def _checked(path: epath.Path, wave, lengths, fixed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(wave, lengths) as the exported function takes them, or an InputError naming the bad shape or row.

    The graph cannot refuse them itself: a length past its row, or under the shortest recording the model
    embeds, gives an embedding of the padding, silently."""
    wave, lengths = np.asarray(wave, np.float32), np.asarray(lengths)
    if wave.ndim != 2:
        raise InputError(f"{path}: wave must be (batch, samples), got shape {wave.shape}")
    if fixed is not None and wave.shape[1] != fixed:
        raise InputError(
            f"{path}: takes rows of exactly {fixed} samples ({fixed / SAMPLE_RATE:g} s; pad shorter recordings "
            f"and pass their lengths, crop longer ones), got {wave.shape[1]}"
        )
    if lengths.shape != wave.shape[:1] or not np.issubdtype(lengths.dtype, np.integer):
        raise InputError(
            f"{path}: lengths must be {wave.shape[0]} integers, one per row, got {lengths.dtype} {lengths.shape}"
        )
    low = round(MIN_SECONDS * SAMPLE_RATE)
    bad = np.flatnonzero((lengths < low) | (lengths > wave.shape[1]))
    if bad.size:
        row = int(bad[0])
        raise InputError(
            f"{path}: lengths[{row}] = {lengths[row]} is outside [{low}, {wave.shape[1]}] "
            f"(at least {MIN_SECONDS:g} s, at most the row's samples)"
        )
    return wave, lengths.astype(np.int32)


def _fixed_length(max_seconds: float) -> int:
    if not max_seconds > 0:  # also NaN
        raise InputError(f"max_seconds must be > 0, got {max_seconds}")
    if max_seconds < MIN_SECONDS:
        raise InputError(f"max_seconds {max_seconds} is shorter than the shortest recording embedded ({MIN_SECONDS} s)")
    return round(max_seconds * SAMPLE_RATE)


def _write_metadata(trained: TrainedModel, out: epath.Path, fmt: str, length: int | None, dim: int, **extra) -> None:
    model = trained.config.model
    encoder = model.encoder
    meta = {
        "format": fmt,
        "artefact": out.name,
        "workdir": str(trained.workdir),
        "step": trained.step,
        "method": trained.config.method,
        "model": {
            "encoder": encoder,
            "encoder_dim": model.encoder_dim,
            "dtype": model.dtype,
            encoder: model[encoder].to_dict() if encoder in model else None,
            "mel": model.mel.to_dict(),
        },
        "sample_rate": SAMPLE_RATE,
        "inputs": {
            "wave": {"dtype": "float32", "shape": ["B", "L" if length is None else length], "range": [-1.0, 1.0]},
            "lengths": {"dtype": "int32", "shape": ["B"], "min": round(MIN_SECONDS * SAMPLE_RATE)},
        },
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["B", int(dim)]},
        "l2_normalised": True,
        "scoring": "cosine = dot product of the embeddings",
        **extra,
    }
    metadata_path(out).write_text(json.dumps(meta, indent=2) + "\n")
    shape = f"(B, {'L' if length is None else length})"
    say(
        f"wrote {out} ({fmt}: wave {shape} float32, lengths (B,) int32 -> embedding (B, {int(dim)}); "
        f"{trained.workdir} step {trained.step}) and its description {metadata_path(out)}"
    )
