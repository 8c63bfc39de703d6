"""sslsv (PyTorch) checkpoints in and out: a workdir from an sslsv `model_*.pt`, and an sslsv checkpoint of a workdir.

sslsv saves `torch.save({"model": method.state_dict(), "epoch": ..., "optimizer": ...})`;
the state_dict's keys are the method's module tree, which our Flax trees
mirror (ssps_jax/models/sslsv_names.py, docs/sslsv_parameter_mapping.md):
`encoder.` and the method's heads (`projector.`, DINO's `head.`), the
momentum networks of DINO (`encoder_momentum.`, `head_momentum.`: our
`method_state["teacher"]`) and MoCo (`encoder_momentum.`,
`projector_momentum.`: `method_state["momentum"]`), and DINO's loss centre
`loss_fn.center` (1, K) (our `method_state["center"]`, (K,)).

sslsv also holds what we compute rather than store; an import checks it and
an export writes it, so that sslsv's strict `load_state_dict` accepts the file:
  * each encoder's front end, torchaudio's MelSpectrogram buffers
    `<encoder>.features_extractor.0.spectrogram.window` (periodic window of
    win_length) and `<encoder>.features_extractor.0.mel_scale.fb`
    (n_fft // 2 + 1, n_mels; HTK, no norm): a checkpoint whose front end is
    not the config's is refused, since it was trained on other features;
  * `weight_g` beside every weight-normalised `weight_v` (DINO's last layer,
    SwAV's prototypes): sslsv fixes it at 1, and so does our layer;
  * BatchNorm's `num_batches_tracked` (int64; ignored, exported as 0).
Ignored on import and not exported: sslsv's SSPS queues (`ssps.*`, in its
`model_latest.pt`) and the method buffers listed in `_NOT_IMPORTED` (MoCo's
and SwAV's queues, whose layout and write position are sslsv's own); an
import starts them as at the start of training.

Neither direction compiles the model: the state's layout comes from
`build_for_inference(..., abstract=True)`, so a paper-size model converts in seconds.

The optimizer state is not imported: training continued from an imported
workdir starts the optimizer (and its schedules, from step 0) fresh, and the
input stream at its beginning (the checkpoint is marked "imported").
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

from data_pipelines import paths
from data_pipelines.errors import InputError
from ssps_jax import features
from ssps_jax.build import build_for_inference
from ssps_jax.checkpoint import likely_config_key
from ssps_jax.methods.base import Method
from ssps_jax.models.sslsv_names import sslsv_name, to_torch_layout
from ssps_jax.train_state import seed_keys

logger = logging.getLogger(__name__)

FORMAT = "sslsv"
WINDOW = "features_extractor.0.spectrogram.window"  # after "<encoder>."
FILTERBANK = "features_extractor.0.mel_scale.fb"
SSPS_PREFIX = "ssps."  # sslsv's SSPS queues (model_latest.pt of an SSPS run)

# What each method holds beside the model under sslsv's names (its momentum network, buffers, the buffers an
# import leaves out, the config fields that size its modules) is the method object's: Method.sslsv_* .
# Front-end values written by other libraries (librosa's filterbank vs torchaudio's) differ by ~3e-6.
_FRONT_END_ATOL = 1e-4


# --- the correspondence -----------------------------------------------------------------------------------------


def from_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """sslsv's tensor -> our array of Flax path `path` (the inverse of sslsv_names.to_torch_layout)."""
    if path[-1] not in ("kernel", "weight_v"):
        return value
    if value.ndim == 2:  # Linear (out, in) -> Dense (in, out)
        return value.T
    # Conv (out, in, *spatial) -> (*spatial, in, out)
    return np.transpose(value, (*range(2, value.ndim), 1, 0))


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where an sslsv tensor lives in {"params", "batch_stats", **method_state}, and how its layout differs."""

    where: tuple[str, ...]
    shape: tuple[int, ...]  # sslsv's
    to_torch: Callable[[np.ndarray], np.ndarray]
    from_torch: Callable[[np.ndarray], np.ndarray]


def _layout(method: Method, tree: dict) -> dict[str, _Slot]:
    """sslsv key -> _Slot for every array of `tree` ({"params", "batch_stats", **method_state}) sslsv holds.

    Method-state entries sslsv does not hold (MoCo's queue) are left out.
    """
    momentum, renames = method.sslsv_momentum or (None, {})
    buffers = method.sslsv_buffers
    out = {}
    for where, value in traverse_util.flatten_dict(tree).items():
        shape = tuple(np.shape(value))
        if where[0] in ("params", "batch_stats"):
            collection, path = where[0], where[1:]
        elif where[0] == momentum and where[1] in ("params", "batch_stats"):
            collection, path = where[1], (renames[where[2]], *where[3:])
        elif len(where) == 1 and where[0] in buffers:  # held with a leading 1 (a (1, K) buffer for our (K,))
            out[buffers[where[0]]] = _Slot(
                where, (1, *shape), lambda x: x.reshape(1, *x.shape), lambda x, s=shape: x.reshape(s)
            )
            continue
        else:
            continue
        out[sslsv_name(path, collection)] = _Slot(
            where,
            to_torch_layout(path, np.broadcast_to(np.zeros((), np.float32), shape)).shape,
            lambda x, p=path: to_torch_layout(p, x),
            lambda x, p=path: from_torch_layout(p, x),
        )
    return out


def _encoders(method: Method) -> list[str]:
    """The sslsv prefixes of the method's encoders (each has its own front end)."""
    _, renames = method.sslsv_momentum or (None, {})
    return ["encoder", *([renames["encoder"]] if "encoder" in renames else [])]


def _constants(method: Method, layout: dict[str, _Slot], mel: features.LogMelConfig) -> dict[str, np.ndarray]:
    """What sslsv's state_dict holds beside our variables: front ends, weight_g, BatchNorm counters."""
    out = {}
    window, filterbank = torchaudio_window(mel), torchaudio_filterbank(mel)
    for encoder in _encoders(method):
        out[f"{encoder}.{WINDOW}"] = window
        out[f"{encoder}.{FILTERBANK}"] = filterbank
    for key, slot in layout.items():
        module, leaf = key.rsplit(".", 1)
        if leaf == "running_mean":
            out[f"{module}.num_batches_tracked"] = np.zeros((), np.int64)
        elif leaf == "weight_v":  # weight_norm's g of a Linear: one per output unit, (out, 1)
            out[f"{module}.weight_g"] = np.ones((slot.shape[0], 1), np.float32)
    return out


def torchaudio_window(mel: features.LogMelConfig) -> np.ndarray:
    """Spectrogram's `window` buffer: window_fn(win_length), periodic, float32 (torch's own window functions)."""
    import torch

    fn = {"hamming": torch.hamming_window, "hann": torch.hann_window}[mel.window]
    return fn(mel.win_length).numpy()


def torchaudio_filterbank(mel: features.LogMelConfig) -> np.ndarray:
    """MelScale's `fb` buffer (n_fft // 2 + 1, n_mels), float32 as torchaudio computes it.

    The same triangles as features.mel_filterbank (HTK mel scale from 0 Hz to sample_rate // 2, no
    normalisation), with torchaudio's float32 arithmetic: frequencies on a float32 linspace, mel points
    evenly spaced in float32 between the mels of the band edges, each filter the smaller of its rising
    and falling slope, clipped at 0.
    """
    import torch

    top = float(mel.sample_rate // 2)
    freqs = torch.linspace(0.0, top, mel.n_fft // 2 + 1)
    mels = torch.linspace(0.0, 2595.0 * math.log10(1.0 + top / 700.0), mel.n_mels + 2)
    edges = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)  # (n_mels + 2,) Hz
    widths = edges[1:] - edges[:-1]
    offsets = edges[None, :] - freqs[:, None]  # (n_freqs, n_mels + 2)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0).numpy()


# --- import -----------------------------------------------------------------------------------------------------


def load_sslsv(checkpoint: epath.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """(state_dict as float/int NumPy arrays, the other entries of the file) of an sslsv checkpoint.

    Accepts sslsv's {"model": state_dict, "epoch", ...} and a bare state_dict.
    """
    torch = _torch()
    checkpoint = epath.Path(checkpoint)
    if not checkpoint.is_file():
        raise InputError(f"sslsv checkpoint {checkpoint} not found")
    try:
        with paths.readable(checkpoint) as source:
            data = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "safe_globals" not in str(error):  # torch's advice when the file holds classes it does not allow
            raise InputError(f"{checkpoint} is not a PyTorch checkpoint: {_first_line(error)}") from error
        # Other Python objects than tensors and containers (a trainer's NumPy scalars) need the full
        # unpickler, which can run code: as torch itself says, only for files of a trusted origin.
        logger.warning("%s holds Python objects other than tensors: loaded with the full unpickler", checkpoint)
        data = _full_load(torch, checkpoint)
    except Exception as error:  # a truncated file, another format: torch's own error
        raise InputError(f"{checkpoint} is not a PyTorch checkpoint: {_first_line(error)}") from error
    if not isinstance(data, dict):
        raise InputError(f"{checkpoint} holds a {type(data).__name__}, not sslsv's {{'model': state_dict, ...}}")
    state_dict = data.get("model", data)
    extras = {k: v for k, v in data.items() if k != "model"} if state_dict is not data else {}
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(f"{checkpoint}: its state_dict has non-tensor entries {_few(bad)}")
    return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}, extras


def import_sslsv(checkpoint: epath.PathLike, config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
    """Makes `workdir` a workdir of `config` holding the weights of the sslsv checkpoint `checkpoint` (step 0).

    Every params / batch_stats array of the config's model comes from its sslsv key (shape checked); DINO's
    teacher and centre, MoCo's key network from the momentum modules; other method state (MoCo's and
    SwAV's queues) starts as at the start of training. Writes `workdir`/config.json (as `train` does) and
    checkpoint 0, marked imported: `train(config, workdir)` continues from it, with a fresh optimizer and
    the input stream at its beginning; `evaluate`, `extract`, `Verifier` use it directly.

    Returns a report: {"checkpoint", "workdir", "method", "encoder", "sslsv_epoch", "imported" (how many
    arrays), "ignored" (sslsv keys by reason), "fresh" (what starts as at the start of training)}.
    Raises InputError naming the keys (missing, unexpected, wrong shape with the config field that
    probably differs, a front end other than the config's, weight_g != 1) or a workdir with checkpoints.
    """
    from ssps_jax import checkpoint as checkpoint_lib
    from ssps_jax import config as config_lib
    from ssps_jax import sharding
    from ssps_jax.observe import say
    from ssps_jax.train import save_config

    checkpoint, workdir = epath.Path(checkpoint), epath.Path(workdir)
    ckpt_dir = workdir / "checkpoints"
    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        raise InputError(f"{ckpt_dir} already holds checkpoints: import into a new workdir")
    state_dict, extras = load_sslsv(checkpoint)
    mesh = sharding.make_mesh()
    config_lib.validate(config, device_count=mesh.size, data_on_disk=False)

    # Checked against the state's shapes: nothing is compiled, nothing allocated before the file is accepted.
    method, _, like = build_for_inference(config, mesh, abstract=True)
    shapes = _tree(like)
    layout = _layout(method, shapes)
    constants = _constants(method, layout, features.LogMelConfig(**config.model.mel))
    skipped = {
        "ssps": sorted(k for k in state_dict if k.startswith(SSPS_PREFIX)),
        "method buffers": sorted(k for k in method.sslsv_not_imported if k in state_dict),
    }
    _check_keys(checkpoint, state_dict, set(layout) | set(constants), {k for v in skipped.values() for k in v}, config)
    _check_constants(checkpoint, state_dict, constants, config.model.mel.window)
    _check_shapes(checkpoint, state_dict, layout, config)

    flat = traverse_util.flatten_dict(shapes)
    values = {
        slot.where: slot.from_torch(state_dict[key]).astype(flat[slot.where].dtype) for key, slot in layout.items()
    }
    # Method state: as the method initialises it from the imported variables, then what sslsv holds of it.
    imported = traverse_util.unflatten_dict(values)
    variables = {"params": imported["params"], "batch_stats": imported.get("batch_stats", {})}
    method_state = method.init_state(config, variables)
    fresh = ["optimizer state (and the schedules' step): starts fresh"]
    if method_state is not None:
        for entry in method_state:
            if entry in imported:
                method_state[entry] = imported[entry]
            else:
                fresh.append(f"method state {entry!r}: initialised as at the start of training")
    new = {"params": variables["params"], "batch_stats": variables["batch_stats"], **(method_state or {})}
    new = jax.tree.map(_placed, new, shapes)
    state = like.replace(
        step=_placed(np.zeros((), like.step.dtype), like.step),
        rng=_placed(np.asarray(seed_keys(config.seed)[1]), like.rng),
        params=new["params"],
        batch_stats=new["batch_stats"],
        method_state=None if method_state is None else {k: new[k] for k in method_state},
    )

    workdir.mkdir(parents=True, exist_ok=True)
    save_config(config, workdir)
    epoch = extras.get("epoch")
    meta = {
        "step": 0,
        "epoch": 0,
        "imported": {"format": FORMAT, "from": str(checkpoint), "sslsv_epoch": _plain(epoch)},
    }
    ckpt = checkpoint_lib.Checkpointer(ckpt_dir)
    try:
        ckpt.save(0, state, None, meta)
        ckpt.wait()
    finally:
        ckpt.close()

    constants_by_kind = {
        "num_batches_tracked": sorted(k for k in constants if k.endswith("num_batches_tracked")),
        "front end": sorted(k for k in constants if k.endswith((WINDOW, FILTERBANK))),
        "weight_g": sorted(k for k in constants if k.endswith("weight_g")),
    }
    report = {
        "checkpoint": str(checkpoint),
        "workdir": str(workdir),
        "method": config.method,
        "encoder": config.model.encoder,
        "sslsv_epoch": _plain(epoch),
        "imported": len(layout),
        "ignored": {**constants_by_kind, **{k: v for k, v in skipped.items() if v}},
        "fresh": fresh,
    }
    say(f"imported {len(layout)} arrays of {checkpoint} into {workdir} (checkpoint 0)")
    for line in fresh:
        say(f"  {line}")
    if skipped["ssps"]:
        say(f"  sslsv's SSPS queues ({len(skipped['ssps'])} buffers): not imported, refilled by an SSPS run")
    return report


def _tree(state) -> dict:
    """{"params", "batch_stats", **method_state}: the arrays of a state that sslsv's state_dict can hold."""
    return {"params": state.params, "batch_stats": state.batch_stats, **(state.method_state or {})}


def _check_keys(checkpoint: epath.Path, state_dict: dict, expected: set, ignorable: set, config) -> None:
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected - ignorable)
    if missing or unexpected:
        problems = [f"{len(missing)} missing key(s) {_few(missing)}"] if missing else []
        problems += [f"{len(unexpected)} unexpected key(s) {_few(unexpected)}"] if unexpected else []
        raise InputError(
            f"{checkpoint} does not hold the {config.method} / {config.model.encoder} model of the config: "
            + "; ".join(problems)
        )


def _check_shapes(checkpoint: epath.Path, state_dict: dict, layout: dict[str, _Slot], config) -> None:
    wrong = sorted(key for key, slot in layout.items() if state_dict[key].shape != slot.shape)
    if wrong:
        shown = "; ".join(
            f"{key} is {state_dict[key].shape}, the config's model needs {layout[key].shape} "
            f"({likely_config_key(layout[key].where, config)} probably differs)"
            for key in wrong[:3]
        )
        more = f"; and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise InputError(f"{checkpoint}: {len(wrong)} array(s) of another shape than the config's: {shown}{more}")


def _check_constants(checkpoint: epath.Path, state_dict: dict, constants: dict, window: str) -> None:
    """The front ends are the config's; every weight_g is 1 (sslsv fixes it; our layer has no g)."""
    for key, want in constants.items():
        got = state_dict[key]
        if key.endswith("weight_g"):
            if not np.all(got == 1):
                raise InputError(
                    f"{checkpoint}: {key} is not all ones (min {got.min():.6g}, max {got.max():.6g}): sslsv fixes "
                    "the weight-normalised layer's g at 1 and ours has none, so this model cannot be imported"
                )
        elif key.endswith(WINDOW) or key.endswith(FILTERBANK):
            if got.shape != want.shape:
                sizes = ("win_length",) if key.endswith(WINDOW) else ("n_fft", "n_mels")
                field = " / ".join(f"model.mel.{n}" for n, a, b in zip(sizes, got.shape, want.shape) if a != b)
                raise InputError(
                    f"{checkpoint}: {key} has shape {got.shape}, the config's front end {want.shape}: {field} differs "
                    "(the model was trained on other features)"
                )
            if not np.allclose(got, want, atol=_FRONT_END_ATOL, rtol=0):
                what = f"model.mel.window ({window!r})" if key.endswith(WINDOW) else "the HTK mel filterbank"
                raise InputError(
                    f"{checkpoint}: {key} is not {what} of the config (max difference "
                    f"{np.max(np.abs(got - want)):.3g}): the model was trained on other features"
                )


def _placed(value, like) -> jax.Array:
    """`value` (host or device) as a global array of `like`'s shape and sharding (same value on every process)."""
    host = np.asarray(value, like.dtype)
    return jax.make_array_from_callback(like.shape, like.sharding, lambda index: host[index])


# --- export -----------------------------------------------------------------------------------------------------


def export_sslsv(source, out: epath.PathLike, step: int | None = None) -> epath.Path:
    """Writes the model of `source` as an sslsv checkpoint `out`: torch.save({"model": state_dict, "epoch"}).

    `source`: a workdir (checkpoint `step`, default the newest) or a TrainedModel (its workdir and step).
    The state_dict holds our variables in torch layout, DINO's teacher (`*_momentum.`) and centre, MoCo's
    key network, the front-end buffers computed from the config as torchaudio holds them, weight_g ones
    and num_batches_tracked zeros: every key sslsv's strict `load_state_dict` asks of SimCLR, DINO and
    the other methods without queues. MoCo's and SwAV's queues are not written (sslsv's own loaders use
    strict=False and keep the model's). "epoch" is the epochs trained, as sslsv counts them.
    """
    from ssps_jax import checkpoint as checkpoint_lib
    from ssps_jax import sharding
    from ssps_jax.inference import TrainedModel, inference_config
    from ssps_jax.observe import say

    torch = _torch()
    if isinstance(source, TrainedModel):
        workdir, step, config = source.workdir, source.step, source.config
    else:
        workdir, config = epath.Path(source), inference_config(source)
    # Restored into zeros of the state's layout: no model compiled.
    method, _, like = build_for_inference(config, sharding.make_mesh(), abstract=True)
    state = jax.tree.map(lambda x: _placed(np.zeros(x.shape, x.dtype), x), like)
    ckpt = checkpoint_lib.Checkpointer(epath.Path(workdir) / "checkpoints", read_only=True)
    try:
        step, state, meta = ckpt.restore_for_use(state, step, config)
    finally:
        ckpt.close()

    tree = _tree(state)
    flat = traverse_util.flatten_dict(tree)
    layout = _layout(method, tree)
    arrays = {key: slot.to_torch(np.asarray(flat[slot.where])) for key, slot in layout.items()}
    arrays.update(_constants(method, layout, features.LogMelConfig(**config.model.mel)))
    state_dict = {key: torch.from_numpy(np.array(value, order="C")) for key, value in sorted(arrays.items())}
    out = epath.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:  # torch writes a file object: a gs:// path too
        torch.save({"model": state_dict, "epoch": int(meta.get("epoch", 0))}, f)
    left_out = sorted(set(state.method_state or {}) - {slot.where[0] for slot in layout.values()})
    say(f"wrote {out}: {len(state_dict)} tensors of {workdir} step {step} in sslsv's layout")
    if left_out:
        say(f"  method state not exported (sslsv creates its own): {', '.join(left_out)}")
    return out


# --- helpers ----------------------------------------------------------------------------------------------------


def _torch():
    try:
        import torch
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise InputError(
            "reading and writing sslsv checkpoints needs torch: pip install 'ssps-jax[test]' or 'ssps-jax[bench]' "
            "(CPU: pip install torch)"
        ) from error
    return torch


def _full_load(torch, checkpoint: epath.Path):
    try:
        with paths.readable(checkpoint) as source:
            return torch.load(source, map_location="cpu", weights_only=False)
    except Exception as error:
        raise InputError(f"{checkpoint} cannot be read: {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    """The gist of an error: its first line, or what torch's weights-only unpickler found (after its preamble)."""
    text = str(error).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0].strip()
    return text.splitlines()[0] if text else type(error).__name__


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}]"


def _plain(value):
    """A JSON-able copy of a checkpoint's scalar (sslsv's epoch: int), or None."""
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return str(value)
