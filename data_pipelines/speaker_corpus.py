"""TFDS builder: any sslsv-layout corpus -> ArrayRecord shards of 16 kHz audio.

Input is what sslsv users already have: a CSV `File,Speaker[,Session]` with
paths relative to a base folder (VoxCeleb1/2 as distributed: WAV, or m4a
decoded by FFmpeg through PyAV, see audio_io; or the embedded demo corpus).
Output is one split, `train`, whose records are

  audio    the utterance, 16 kHz mono: int16 PCM (storage "int16", default),
           or the bytes of a FLAC file as uint8 (storage "flac": lossless,
           smaller, decoded by `decode_audio` when read)
  index    position of the record in the split, 0..N-1: the *dataset index*
           that SSPS queues and cluster assignments are keyed by
  speaker, session, file   strings, for diagnostics only (never for training)

Records are written in CSV order (shuffling disabled), so `index` is also the
record position and the order is the same on every host.

Preparation runs in two stages (`prepare`):

1. data_pipelines/staging.py decodes and checks every file, in chunks, over
   `workers` processes (default: all cores), printing files/s and an ETA.
   Each finished chunk is a file under `<data_dir>/<name>.staging/`, so a
   preparation that is killed continues where it stopped when run again.
   Before it starts, the number of files, their duration (from the headers of
   a sample of them) and the disk the preparation needs are printed, and it
   refuses to start when the data dir's file system has less free space.
2. TFDS's writer streams the staged chunks, in CSV order, into ArrayRecord
   shards. TFDS writes into a temporary folder and renames it only once
   complete, and `is_prepared` needs its dataset_info.json, so a half-written
   dataset is never taken for a prepared one (a rerun redoes this stage from
   the staged chunks; `load` refuses a dataset whose shard files are missing).
   The staging folder is removed once the dataset is complete.

Every file is checked while it is decoded: missing, unreadable, empty and
too-short files are collected, not fatal one at a time. Unless `skip_bad` is
set, preparation then stops with one error that lists them all (the staged
chunks that hold them are dropped, so a rerun after fixing them decodes only
those; the source files are never touched). Digitally silent files (every
sample zero) are valid audio and kept, but reported as a warning. A CSV report
of every file skipped, converted (resampled, downmixed) or silent is written
either way, and `<name>.index.csv` maps every dataset index to its file,
speaker and session (read by the SSPS diagnostics without decoding any audio).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import audio_io, paths, staging
from data_pipelines.errors import InputError
from data_pipelines.manifests import csv_text, read_utterances

logger = logging.getLogger(__name__)
# TFDS messages that only confuse users of a corpus built on their own disk: a builder config is
# never one of its BUILDER_CONFIGS, and while the dataset is not yet prepared its folder is
# listed without a dataset_info.json. Filtered exactly, every other TFDS message stays.
_QUIET_TFDS = ("Using custom data configuration", "has no dataset_info.json")
logging.getLogger("absl").addFilter(lambda record: not any(m in record.getMessage() for m in _QUIET_TFDS))

CHUNK_SIZE = 256  # files per staged chunk: ~65 MB of int16 for VoxCeleb2's 8 s average


class BadAudioFilesError(InputError):
    """Some files of the corpus cannot be used; lists every one of them."""


@dataclasses.dataclass
class SpeakerCorpusConfig(tfds.core.BuilderConfig):
    csv_path: str = ""
    base_dir: str = ""
    min_seconds: float = 0.5
    storage: str = "int16"  # one of staging.STORAGES
    staging_dir: str = ""  # stage 1's chunks, streamed into records by _generate_examples


def fingerprint(csv_path: epath.PathLike, min_seconds: float) -> str:
    """Identifies what a prepared dataset was built from."""
    digest = hashlib.sha256(epath.Path(csv_path).read_bytes())
    digest.update(f"min_seconds={min_seconds}".encode())
    return digest.hexdigest()


def _staging_key(csv_path: epath.Path, min_seconds: float, storage: str, chunk_size: int) -> str:
    """Identifies what staged chunks hold: the dataset's fingerprint and how its chunks are cut and stored."""
    return hashlib.sha256(f"{fingerprint(csv_path, min_seconds)} {storage} {chunk_size}".encode()).hexdigest()


def _audio_feature(storage: str) -> tfds.features.Tensor:
    # A plain Tensor, not tfds.features.Audio (which needs TensorFlow), stored as raw bytes:
    # 5x faster to write and read than int64 lists. FLAC is kept as its file's bytes (uint8).
    if storage == "flac":
        return tfds.features.Tensor(
            shape=(None,), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES, doc="FLAC file, 16 kHz mono"
        )
    return tfds.features.Tensor(
        shape=(None,), dtype=np.int16, encoding=tfds.features.Encoding.BYTES, doc="16 kHz mono PCM"
    )


