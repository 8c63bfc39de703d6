"""TFDS builder: any sslsv-layout corpus -> ArrayRecord shards of 16 kHz PCM.

Input is what sslsv users already have: a CSV `File,Speaker[,Session]` with
paths relative to a base folder (VoxCeleb1/2 as distributed, once VoxCeleb2's
m4a are converted to WAV, or the embedded demo corpus). Output is one split,
`train`, whose records are

  audio    int16 PCM, mono, 16 kHz, whole utterance
  index    position of the record in the split, 0..N-1: the *dataset index*
           that SSPS queues and cluster assignments are keyed by
  speaker, session, file   strings, for diagnostics only (never for training)

Records are written in CSV order (shuffling disabled), so `index` is also the
record position and the order is the same on every host. Every file is
checked while it is read: missing, unreadable, empty and too-short files are
collected, not fatal one at a time. Unless `skip_bad` is set, preparation
then stops with one error that lists them all (TFDS discards the unfinished
dataset; the source files are never touched). A CSV report of every file that
was skipped or converted (resampled, downmixed) is written either way, and
`<name>.index.csv` maps every dataset index to its file, speaker and session
(read by the SSPS diagnostics without decoding any audio).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import audio_io
from data_pipelines.errors import InputError
from data_pipelines.manifests import read_utterances

logger = logging.getLogger(__name__)
# TFDS warns whenever a builder config is not one of its BUILDER_CONFIGS; ours never are.
logging.getLogger("absl").addFilter(lambda record: "Using custom data configuration" not in record.getMessage())


class BadAudioFilesError(InputError):
    """Some files of the corpus cannot be used; lists every one of them."""


@dataclasses.dataclass
class SpeakerCorpusConfig(tfds.core.BuilderConfig):
    csv_path: str = ""
    base_dir: str = ""
    min_seconds: float = 0.5
    skip_bad: bool = False
    report_path: str = ""  # default: <data_dir>/<name>.report.csv
    read_threads: int = 8


def fingerprint(csv_path: Path | str, min_seconds: float) -> str:
    """Identifies what a prepared dataset was built from."""
    digest = hashlib.sha256(Path(csv_path).read_bytes())
    digest.update(f"min_seconds={min_seconds}".encode())
    return digest.hexdigest()


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
                    # A plain Tensor, not tfds.features.Audio (which needs TensorFlow),
                    # stored as raw bytes: 5x faster to write and read than int64 lists.
                    "audio": tfds.features.Tensor(
                        shape=(None,),
                        dtype=np.int16,
                        encoding=tfds.features.Encoding.BYTES,
                        doc="16 kHz mono PCM",
                    ),
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
            ),
            homepage="https://github.com/theolepage/sslsv",
            # Keep CSV order: the record position is then the dataset index.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the corpus is on disk
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        cfg = self.builder_config
        utterances = read_utterances(cfg.csv_path)
        base = Path(cfg.base_dir)

        def load(utt):
            try:
                return audio_io.read_audio(base / utt.file, cfg.min_seconds)
            except audio_io.AudioFileError as e:
                return e

        report, bad, kept, index = [], [], [], 0
        with concurrent.futures.ThreadPoolExecutor(cfg.read_threads) as pool:
            for utt, result in zip(utterances, pool.map(load, utterances)):
                if isinstance(result, audio_io.AudioFileError):
                    bad.append(f"line {utt.line}: {utt.file}: {result.reason}")
                    report.append((utt.line, utt.file, "skipped", result.reason))
                    continue
                if result.notes:
                    report.append((utt.line, utt.file, "converted", "; ".join(result.notes)))
                kept.append((index, utt.file, utt.speaker, utt.session))
                yield (
                    index,
                    {
                        "audio": result.samples,
                        "index": index,
                        "speaker": utt.speaker,
                        "session": utt.session,
                        "file": utt.file,
                    },
                )
                index += 1

        report_path = Path(cfg.report_path)
        _write_csv(report_path, ["Line", "File", "Status", "Reason"], report)
        _write_csv(index_path(report_path.parent, cfg.name), ["Index", "File", "Speaker", "Session"], kept)
        converted = sum(1 for r in report if r[2] == "converted")
        if converted:
            logger.warning("%d file(s) converted to 16 kHz mono; see %s", converted, report_path)
        if bad and not cfg.skip_bad:
            raise BadAudioFilesError(
                f"{len(bad)} bad audio file(s) in {cfg.csv_path} (base folder {base}); "
                f"nothing was prepared. Fix them, or pass skip_bad (--skip-bad) to prepare "
                f"the other {len(utterances) - len(bad)}. Listed in {report_path}:\n  " + "\n  ".join(bad)
            )
        if bad:
            logger.warning("skipped %d bad file(s); listed in %s", len(bad), report_path)
        if index == 0:
            raise BadAudioFilesError(f"no usable audio file in {cfg.csv_path}")


def _write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def default_data_dir(base_dir: Path | str) -> Path:
    """The TFDS data dir of a corpus when none is given: <base_dir>/tfds."""
    return Path(base_dir) / "tfds"


def index_path(data_dir: Path | str, name: str) -> Path:
    return Path(data_dir) / f"{name}.index.csv"


def read_labels(path: Path | str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Speaker and session ids of dataset indices 0..size-1 from an index CSV; -1 where unknown.

    For diagnostics only. A session is its name (the video in VoxCeleb), whoever speaks in it.
    """
    ids = {"Speaker": {}, "Session": {}}
    labels = {key: np.full(size, -1, np.int32) for key in ids}
    path = Path(path)
    if not path.is_file():
        logger.warning("%s not found: SSPS speaker/session diagnostics are off", path)
        return labels["Speaker"], labels["Session"]
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if int(row["Index"]) < size:
                for key, table in ids.items():
                    labels[key][int(row["Index"])] = table.setdefault(row[key], len(table))
    return labels["Speaker"], labels["Session"]


