"""TFDS preparation: exact PCM round trip, dataset index, and every bad-input case."""

import csv

import numpy as np
import pytest
import soundfile as sf

from data_pipelines import speaker_corpus
from data_pipelines.audio_io import write_wav
from data_pipelines.demo_corpus import corpus
from data_pipelines.errors import InputError
from ssps_jax import cli


def test_records_are_the_csv_rows_in_order(demo_dir, demo_source):
    with open(demo_dir / corpus.TRAIN_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(demo_source) == len(rows)
    for i in (0, 1, len(rows) // 2, len(rows) - 1):
        record = demo_source[i]
        assert record["index"] == i
        assert record["file"].decode() == rows[i]["File"]
        assert record["speaker"].decode() == rows[i]["Speaker"]
        assert record["session"].decode() == rows[i]["Session"]
        pcm, rate = sf.read(demo_dir / rows[i]["File"], dtype="int16")
        assert rate == 16000
        np.testing.assert_array_equal(record["audio"], pcm)


def _tone(seconds, rate=16000, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.fixture
def messy_corpus(tmp_path):
    """A corpus with one file of every kind the preparation must handle."""
    base = tmp_path / "corpus"
    write_wav(base / "s1/a/good1.wav", _tone(1.0))
    write_wav(base / "s1/a/good2.wav", _tone(2.0))
    (base / "s1/b").mkdir(parents=True)
    (base / "s1/b/garbage.wav").write_bytes(b"RIFF....WAVEfmt definitely not audio")
    sf.write(base / "s1/b/empty.wav", np.zeros(0, np.int16), 16000, subtype="PCM_16")
    write_wav(base / "s2/c/short.wav", _tone(0.2))
    sf.write(base / "s2/c/cd.wav", _tone(1.5, 44100), 44100, subtype="PCM_16")
    sf.write(base / "s2/c/stereo.wav", _tone(1.0, channels=2), 16000, subtype="PCM_16")
    rows = ["good1", "garbage", "good2", "missing", "empty", "short", "cd", "stereo"]
    folders = {"good1": "s1/a", "good2": "s1/a", "garbage": "s1/b", "empty": "s1/b", "missing": "s1/b"}
    lines = ["File,Speaker"] + [f"{folders.get(r, 's2/c')}/{r}.wav,{folders.get(r, 's2/c')[:2]}" for r in rows]
    (base / "train.csv").write_text("\n".join(lines) + "\n")
    return base


def _report(path):
    with open(path, newline="") as f:
        return {r["File"].split("/")[-1]: (r["Status"], r["Reason"]) for r in csv.DictReader(f)}


def test_bad_files_stop_preparation_listing_every_one(messy_corpus, tmp_path):
    data_dir = tmp_path / "tfds"
    with pytest.raises(speaker_corpus.BadAudioFilesError) as e:
        speaker_corpus.prepare(messy_corpus / "train.csv", messy_corpus, data_dir)
    message = str(e.value)
    assert "4 bad audio file(s)" in message and "--skip-bad" in message
    for expected in (
        "line 3: s1/b/garbage.wav: unreadable",
        "line 5: s1/b/missing.wav: missing",
        "line 6: s1/b/empty.wav: empty",
        "line 7: s2/c/short.wav: too short (0.20 s < 0.5 s)",
    ):
        assert expected in message
    # Nothing half-made is left that a later run could mistake for a dataset.
    builder = speaker_corpus.SpeakerCorpus(
        config=speaker_corpus.SpeakerCorpusConfig(name="train"), data_dir=str(data_dir), file_format="array_record"
    )
    assert not builder.is_prepared()
    assert _report(data_dir / "train.report.csv")["missing.wav"] == ("skipped", "missing")


def test_skip_bad_prepares_the_rest_and_reports(messy_corpus, tmp_path):
    data_dir = tmp_path / "tfds"
    builder = speaker_corpus.prepare(messy_corpus / "train.csv", messy_corpus, data_dir, skip_bad=True)
    source = builder.as_data_source(split="train")
    files = [source[i]["file"].decode().split("/")[-1] for i in range(len(source))]
    assert files == ["good1.wav", "good2.wav", "cd.wav", "stereo.wav"]
    assert [int(source[i]["index"]) for i in range(len(source))] == [0, 1, 2, 3]  # contiguous
    report = _report(data_dir / "train.report.csv")
    assert report["garbage.wav"][0] == report["empty.wav"][0] == report["short.wav"][0] == "skipped"
    assert report["cd.wav"] == ("converted", "resampled from 44100 Hz")
    assert report["stereo.wav"] == ("converted", "downmixed 2 channels")
    assert "good1.wav" not in report
    # Resampled to 16 kHz with soxr: same duration, same tone.
    cd = source[2]["audio"].astype(np.float64) / 32768
    assert len(cd) == 24000
    spectrum = np.abs(np.fft.rfft(cd * np.hanning(len(cd))))
    assert abs(np.argmax(spectrum) * 16000 / len(cd) - 220) < 1
    np.testing.assert_allclose(source[3]["audio"] / 32768, _tone(1.0), atol=1 / 32768)


def test_min_seconds_is_configurable(messy_corpus, tmp_path):
    builder = speaker_corpus.prepare(
        messy_corpus / "train.csv", messy_corpus, tmp_path / "tfds", min_seconds=1.2, skip_bad=True
    )
    assert builder.info.splits["train"].num_examples == 2  # only good2 (2 s) and cd (1.5 s)


def test_a_changed_csv_is_not_silently_reused(demo_dir, tmp_path):
    csv_path = tmp_path / "train.csv"
    lines = (demo_dir / corpus.TRAIN_CSV).read_text().splitlines()
    csv_path.write_text("\n".join(lines[:6]) + "\n")
    speaker_corpus.prepare(csv_path, demo_dir, tmp_path / "tfds")
    speaker_corpus.prepare(csv_path, demo_dir, tmp_path / "tfds")  # unchanged: reused
    csv_path.write_text("\n".join(lines[:5]) + "\n")
    with pytest.raises(InputError, match=r"(?s)was prepared from .*train.csv.*Delete that folder"):
        speaker_corpus.prepare(csv_path, demo_dir, tmp_path / "tfds")


def test_cli_reports_bad_input_without_traceback(messy_corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["prepare", "--csv", str(messy_corpus / "train.csv"), "--base-dir", str(messy_corpus)])
    assert str(e.value).startswith("error: 4 bad audio file(s)")
    cli.main(["prepare", "--csv", str(messy_corpus / "train.csv"), "--base-dir", str(messy_corpus), "--skip-bad"])
    assert "4 utterances in" in capsys.readouterr().out


def test_make_csv(tmp_path):
    for f in ("vox/id1/sessA/00001.wav", "vox/id1/sessB/00001.wav", "vox/id2/sessC/00002.wav"):
        write_wav(tmp_path / f, _tone(0.6))
    cli.main(["make-csv", str(tmp_path / "vox"), "--out", str(tmp_path / "train.csv")])
    assert (tmp_path / "train.csv").read_text().splitlines() == [
        "File,Speaker,Session",
        "vox/id1/sessA/00001.wav,id1,sessA",
        "vox/id1/sessB/00001.wav,id1,sessB",
        "vox/id2/sessC/00002.wav,id2,sessC",
    ]
    builder = speaker_corpus.prepare(tmp_path / "train.csv", tmp_path, tmp_path / "tfds")
    assert builder.info.splits["train"].num_examples == 3
