"""Train CSVs and trial lists: what is accepted, and errors that name line and field."""

import pytest

from data_pipelines.manifests import ManifestError, read_trials, read_utterances


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_sslsv_csv_session_defaults_to_parent_folder(tmp_path):
    path = _write(
        tmp_path,
        "train.csv",
        "File,Speaker\nvoxceleb2/id00012/21Uxsk56VDQ/00001.wav,id00012\n\nvoxceleb2/id00012/zz/00002.wav,id00012\n",
    )
    utts = read_utterances(path)
    assert [(u.line, u.speaker, u.session) for u in utts] == [(2, "id00012", "21Uxsk56VDQ"), (4, "id00012", "zz")]


def test_explicit_session_column_and_extra_columns(tmp_path):
    path = _write(tmp_path, "train.csv", "Speaker,Gender,File,Session\ns1,f,a/b/c.wav,sessA\n")
    (u,) = read_utterances(path)
    assert (u.file, u.speaker, u.session) == ("a/b/c.wav", "s1", "sessA")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Path,Speaker\nx/y/z.wav,s\n", "line 1: missing column(s) File"),
        ("File,Session\nx/y/z.wav,s\n", "line 1: missing column(s) Speaker"),
        ("File,Speaker\nx/y/z.wav,\n", "line 2: field Speaker is empty"),
        ("File,Speaker,Session\nx/y/z.wav,s\n", "line 2: expected 3 fields, got 2"),
        ("File,Speaker\nx/y/z.wav,s\nq/r/t.wav,s\nx/y/z.wav,s\n", "line 4: field File 'x/y/z.wav' repeats line 2"),
        ("File,Speaker\n/abs/y/z.wav,s\n", "line 2: field File must be relative"),
        ("File,Speaker\nz.wav,s\n", "line 2: field File 'z.wav' has no parent folder"),
        ("File,Speaker\n", "no data rows"),
        ("", "line 1: empty file"),
    ],
)
def test_malformed_csv(tmp_path, text, expected):
    path = _write(tmp_path, "bad.csv", text)
    with pytest.raises(ManifestError, match=r"bad\.csv") as e:
        read_utterances(path)
    assert expected in str(e.value)


def test_csv_errors_are_all_listed(tmp_path):
    path = _write(tmp_path, "bad.csv", "File,Speaker\na/b/1.wav,\na/b/2.wav,s\n,s\n")
    with pytest.raises(ManifestError) as e:
        read_utterances(path)
    assert e.value.problems == ["line 2: field Speaker is empty", "line 4: field File is empty"]


def test_missing_csv(tmp_path):
    with pytest.raises(ManifestError, match=r"(?s)nope.csv: 1 problem.*file not found"):
        read_utterances(tmp_path / "nope.csv")


def test_trials(tmp_path):
    for f in ("a/x/1.wav", "b/y/2.wav"):
        (tmp_path / f).parent.mkdir(parents=True)
        (tmp_path / f).write_bytes(b"")
    path = _write(tmp_path, "trials.txt", "1 a/x/1.wav b/y/2.wav\n\n0 b/y/2.wav a/x/1.wav\n")
    trials = read_trials(path, base_dir=tmp_path)
    assert [(t.line, t.label, t.enrol, t.test) for t in trials] == [
        (1, 1, "a/x/1.wav", "b/y/2.wav"),
        (3, 0, "b/y/2.wav", "a/x/1.wav"),
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2 a/x/1.wav a/x/1.wav\n", "line 1: field label must be 0 or 1, got '2'"),
        ("1 a/x/1.wav a/x/1.wav\ntarget a/x/1.wav a/x/1.wav\n", "line 2: field label must be 0 or 1, got 'target'"),
        ("1 a/x/1.wav\n", "line 1: expected 3 fields 'label enrol test', got 2"),
        ("1 a/x/1.wav missing.wav\n", "line 1: field test: unknown file 'missing.wav'"),
        ("0 gone.wav a/x/1.wav\n", "line 1: field enrol: unknown file 'gone.wav'"),
        ("\n\n", "no trials"),
    ],
)
def test_malformed_trials(tmp_path, text, expected):
    (tmp_path / "a/x").mkdir(parents=True)
    (tmp_path / "a/x/1.wav").write_bytes(b"")
    path = _write(tmp_path, "trials.txt", text)
    with pytest.raises(ManifestError, match=r"trials\.txt") as e:
        read_trials(path, base_dir=tmp_path)
    assert expected in str(e.value)
