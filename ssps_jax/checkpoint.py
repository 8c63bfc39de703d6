"""Checkpoints with orbax: train state, input-pipeline position and metadata, together.

One checkpoint per saved step under <workdir>/checkpoints/<step>/:
  state  the TrainState (params, optimizer, BatchNorm statistics, step, RNG),
         written asynchronously from every process;
  data   grain's iterator state (one JSON per process): the exact position in
         the shuffled, augmented input stream;
  meta   JSON: epoch, global batch, and what else the run wants to find again.
A checkpoint of imported weights (`ssps-jax import-sslsv`) has no `data`
item and says so in its meta (`"imported"`): a run continued from it starts
the input stream at its beginning.
Orbax writes to a temporary folder and renames it when complete, so a run
killed mid-save leaves the previous checkpoint as the latest.

Replicated arrays (parameters, optimizer and BatchNorm state) are saved from
one host copy: every device holds the same values, and orbax's per-device
replica handling costs ~4x more (2.3 s vs 0.6 s a save for a small model on
8 CPU devices). Only sharded arrays (the SSPS queues) are saved as jax.Arrays,
each process writing its own shards.

The state's top-level fields restore independently: a checkpoint with SSPS
queues can continue as a run without SSPS (the fair baseline), and a plain
checkpoint as an SSPS run (its queues start empty); what is dropped or kept
fresh is reported.

Another model: before anything is restored (or, in training, moved or
written), the checkpoint's tree of arrays (paths, shapes, dtypes, from
orbax's metadata) must be the one the config builds (`check_matches`);
otherwise CheckpointMismatchError names the first differing array and the
config key that probably differs, and the CLI exits 2. The restore target
itself mirrors the checkpoint's tree (PLACEHOLDER where nothing is read), so
orbax refuses a tree of another structure rather than hand back unfilled
arrays, and every array read is checked against the shape asked for.

Faults (`restore_newest`): a checkpoint folder that is not complete or whose
stored values cannot all be read back (a crash of the storage layer, a bad
copy) is skipped with a one-line warning, and the next older one is used;
training moves skipped folders to <workdir>/checkpoints_skipped/ (never
deletes them), so that the steps it saves again do not collide with them and
nothing is lost. A full disk while saving stops the run with one line
(ssps_jax/storage.py); the checkpoint being written never becomes visible.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from data_pipelines import paths
from data_pipelines.errors import ConfigError, InputError
from ssps_jax import methods, storage
from ssps_jax.ssps.state import RESTORE_GROUPS, SSPSState
from ssps_jax.train_state import TrainState, as_dict, from_dict

logger = logging.getLogger(__name__)

SKIPPED_DIR = "checkpoints_skipped"  # beside checkpoints/: where damaged checkpoints are moved
COMMIT_FILE = "commit_success.txt"  # orbax writes it into a step folder once every item is written
ITEMS = ("state", "data", "meta")


# The fields a mismatch is looked for in first: the model's arrays say best what differs.
FIELD_ORDER = ("params", "batch_stats", "step", "rng", "opt_state")


class NoReadableCheckpointError(InputError):
    """Checkpoints exist, and none of them can be read back."""


class CheckpointMismatchError(ConfigError):
    """A checkpoint holds another model (or optimizer) than the config builds; nothing is restored."""


def _quiet_failed_io_echoes() -> None:
    """Keeps the echoes of one failed checkpoint read or write off the terminal; the failure itself is reported.

    When one of orbax's reads or writes fails (a damaged file, a full disk), orbax's event loop ends
    while TensorStore still completes the other operations; each then schedules its result on that
    closed loop, which raises `RuntimeError: Event loop is closed` in a TensorStore thread, printed
    as a traceback (hundreds of them, saying nothing about the failure). Scheduling on a closed loop
    is dropped instead: nothing can run there any more. Orbax also logs the failure again from each
    of its signalling threads; those records are filtered from the absl logger. When a full disk fails
    the writes of several sharded arrays at once (the optimizer state split over the devices), orbax
    retrieves the first failure and asyncio logs each other one at exit ("Task exception was never
    retrieved"): filtered from the asyncio logger when the failure is the storage-full one reported.
    """
    loop_class = asyncio.BaseEventLoop
    if getattr(loop_class.call_soon_threadsafe, "_drops_when_closed", False):
        return
    schedule = loop_class.call_soon_threadsafe

    def call_soon_threadsafe(self, *args, **kwargs):
        if self.is_closed():
            return None
        return schedule(self, *args, **kwargs)

    call_soon_threadsafe._drops_when_closed = True
    loop_class.call_soon_threadsafe = call_soon_threadsafe
    logging.getLogger("absl").addFilter(_not_an_io_echo)
    logging.getLogger("asyncio").addFilter(_not_an_io_echo)


def _not_an_io_echo(record: logging.LogRecord) -> bool:
    """False for orbax's own logs of a failure that the run reports in one line (a full disk), or repeats, and for
    its note that a manager opened read-only (evaluation, export) is read-only."""
    if "_SignalingThread.run() raised an exception" in record.getMessage():
        return False
    if record.msg == "Given directory is read only=%s":  # said of every read_only manager: evaluation asks for it
        return False
    return not (record.exc_info and storage.full_cause(record.exc_info[1]))


class Checkpointer:
    def __init__(self, directory: epath.PathLike, keep: int = 3, async_save: bool = True, read_only: bool = False):
        """`read_only`: for evaluation and export, which write nothing there (not even the folder)."""
        _quiet_failed_io_echoes()
        self.directory = paths.absolute(directory)
        self._saving: int | None = None  # the step of an async save that may still be in flight
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None if read_only else keep,
                save_interval_steps=0 if read_only else 1,
                enable_async_checkpointing=async_save,
                create=not read_only,
                read_only=read_only,
                # A save cut short by a kill or a full disk: never a checkpoint.
                cleanup_tmp_directories=not read_only,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, iterator: grain.DatasetIterator | None, meta: dict) -> None:
        """Saves (asynchronously) `state`, the input position of `iterator` and `meta` as checkpoint `step`.

        `iterator` None: no input position (imported weights), and `meta` must say so with an "imported" entry.
        """
        if iterator is None and "imported" not in meta:
            raise ValueError("a checkpoint without an input position must be marked 'imported' in its meta")
        items = {
            "state": ocp.args.PyTreeSave(_host_copies(as_dict(state))),
            "meta": ocp.args.JsonSave(meta),
        }
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(iterator)
        # An async save that failed raises here, at the next save: name the step it was writing.
        with storage.writing(self.directory / str(self._saving or step), f"checkpoint {self._saving or step}"):
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._saving = step

    def damage(self, step: int) -> str | None:
        """Why checkpoint `step` cannot be restored completely, in a few words; None if it can.

        Checks that orbax finalised it, that its JSON items parse, and that every value of the
        state's OCDBT store reads back (one by one through TensorStore, so nothing half-restored is left).
        """
        path = self.directory / str(step)
        if not (path / COMMIT_FILE).is_file():
            return f"incomplete (no {COMMIT_FILE})"
        for item in ITEMS:
            if not (path / item).is_dir() and not (item == "data" and _imported(path)):
                return f"incomplete (no {item}/)"
        for file in [path / "meta" / "metadata", *sorted((path / "data").glob("*.json"))]:
            try:
                json.loads(file.read_text())
            except (OSError, ValueError) as e:
                return f"{file.relative_to(path)} unreadable ({_first_line(e)})"
        try:
            store = ts.KvStore.open({"driver": "ocdbt", "base": _kvstore_url(path / "state")}).result()
            keys = store.list().result()
            if not keys:
                return "state/ holds no values"
        except Exception as e:  # TensorStore reports a damaged store as ValueError or OSError, with its own text
            return f"state/ unreadable ({_first_line(e)})"
        for key in keys:
            try:
                store.read(key).result()
            except Exception as e:
                return f"state/ value {key.decode(errors='replace')} unreadable ({_first_line(e)})"
        return None

    def restore_newest(
        self,
        like: TrainState,
        iterator: grain.DatasetIterator | None = None,
        move_aside: bool = True,
        config: ml_collections.ConfigDict | None = None,
    ):
        """(step, state, meta) of the newest checkpoint that restores completely; None if there are none.

        Damaged ones are skipped with one warning line each and, with `move_aside` (training), moved
        to <workdir>/checkpoints_skipped/. Raises NoReadableCheckpointError when none is readable, and
        CheckpointMismatchError (before anything is moved) when the newest readable one holds another
        model than `like` (`config`, the one `like` was built from, names the key that probably differs).
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        damaged, readable = {}, None
        for step in steps:
            if (why := self.damage(step)) is None:
                readable = step
                break
            damaged[step] = why
        if readable is not None:
            self.check_matches(readable, like, config)  # refused before anything is moved or restored
        for step, why in damaged.items():
            where = self._move_aside(step) if move_aside else None
            moved = f"; moved to {where}" if where else ""
            logger.warning("checkpoint %d skipped: %s%s", step, why, moved)
        if readable is not None:
            return (readable, *self.restore(readable, like, iterator))
        if steps:
            raise NoReadableCheckpointError(
                f"none of the {len(steps)} checkpoint(s) in {self.directory} can be read back "
                f"(steps {', '.join(map(str, steps))}; see the warnings above)"
            )
        return None

    def restore_for_use(
        self, like: TrainState, step: int | None = None, config: ml_collections.ConfigDict | None = None
    ):
        """(step, state, meta) of checkpoint `step`, or of the newest readable one: for evaluation and export.

        Damaged checkpoints are skipped with a warning and left where they are; a `step` that is
        missing or damaged is an InputError naming it; one of another model, a CheckpointMismatchError.
        """
        if step is None:
            if (restored := self.restore_newest(like, move_aside=False, config=config)) is None:
                raise InputError(f"no checkpoint in {self.directory}")
            return restored
        if step not in self.manager.all_steps():
            raise InputError(f"no checkpoint {step} in {self.directory}")
        if why := self.damage(step):
            raise InputError(f"checkpoint {step} in {self.directory} cannot be read back: {why}")
        self.check_matches(step, like, config)
        return (step, *self.restore(step, like))

    def check_matches(self, step: int, like: TrainState, config: ml_collections.ConfigDict | None = None) -> None:
        """Raises CheckpointMismatchError unless checkpoint `step` holds `like`'s arrays: same paths, shapes, dtypes.

        Compared from the checkpoint's metadata (no array is read), over the fields `like` restores but
        the SSPS queues (whose groups of other sizes start fresh, see `restore`). The error names the
        first differing array and, with `config` (the one `like` was built from), the key that
        probably differs.
        """
        saved = self.manager.item_metadata(step)["state"]
        saved_leaves, wanted_leaves = _leaves(saved), _leaves(as_dict(like))
        fields = [f for f in FIELD_ORDER if f in saved_leaves and f in wanted_leaves]
        fields += sorted((set(saved_leaves) & set(wanted_leaves)) - set(fields) - {"ssps"})
        for field in fields:
            if (found := _first_difference(saved_leaves[field], wanted_leaves[field])) is None:
                continue
            path, what = found
            key = likely_config_key((field, *path), config) if config is not None else "the config"
            raise CheckpointMismatchError(
                f"checkpoint {step} in {self.directory} holds another model than the config builds: "
                f"{'/'.join((field, *path))} {what} ({key} probably differs). Nothing was restored or written: "
                "run with the config the workdir was trained with, or train the new one in another workdir"
            )

    def _move_aside(self, step: int) -> epath.Path:
        """Moves checkpoint `step` to checkpoints_skipped/<step>[.N] (process 0; the others wait for it)."""
        aside = self.directory.parent / SKIPPED_DIR / str(step)
        n = 0
        while aside.exists():
            n += 1
            aside = aside.with_name(f"{step}.{n}")
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()
        return aside

    def restore(self, step: int, like: TrainState, iterator: grain.DatasetIterator | None = None):
        """(state, meta) of checkpoint `step`, laid out like the state `like`.

        Also moves `iterator` to the checkpoint's position in the input stream.
        Fields of `like` that are None are not restored: saying which is left
        out only while training (an `iterator` is given); evaluation leaves out
        the optimizer and the SSPS queues on purpose.
        """
        metadata = self.manager.item_metadata(step)["state"]
        saved = set(metadata.keys())
        wanted = as_dict(like)
        if missing := sorted(set(wanted) - saved):
            logger.warning("checkpoint %d has no %s: kept as initialised", step, ", ".join(missing))
        if iterator is not None and (dropped := sorted(saved - set(wanted))):
            logger.warning("checkpoint %d has %s, which this run does not use: not restored", step, ", ".join(dropped))
        wanted = {k: v for k, v in wanted.items() if k in saved}
        if "ssps" in wanted:
            wanted["ssps"] = _restorable_ssps(metadata["ssps"], like.ssps, step)
        # The target mirrors the checkpoint's tree exactly: each array to restore as its shape and dtype
        # (no buffer), PLACEHOLDER wherever nothing is restored. Orbax refuses any other structure, so no
        # array can come back unfilled: with `partial_restore`, a path the checkpoint lacks came back as
        # the target's own value, and targets made with np.empty handed uninitialised memory to a
        # restore into another model.
        target = {field: _placeholders(metadata[field]) for field in saved}
        for field, value in wanted.items():
            target[field] = {**target[field], **value} if field == "ssps" else value
        target = jax.tree.map(_target, target, is_leaf=_is_placeholder)
        items = {
            "state": ocp.args.PyTreeRestore(
                target, restore_args=jax.tree.map(_restore_args, target, is_leaf=_is_placeholder)
            ),
            "meta": ocp.args.JsonRestore(),
        }
        if iterator is not None and (self.directory / str(step) / "data").is_dir():
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        elif iterator is not None:
            logger.warning("checkpoint %d holds imported weights: the input stream starts at its beginning", step)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = dict(restored["state"])

        def asked(tree: dict, field: str):  # of the SSPS state, only the groups restored (the others are fresh)
            return {k: tree[field][k] for k in wanted[field]} if field == "ssps" else tree[field]

        fields = {field: asked(state, field) for field in wanted}
        fields = jax.tree.map(_placed, fields, {field: asked(target, field) for field in wanted}, wanted)
        return from_dict(like, fields), restored["meta"]

    def wait(self) -> None:
        with storage.writing(self.directory / str(self._saving or ""), f"checkpoint {self._saving or ''}"):
            self.manager.wait_until_finished()
        self._saving = None

    def close(self) -> None:
        self.manager.close()


def _leaves(tree) -> dict[str, dict[tuple[str, ...], tuple[tuple[int, ...], str]]]:
    """field -> {path in the field: (shape, dtype)} of every array of a state dict (as_dict) or of its metadata."""
    out = {}
    for field, value in tree.items():
        flat, _ = jax.tree_util.tree_flatten_with_path(value)
        out[field] = {
            tuple(_key_name(k) for k in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
            for path, leaf in flat
            if hasattr(leaf, "shape")
        }
    return out


def _key_name(key) -> str:
    for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey (named tuples), SequenceKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _first_difference(saved: dict, wanted: dict) -> tuple[tuple[str, ...], str] | None:
    """(path, what differs) of the first array (in path order) that the two leaf tables do not share alike."""
    for path in sorted(saved.keys() | wanted.keys()):
        if path not in wanted:
            return path, "is in the checkpoint but not in the config's model"
        if path not in saved:
            return path, "is in the config's model but not in the checkpoint"
        if saved[path] != wanted[path]:
            (a, a_type), (b, b_type) = saved[path], wanted[path]
            return path, f"is {a} {a_type} in the checkpoint, {b} {b_type} in the config's model"
    return None


# The encoders' own top-level modules (beside the `fc` both have).
_ENCODER_MODULES = {
    "ecapa_tdnn": re.compile(r"(blocks_\d+|mfa|asp|asp_bn)"),
    "resnet34": re.compile(r"(conv|bn|block\d+_\d+|pooling)"),
}


def likely_config_key(path: tuple[str, ...], config: ml_collections.ConfigDict) -> str:
    """The config key that most probably sets the array at `path` of a state (as_dict's layout, e.g.
    ("params", "encoder", "blocks_1", "se_block", "conv1", "conv", "bias")): for errors about weights of another
    model, from a checkpoint or an sslsv file."""
    parts = list(path)
    if parts[0] == "opt_state":
        return "optim.optimizer or another optim key"
    if parts[0] in ("step", "rng"):
        return "the framework version"
    sizes = methods.get(config.method).sslsv_sizes  # the config fields that size each of the method's modules
    if parts[0] not in ("params", "batch_stats"):  # method state: a momentum network, DINO's centre, queues
        if len(parts) > 2 and parts[1] in ("params", "batch_stats"):
            parts = parts[1:]
        else:
            return sizes.get(parts[0], f"method ({config.method}'s state {parts[0]!r})")
    module = parts[1] if len(parts) > 1 else ""
    if module != "encoder":
        return sizes.get(module, "method")
    child = parts[2] if len(parts) > 2 else ""
    if child == "fc":
        return "model.encoder_dim"
    kind = next((name for name, modules in _ENCODER_MODULES.items() if modules.fullmatch(child)), None)
    if kind is not None and kind != config.model.encoder:
        return "model.encoder"
    if config.model.encoder == "resnet34":
        return "model.resnet34.base_dim / layers (or model.mel.n_mels)"
    if "se_block" in parts:
        return "model.ecapa_tdnn.se_channels"
    if child == "asp" and parts[3:4] == ["tdnn"]:
        return "model.ecapa_tdnn.attention_channels / channels"
    if child == "blocks_0":
        return "model.mel.n_mels / model.ecapa_tdnn.channels"
    return "model.ecapa_tdnn.channels"


def _is_placeholder(x) -> bool:
    return x is ocp.PLACEHOLDER


def _placeholders(saved) -> dict:
    """A tree of the checkpoint's structure (of one of its fields' metadata) with PLACEHOLDER at every array."""
    return jax.tree.map(lambda _: ocp.PLACEHOLDER, saved)


def _target(x):
    """An array to restore as its shape and dtype only (and its sharding when sharded); placeholders as they are."""
    if _is_placeholder(x):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=None if x.is_fully_replicated else x.sharding)


def _restore_args(x) -> ocp.RestoreArgs:
    """Replicated arrays are read once, as host arrays (placed on the devices by `_placed`); sharded ones, by shard."""
    if _is_placeholder(x):
        return ocp.RestoreArgs()
    if x.sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
    return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)


