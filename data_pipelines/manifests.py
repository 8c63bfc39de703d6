"""Parsing of the text files users already have: sslsv train CSVs and trial lists.

Errors name the file, the 1-based line and the field, and list every problem
found rather than the first, so one run is enough to fix a file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import PurePosixPath

from etils import epath

from data_pipelines.errors import InputError


class ManifestError(InputError):
    """A malformed train CSV or trial list; the message lists every problem."""

    def __init__(self, path: epath.PathLike, problems: list[str]):
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(shown) + more)
        self.path = str(path)
        self.problems = problems


@dataclasses.dataclass(frozen=True)
class Utterance:
    line: int  # 1-based line in the CSV, header included
    file: str  # relative to the corpus base folder
    speaker: str
    session: str


@dataclasses.dataclass(frozen=True)
class Trial:
    line: int
    label: int  # 1: same speaker (target), 0: different (non-target)
    enrol: str
    test: str


def csv_text(path: epath.PathLike) -> io.StringIO:
    """A CSV file's text as `csv` reads it (as `open(path, newline="")` gives it), local or remote (gs://)."""
    return io.StringIO(epath.Path(path).read_bytes().decode("utf-8"), newline="")


def default_session(file: str) -> str:
    """sslsv layout: <speaker>/<session>/<utt>.wav, so the session is the parent folder."""
    return PurePosixPath(file).parent.name


def read_utterances(path: epath.PathLike) -> list[Utterance]:
    """Reads a CSV with columns File,Speaker[,Session] (extra columns are ignored).

    Session defaults to the folder above each file, as in VoxCeleb.
    """
    path = epath.Path(path)
    if not path.is_file():
        raise ManifestError(path, ["file not found"])
    rows = list(csv.reader(csv_text(path)))
    if not rows:
        raise ManifestError(path, ["line 1: empty file, expected a header File,Speaker[,Session]"])
    header = [h.strip() for h in rows[0]]
    missing = [c for c in ("File", "Speaker") if c not in header]
    if missing:
        raise ManifestError(path, [f"line 1: missing column(s) {', '.join(missing)} in header {header}"])
    col = {name: header.index(name) for name in ("File", "Speaker", "Session") if name in header}

    problems, utterances, seen = [], [], {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) != len(header):
            problems.append(f"line {line}: expected {len(header)} fields, got {len(row)}")
            continue
        values = {name: row[i].strip() for name, i in col.items()}
        empty = [name for name, v in values.items() if not v]
        if empty:
            problems.extend(f"line {line}: field {name} is empty" for name in empty)
            continue
        file = values["File"]
        if PurePosixPath(file).is_absolute() or ".." in PurePosixPath(file).parts:
            problems.append(f"line {line}: field File must be relative to the base folder, got {file!r}")
            continue
        if file in seen:
            problems.append(f"line {line}: field File {file!r} repeats line {seen[file]}")
            continue
        seen[file] = line
        session = values.get("Session") or default_session(file)
        if not session:
            problems.append(f"line {line}: field File {file!r} has no parent folder to take the session from")
            continue
        utterances.append(Utterance(line, file, values["Speaker"], session))
    if not utterances and not problems:
        problems.append("no data rows after the header")
    if problems:
        raise ManifestError(path, problems)
    return utterances


def read_trials(path: epath.PathLike, base_dir: epath.PathLike | None = None) -> list[Trial]:
    """Reads a VoxCeleb trial list: one `1|0 enrol_path test_path` per line.

    With `base_dir`, every referenced file must exist under it.
    """
    path = epath.Path(path)
    if not path.is_file():
        raise ManifestError(path, ["file not found"])
    problems, trials = [], []
    exists: dict[str, bool] = {}
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        fields = text.split()
        if not fields:
            continue
        if len(fields) != 3:
            problems.append(f"line {line}: expected 3 fields 'label enrol test', got {len(fields)}")
            continue
        label, enrol, test = fields
        if label not in ("0", "1"):
            problems.append(f"line {line}: field label must be 0 or 1, got {label!r}")
            continue
        bad = False
        if base_dir is not None:
            for name, file in (("enrol", enrol), ("test", test)):
                if file not in exists:
                    exists[file] = (epath.Path(base_dir) / file).is_file()
                if not exists[file]:
                    problems.append(f"line {line}: field {name}: unknown file {file!r} (not under {base_dir})")
                    bad = True
        if not bad:
            trials.append(Trial(line, int(label), enrol, test))
    if not trials and not problems:
        problems.append("no trials")
    if problems:
        raise ManifestError(path, problems)
    return trials


def trial_speakers(path: epath.PathLike) -> set[str]:
    """The speakers of a VoxCeleb trial list: the folder two above each file (`<speaker>/<session>/<utt>`).

    Any prefix before that (`voxceleb1/`) is ignored. The files need not exist: `make-csv
    --exclude-trials` reads the lists to leave their speakers out of a train CSV.
    """
    problems, speakers = [], set()
    for trial in read_trials(path):
        for name, file in (("enrol", trial.enrol), ("test", trial.test)):
            parts = PurePosixPath(file).parts
            if len(parts) < 3:
                problems.append(f"line {trial.line}: field {name}: {file!r} is not <speaker>/<session>/<utt>")
            else:
                speakers.add(parts[-3])
    if problems:
        raise ManifestError(path, problems)
    return speakers