def decode_audio(audio: np.ndarray) -> np.ndarray:
    """A record's `audio` as int16 samples, whatever the storage (told apart by dtype: uint8 is FLAC)."""
    return audio_io.decode_flac(audio.tobytes()) if audio.dtype == np.uint8 else audio


class SpeakerCorpus(tfds.core.GeneratorBasedBuilder):
    """Utterances of a speaker corpus with their dataset index, speaker and session."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "Writes <name>.index.csv (dataset index -> labels)."}
    BUILDER_CONFIGS = []  # always given explicitly, see `prepare`

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "audio": _audio_feature(cfg.storage),
                    "index": np.int64,
                    "speaker": tfds.features.Text(),
                    "session": tfds.features.Text(),
                    "file": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(
                fingerprint=fingerprint(cfg.csv_path, cfg.min_seconds) if cfg.csv_path else "",
                csv_path=cfg.csv_path,
                base_dir=cfg.base_dir,
                storage=cfg.storage,
            ),
            homepage="https://github.com/theolepage/sslsv",
            # Keep CSV order: the record position is then the dataset index.
            disable_shuffling=True,
        )

    def _log_download_bytes(self) -> None:
        # TFDS prints "Downloading and preparing dataset Unknown size ...": nothing is downloaded,
        # and `prepare` has already printed the size and the disk it needs.
        pass

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the corpus is on disk
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        cfg = self.builder_config
        dtype = np.uint8 if cfg.storage == "flac" else np.int16
        chunks = sorted(Path(cfg.staging_dir).glob("chunk-*.npz"))
        utterances = {u.line: u for u in read_utterances(cfg.csv_path)}
        index = 0
        for chunk in chunks:
            for row, payload in staging.read_payloads(chunk):
                utt = utterances[row["line"]]
                yield (
                    index,
                    {
                        "audio": np.frombuffer(payload, dtype),
                        "index": index,
                        "speaker": utt.speaker,
                        "session": utt.session,
                        "file": utt.file,
                    },
                )
                index += 1


def _write_csv(path: epath.PathLike, header: list[str], rows: list[tuple]) -> None:
    path = Path(path)  # always local: a gs:// data dir is prepared in local_dir, then copied
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def default_data_dir(base_dir: epath.PathLike) -> epath.Path:
    """The TFDS data dir of a corpus when none is given: <base_dir>/tfds."""
    return epath.Path(base_dir) / "tfds"


def index_path(data_dir: epath.PathLike, name: str) -> epath.Path:
    return epath.Path(data_dir) / f"{name}.index.csv"


def report_path(data_dir: epath.PathLike, name: str) -> epath.Path:
    return epath.Path(data_dir) / f"{name}.report.csv"


def staging_path(data_dir: epath.PathLike, name: str) -> epath.Path:
    return epath.Path(data_dir) / f"{name}.staging"


def local_dir(data_dir: epath.PathLike) -> epath.Path:
    """The folder of this host where the records of a remote (gs://) data dir are written and read.

    ArrayRecord's open-source reader and writer open local files only (no gs:// file system in its
    build), so a gs:// data dir is prepared here and copied there, and each host reads a copy of it
    here: $SSPS_JAX_CACHE (default ~/.cache/ssps_jax)/<scheme>/<bucket>/<path>.
    """
    scheme, rest = os.fspath(data_dir).split("://", 1)
    root = epath.Path(os.environ.get("SSPS_JAX_CACHE") or "~/.cache/ssps_jax").expanduser()
    return paths.absolute(root) / scheme / rest


def read_labels(path: epath.PathLike, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Speaker and session ids of dataset indices 0..size-1 from an index CSV; -1 where unknown.

    For diagnostics only. A session is its name (the video in VoxCeleb), whoever speaks in it.
    """
    ids = {"Speaker": {}, "Session": {}}
    labels = {key: np.full(size, -1, np.int32) for key in ids}
    path = epath.Path(path)
    if not path.is_file():
        logger.warning("%s not found: SSPS speaker/session diagnostics are off", path)
        return labels["Speaker"], labels["Session"]
    for row in csv.DictReader(csv_text(path)):
        if int(row["Index"]) < size:
            for key, table in ids.items():
                labels[key][int(row["Index"])] = table.setdefault(row[key], len(table))
    return labels["Speaker"], labels["Session"]


def _check_reuse(builder: SpeakerCorpus, csv_path: epath.Path, min_seconds: float, storage: str) -> None:
    """A dataset already prepared under this name must be the one asked for."""
    expected = fingerprint(csv_path, min_seconds)
    found = builder.info.metadata.get("fingerprint")
    if found != expected:
        raise InputError(
            f"{builder.data_path} was prepared from {builder.info.metadata.get('csv_path')} "
            f"(fingerprint {str(found)[:12]}), not from {csv_path} as it is now "
            f"({expected[:12]}). Delete that folder or choose another name."
        )
    found_storage = builder.info.metadata.get("storage", "int16")  # datasets of before FLAC storage are int16
    if found_storage != storage:
        raise InputError(
            f"{builder.data_path} stores audio as {found_storage}, not {storage}. "
            "Delete that folder or choose another name."
        )