def _placed(restored, target: jax.ShapeDtypeStruct, like) -> jax.Array:
    """A restored array checked against its target, laid out like `like` (replicated arrays: from the host copy)."""
    if not isinstance(restored, (np.ndarray, jax.Array)) or restored.shape != target.shape:
        raise RuntimeError(f"orbax restored {type(restored).__name__} {getattr(restored, 'shape', '')} for {target}")
    if target.sharding is not None:
        return restored
    return jax.make_array_from_callback(like.shape, like.sharding, lambda index: restored[index])


def _imported(path: epath.Path) -> bool:
    """Whether the checkpoint folder `path` holds imported weights (its meta says so): it has no input position."""
    try:
        return "imported" in json.loads((path / "meta" / "metadata").read_text())
    except (OSError, ValueError):
        return False


def _kvstore_url(folder: epath.Path) -> str:
    """TensorStore's URL of a folder: gs:// (or another store's URI) as it is, a local folder as file://."""
    return f"{folder}/" if paths.is_remote(folder) else f"file://{folder}/"


def _first_line(error: BaseException) -> str:
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _restorable_ssps(saved: dict, fresh: SSPSState, step: int) -> dict:
    """The SSPS fields to restore: whole groups whose saved shapes match this run's."""
    fields, fresh_groups = {}, []
    for group in RESTORE_GROUPS:
        if all(name in saved and tuple(saved[name].shape) == getattr(fresh, name).shape for name in group):
            fields.update({name: getattr(fresh, name) for name in group})
        else:
            fresh_groups.append("/".join(group))
    if fresh_groups:
        logger.warning(
            "checkpoint %d: SSPS %s saved with other sizes than this run's: started fresh",
            step,
            ", ".join(fresh_groups),
        )
    return fields


def _host_copies(state):
    """Replicated arrays as host arrays (any replica); sharded ones unchanged."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if x.is_fully_replicated else x, state)