def prepare(
    csv_path: Path | str,
    base_dir: Path | str,
    data_dir: Path | str,
    *,
    name: str | None = None,
    min_seconds: float = 0.5,
    skip_bad: bool = False,
) -> SpeakerCorpus:
    """Builds (once) and returns the dataset for `csv_path`.

    `name` defaults to the CSV's file name without extension. A dataset of
    that name already prepared from another CSV (or another `min_seconds`)
    is an error rather than silently reused.
    """
    csv_path, data_dir = Path(csv_path).resolve(), Path(data_dir).resolve()
    name = name or config_name(csv_path)
    config = SpeakerCorpusConfig(
        name=name,
        description=f"Utterances listed in {csv_path.name}.",
        csv_path=str(csv_path),
        base_dir=str(Path(base_dir).resolve()),
        min_seconds=min_seconds,
        skip_bad=skip_bad,
        report_path=str(data_dir / f"{name}.report.csv"),
    )
    builder = SpeakerCorpus(config=config, data_dir=str(data_dir), file_format="array_record")
    expected = fingerprint(csv_path, min_seconds)
    if builder.is_prepared():
        found = builder.info.metadata.get("fingerprint")
        if found != expected:
            raise InputError(
                f"{builder.data_path} was prepared from {builder.info.metadata.get('csv_path')} "
                f"(fingerprint {str(found)[:12]}), not from {csv_path} as it is now "
                f"({expected[:12]}). Delete that folder or choose another name."
            )
    else:
        builder.download_and_prepare()
    return builder


def config_name(csv_path: Path | str) -> str:
    """The dataset's TFDS config name: the CSV's file name, letters, digits and '_' only."""
    cleaned = "".join(c if c.isalnum() else "_" for c in Path(csv_path).stem)
    return cleaned if cleaned[:1].isalpha() else f"c_{cleaned}"