def _announce(utterances, base: epath.Path, data_dir: epath.Path, staging_dir: epath.Path, say) -> None:
    """Prints the size of the job and refuses to start it when the data dir's disk cannot hold it."""
    seconds = staging.estimate_seconds(utterances, base)
    needed = max(0, staging.disk_needed(seconds) - staging.folder_bytes(staging_dir))
    free = staging.free_bytes(data_dir)
    sampled = min(len(utterances), staging.HEADER_SAMPLE)
    say(
        f"preparing {len(utterances)} files, {seconds / 3600:.1f} h of audio (from the headers of {sampled} files); "
        f"needs up to {staging.size_text(needed)} on {data_dir} (staging, TFDS's temporary copy, records), "
        f"{staging.size_text(free)} free"
    )
    if needed > free:
        raise InputError(
            f"not enough disk space on {data_dir}: preparing {len(utterances)} files "
            f"({seconds / 3600:.1f} h of audio) needs up to {staging.size_text(needed)}, "
            f"{staging.size_text(free)} free. Free some space or choose another --data-dir."
        )


def _check_files(rows: list[dict], csv_path: epath.Path, base: epath.Path, report: Path, skip_bad: bool) -> None:
    """Writes the report; raises on bad files unless `skip_bad`, and when no file is usable."""
    entries = []
    for r in rows:
        if r["status"] == "skipped":
            entries.append((r["line"], r["file"], "skipped", r["reason"]))
            continue
        if r["reason"]:
            entries.append((r["line"], r["file"], "converted", r["reason"]))
        if r["silent"]:
            entries.append((r["line"], r["file"], "warning", "silent (all samples zero)"))
    _write_csv(report, ["Line", "File", "Status", "Reason"], entries)
    bad = [f"line {line}: {file}: {reason}" for line, file, status, reason in entries if status == "skipped"]
    for status, what in (("converted", "converted to 16 kHz mono"), ("warning", "digitally silent (kept)")):
        count = sum(1 for e in entries if e[2] == status)
        if count:
            logger.warning("%d file(s) %s; see %s", count, what, report)
    if bad and not skip_bad:
        raise BadAudioFilesError(
            f"{len(bad)} bad audio file(s) in {csv_path} (base folder {base}); "
            f"nothing was prepared. Fix them, or pass skip_bad (--skip-bad) to prepare "
            f"the other {len(rows) - len(bad)}. Listed in {report}:\n  " + "\n  ".join(bad)
        )
    if bad:
        logger.warning("skipped %d bad file(s); listed in %s", len(bad), report)
    if len(bad) == len(rows):
        raise BadAudioFilesError(f"no usable audio file in {csv_path}")


