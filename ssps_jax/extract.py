"""`ssps-jax extract`: the embeddings of a list of recordings, in one .npz, resumably.

The output holds `embeddings` (N, D) float32, L2-normalised (the cosine of two
rows is evaluation's raw score), `ids` (N,) the files as listed, `step` the
checkpoint used and `workdir`. Embedding is evaluation's: whole recordings in
padding-masked length buckets (ssps_jax/evaluation/embedding.py), audio read in
a thread pool one batch ahead and dropped once embedded.

Resumable (VoxCeleb2 dev is 1.09 M files): the list is embedded in parts of
`part_files` files, each saved to <out>.parts/<i>.npy when whole (renamed into
place); a rerun of the same command embeds only the missing parts, then all
parts are joined into <out> and the folder removed. The folder records what it
was made from (workdir, checkpoint step, the list): a rerun with anything else
is refused rather than mixing two models' embeddings.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import time

import jax
import numpy as np
from etils import epath

from data_pipelines import audio_io
from data_pipelines.errors import InputError
from data_pipelines.manifests import csv_text, read_trials
from data_pipelines.paths import absolute, is_remote
from data_pipelines.staging import duration
from ssps_jax.evaluation.embedding import l2_normalise
from ssps_jax.evaluation.verification import MIN_SECONDS, audio_lengths
from ssps_jax.inference import TrainedModel, inference_config
from ssps_jax.observe import say

PART_FILES = 10000
_KEY = "source.json"  # in the parts folder: what its parts were made from


def read_file_list(path: epath.PathLike, trials: bool = False) -> list[str]:
    """The files of a train/test CSV (its `File` column), of a VoxCeleb-format trial list (`trials`: its enrol and
    test files, in order of first appearance) or of a text list (one path per line; blank and # lines skipped)."""
    path = epath.Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file list not found")
    if trials:
        files = list(dict.fromkeys(f for t in read_trials(path) for f in (t.enrol, t.test)))
    elif path.suffix == ".csv":
        reader = csv.DictReader(csv_text(path))
        if "File" not in (reader.fieldnames or []):
            raise InputError(f"{path}: no File column (columns: {', '.join(reader.fieldnames or [])})")
        files = [row["File"] for row in reader]
    else:
        files = [line.strip() for line in path.read_text().splitlines()]
        files = [f for f in files if f and not f.startswith("#")]
    if not files:
        raise InputError(f"{path}: lists no file")
    if twice := [f for f, n in collections.Counter(files).items() if n > 1]:
        raise InputError(f"{path}: lists {len(twice)} file(s) more than once, e.g. {twice[0]}")
    return files


def extract(
    workdir: epath.PathLike,
    files: list[str],
    out: epath.PathLike,
    base_dir: epath.PathLike | None = None,
    step: int | None = None,
    part_files: int = PART_FILES,
    read_threads: int = 8,
) -> epath.Path:
    """Embeds `files` with checkpoint `step` of `workdir` (default the newest); writes `out`.

    Relative files are under `base_dir`, by default the folder evaluation reads (eval.base_dir or data.base_dir).
    """
    config = inference_config(workdir)
    out, base_dir = epath.Path(out), epath.Path(base_dir or config.eval.base_dir or config.data.base_dir)
    if not is_remote(out) and not out.parent.is_dir():  # an object store has no folders to check
        raise InputError(f"--out: folder {out.parent} does not exist")
    audio = [base_dir / f for f in files]
    if missing := [str(p) for p in audio if not p.is_file()]:  # fail before restoring or embedding anything
        raise InputError(f"{len(missing)} of the {len(files)} listed files are missing, e.g. {missing[0]}")
    trained = TrainedModel.from_workdir(workdir, step, config=config)
    parts = out.with_name(out.name + ".parts")
    starts = list(range(0, len(files), part_files))
    _claim(parts, {"workdir": str(absolute(workdir)), "step": trained.step, "files": _digest(files)})
    todo = [i for i in range(len(starts)) if not (parts / f"{i}.npy").is_file()]
    if len(todo) < len(starts):
        say(f"resuming {out}: {len(starts) - len(todo)} of {len(starts)} parts already embedded")
    embedder = trained.embedder()
    started, done = time.perf_counter(), 0
    total = sum(min(part_files, len(files) - starts[i]) for i in todo)
    for i in todo:
        chunk = audio[starts[i] : starts[i] + part_files]
        emb = embedder.embed(
            trained.variables,
            audio_lengths(chunk, read_threads),
            lambda j, chunk=chunk: audio_io.read_audio(chunk[j], min_seconds=MIN_SECONDS).samples,
            read_threads,
            names=lambda j, chunk=chunk: str(chunk[j]),
        )
        if jax.process_index() == 0:
            _save_atomic(parts / f"{i}.npy", l2_normalise(emb).astype(np.float32))
        done += len(chunk)
        rate = done / max(time.perf_counter() - started, 1e-9)
        say(
            f"part {i + 1}/{len(starts)}  {done}/{total} files  {rate:.1f} files/s  "
            f"ETA {duration((total - done) / max(rate, 1e-9))}"
        )
    if jax.process_index() == 0:
        embeddings = np.concatenate([_load(parts / f"{i}.npy") for i in range(len(starts))])
        tmp = out.with_name(out.name + ".tmp.npz")
        with tmp.open("wb") as f:
            np.savez(f, embeddings=embeddings, ids=np.array(files), step=trained.step, workdir=str(absolute(workdir)))
        tmp.replace(out)
        parts.rmtree()
    say(f"{len(files)} embeddings (dim {trained.config.model.encoder_dim}, step {trained.step}) in {out}")
    return out


def _claim(parts: epath.Path, source: dict) -> None:
    """Creates the parts folder, or checks that an existing one was made from the same model and list."""
    key = parts / _KEY
    if key.is_file():
        found = json.loads(key.read_text())
        if found != source:
            differs = ", ".join(k for k in source if found.get(k) != source[k])
            raise InputError(
                f"{parts} holds parts of another extraction (its {differs} differ): delete it, or choose another --out"
            )
        return
    if jax.process_index() == 0:
        parts.mkdir(parents=True, exist_ok=True)
        key.write_text(json.dumps(source) + "\n")


def _digest(files: list[str]) -> str:
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def _save_atomic(path: epath.Path, array: np.ndarray) -> None:
    """Written under a temporary name, then renamed: a part that exists is whole (on gs://, objects appear whole)."""
    tmp = path.with_name(path.name + ".tmp.npy")
    with tmp.open("wb") as f:
        np.save(f, array)
    tmp.replace(path)


def _load(path: epath.Path) -> np.ndarray:
    with path.open("rb") as f:
        return np.load(f)