def prepare(
    csv_path: epath.PathLike,
    base_dir: epath.PathLike,
    data_dir: epath.PathLike,
    *,
    name: str | None = None,
    min_seconds: float = 0.5,
    skip_bad: bool = False,
    storage: str = "int16",
    workers: int | None = None,
    chunk_size: int = CHUNK_SIZE,
    say=print,
) -> SpeakerCorpus:
    """Builds (once) and returns the dataset for `csv_path`; see the module docstring for the stages.

    `name` defaults to the CSV's file name without extension. A dataset of
    that name already prepared from another CSV (or another `min_seconds` or
    storage) is an error rather than silently reused. `workers` decoding
    processes (default: all cores); `say` prints the plan and progress.
    The CSV, the base folder and the data dir may be gs:// URIs; a gs://
    data dir is prepared in `local_dir(data_dir)` and copied there.
    """
    if storage not in staging.STORAGES:
        raise InputError(f"storage {storage!r}: expected one of {', '.join(staging.STORAGES)}")
    csv_path, data_dir, base = paths.absolute(csv_path), paths.absolute(data_dir), paths.absolute(base_dir)
    name = name or config_name(csv_path)
    staging_dir = staging_path(data_dir, name)
    config = SpeakerCorpusConfig(
        name=name,
        description=f"Utterances listed in {csv_path.name}.",
        csv_path=str(csv_path),
        base_dir=str(base),
        min_seconds=min_seconds,
        storage=storage,
        staging_dir=str(staging_dir),
    )
    builder = SpeakerCorpus(config=config, data_dir=str(data_dir), file_format="array_record")
    if builder.is_prepared():
        _check_reuse(builder, csv_path, min_seconds, storage)
        if not paths.is_remote(data_dir):
            staging.remove_staging(staging_dir)  # left if a run was killed between the last rename and this cleanup
        return builder
    if paths.is_remote(data_dir):
        local = prepare(
            csv_path,
            base,
            local_dir(data_dir),
            name=name,
            min_seconds=min_seconds,
            skip_bad=skip_bad,
            storage=storage,
            workers=workers,
            chunk_size=chunk_size,
            say=say,
        )
        say(f"copying {local.data_path} to {builder.data_path}")
        for extra in (index_path, report_path):
            extra(local_dir(data_dir), name).copy(extra(data_dir, name), overwrite=True)
        _copy_dataset(local.data_path, builder.data_path)
        return SpeakerCorpus(config=config, data_dir=str(data_dir), file_format="array_record")

    utterances = read_utterances(csv_path)
    _announce(utterances, base, data_dir, staging_dir, say)
    staging.open_staging(staging_dir, _staging_key(csv_path, min_seconds, storage, chunk_size))
    tasks = staging.make_tasks(
        utterances, base, staging_dir, chunk_size=chunk_size, min_seconds=min_seconds, storage=storage
    )
    staging.run(tasks, len(utterances), workers or os.cpu_count() or 1, say)

    rows_per_task = [staging.read_rows(t.path) for t in tasks]
    rows = [r for task_rows in rows_per_task for r in task_rows]
    kept = [u for u, r in zip(utterances, rows) if r["status"] == "ok"]
    _write_csv(
        index_path(data_dir, name),
        ["Index", "File", "Speaker", "Session"],
        [(i, u.file, u.speaker, u.session) for i, u in enumerate(kept)],
    )
    try:
        _check_files(rows, csv_path, base, report_path(data_dir, name), skip_bad)
    except BadAudioFilesError:
        # Drop the chunks that hold bad files: once fixed, a rerun decodes those again, and only those.
        for task, task_rows in zip(tasks, rows_per_task):
            if any(r["status"] != "ok" for r in task_rows):
                Path(task.path).unlink()
        raise
    say(f"writing {len(kept)} records to {builder.data_path}")
    tfds.disable_progress_bar()  # its bars count examples TFDS shuffles; stage 1 printed the progress that matters
    builder.download_and_prepare()
    staging.remove_staging(staging_dir)
    return builder


def _copy_dataset(source: epath.Path, dest: epath.Path) -> None:
    """Copies a prepared dataset's folder, its info files last: TFDS takes a folder with them for a prepared one."""
    last = ("features.json", "dataset_info.json")
    files = sorted(source.iterdir(), key=lambda f: (f.name in last, last.index(f.name) if f.name in last else 0))
    dest.mkdir(parents=True, exist_ok=True)
    for file in files:
        file.copy(dest / file.name, overwrite=True)


def local_copy(builder: SpeakerCorpus) -> SpeakerCorpus:
    """The dataset of `builder` (prepared in a gs:// data dir) as a copy on this host, made once (see `local_dir`).

    A copy is reused while its dataset_info.json is the remote one's. Several processes of one host
    copy to folders of their own and rename theirs into place: the first one wins.
    """
    remote = builder.data_path
    local = SpeakerCorpus(
        config=builder.builder_config, data_dir=str(local_dir(builder.data_dir_root)), file_format="array_record"
    )
    target = local.data_path
    info = (remote / "dataset_info.json").read_bytes()
    if local.is_prepared() and (target / "dataset_info.json").read_bytes() == info:
        return local
    incoming = target.parent / f"{target.name}.incoming-{os.getpid()}"
    incoming.rmtree(missing_ok=True)
    _copy_dataset(remote, incoming)
    if target.exists():
        target.rmtree(missing_ok=True)  # a copy of an older preparation
    try:
        incoming.rename(target)
    except OSError:  # another process of this host renamed its copy first
        incoming.rmtree(missing_ok=True)
    local = SpeakerCorpus(
        config=builder.builder_config, data_dir=str(local_dir(builder.data_dir_root)), file_format="array_record"
    )
    check_complete(local)
    return local


def check_complete(builder: SpeakerCorpus) -> None:
    """Refuses a prepared dataset whose shard files are not all there (e.g. a partial copy)."""
    split = builder.info.splits["train"]
    missing = [f for f in split.filepaths if not epath.Path(f).is_file()]
    if missing:
        raise InputError(
            f"{builder.data_path} is incomplete: {len(missing)} of its {len(split.filepaths)} shard files are "
            f"missing (e.g. {missing[0]}). Delete that folder and run `ssps-jax prepare` again."
        )


def config_name(csv_path: epath.PathLike) -> str:
    """The dataset's TFDS config name: the CSV's file name, letters, digits and '_' only."""
    cleaned = "".join(c if c.isalnum() else "_" for c in epath.Path(csv_path).stem)
    return cleaned if cleaned[:1].isalpha() else f"c_{cleaned}"
