"""TFDS preparation: exact PCM round trip, dataset index, and every bad-input case."""

import csv
import re

import numpy as np
import pytest
import soundfile as sf

from data_pipelines import speaker_corpus
from data_pipelines.audio_io import write_m4a, write_wav
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
    with pytest.raises(SystemExit) as e:
        cli.main(["prepare", "--csv", str(messy_corpus / "train.csv"), "--base-dir", str(messy_corpus), "--workers=0"])
    assert e.value.code == 2 and "--workers: must be >= 1, got 0" in capsys.readouterr().err


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


@pytest.fixture
def mixed_corpus(tmp_path):
    """Ten files of two speakers: WAV at 16 kHz, WAV at 44.1 kHz, and AAC in m4a."""

    base = tmp_path / "corpus"
    lines = ["File,Speaker"]
    for i in range(10):
        rel = f"s{i % 2}/v{i % 3}/u{i}." + ("m4a" if i == 4 else "wav")
        tone = _tone(0.6 + 0.05 * i) * (1 + 0.1 * i)
        if i == 4:
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            write_m4a(base / rel, tone.astype(np.float32))
        elif i == 7:
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(base / rel, _tone(0.7, 44100), 44100, subtype="PCM_16")
        else:
            write_wav(base / rel, tone)
        lines.append(f"{rel},s{i % 2}")
    (base / "train.csv").write_text("\n".join(lines) + "\n")
    return base


def _records(builder):
    source = builder.as_data_source(split="train")
    return [source[i] for i in range(len(source))]


def _assert_same_records(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_parallel_preparation_writes_the_same_records(mixed_corpus, tmp_path):
    csv_path = mixed_corpus / "train.csv"
    one = speaker_corpus.prepare(csv_path, mixed_corpus, tmp_path / "one", workers=1, chunk_size=3)
    two = speaker_corpus.prepare(csv_path, mixed_corpus, tmp_path / "two", workers=2, chunk_size=3)
    records = _records(one)
    assert [r["file"].decode() for r in records] == [line.split(",")[0] for line in csv_path.read_text().split()[1:]]
    _assert_same_records(_records(two), records)
    # The m4a went through FFmpeg: AAC's delay and padding, but the same tone.
    assert len(records[4]["audio"]) >= int(0.8 * 16000)
    assert not (tmp_path / "one" / "train.staging").exists()  # staging removed once the dataset is complete


def test_an_interrupted_preparation_resumes_without_redoing_finished_chunks(mixed_corpus, tmp_path, monkeypatch):
    from data_pipelines import staging

    csv_path = mixed_corpus / "train.csv"
    reference = _records(
        speaker_corpus.prepare(csv_path, mixed_corpus, tmp_path / "reference", workers=1, chunk_size=3)
    )
    decode, decoded = staging.decode_chunk, []

    def killed_after_two_chunks(task):
        if len(decoded) == 2:
            raise KeyboardInterrupt  # as a kill would, between chunk files
        decoded.append(task.index)
        return decode(task)

    monkeypatch.setattr(staging, "decode_chunk", killed_after_two_chunks)
    data_dir = tmp_path / "tfds"
    with pytest.raises(KeyboardInterrupt):
        speaker_corpus.prepare(csv_path, mixed_corpus, data_dir, workers=1, chunk_size=3)
    assert sorted(p.name for p in (data_dir / "train.staging").glob("chunk-*")) == [
        "chunk-000000.npz",
        "chunk-000001.npz",
    ]
    (data_dir / "train.staging" / "chunk-000002.npz.tmp").write_bytes(b"PK half-written by a killed worker")
    # Killed again, while TFDS writes the records (stage 2): nothing is taken for a prepared dataset.
    monkeypatch.setattr(staging, "decode_chunk", lambda task: (decoded.append(task.index), decode(task))[1])
    generate = speaker_corpus.SpeakerCorpus._generate_examples

    def killed_after_three_records(self):
        for i, example in enumerate(generate(self)):
            if i == 3:
                raise KeyboardInterrupt
            yield example

    monkeypatch.setattr(speaker_corpus.SpeakerCorpus, "_generate_examples", killed_after_three_records)
    with pytest.raises(KeyboardInterrupt):
        speaker_corpus.prepare(csv_path, mixed_corpus, data_dir, workers=1, chunk_size=3)
    assert decoded == [0, 1, 2, 3]  # 10 files in chunks of 3: only chunks 2 and 3 were left
    config = speaker_corpus.SpeakerCorpusConfig(name="train")
    assert not speaker_corpus.SpeakerCorpus(config=config, data_dir=str(data_dir)).is_prepared()
    monkeypatch.undo()
    resumed = speaker_corpus.prepare(csv_path, mixed_corpus, data_dir, workers=1, chunk_size=3)
    _assert_same_records(_records(resumed), reference)
    assert (data_dir / "train.index.csv").read_text() == (tmp_path / "reference" / "train.index.csv").read_text()


def test_staging_of_another_csv_is_refused(mixed_corpus, tmp_path, monkeypatch):
    csv_path = mixed_corpus / "train.csv"
    (tmp_path / "tfds" / "train.staging").mkdir(parents=True)
    (tmp_path / "tfds" / "train.staging" / "KEY").write_text("0123456789abcdef\n")
    with pytest.raises(InputError, match=r"train.staging holds a preparation of another CSV.*delete that folder"):
        speaker_corpus.prepare(csv_path, mixed_corpus, tmp_path / "tfds", workers=1)


def test_flac_storage_decodes_to_the_int16_records(mixed_corpus, tmp_path):
    csv_path = mixed_corpus / "train.csv"
    pcm = speaker_corpus.prepare(csv_path, mixed_corpus, tmp_path / "pcm", workers=1)
    flac = speaker_corpus.prepare(csv_path, mixed_corpus, tmp_path / "flac", workers=1, storage="flac")
    assert flac.info.metadata["storage"] == "flac" and pcm.info.metadata["storage"] == "int16"
    pcm_records, flac_records = _records(pcm), _records(flac)
    assert len(flac_records) == len(pcm_records)
    for p, f in zip(pcm_records, flac_records):
        assert f["audio"].dtype == np.uint8 and bytes(f["audio"][:4]) == b"fLaC"
        np.testing.assert_array_equal(speaker_corpus.decode_audio(f["audio"]), p["audio"])
        np.testing.assert_array_equal(speaker_corpus.decode_audio(p["audio"]), p["audio"])
        assert f["file"] == p["file"] and f["index"] == p["index"]
    with pytest.raises(InputError, match="stores audio as flac, not int16"):
        speaker_corpus.prepare(csv_path, mixed_corpus, tmp_path / "flac", workers=1)


def test_silent_files_are_kept_and_reported_as_warnings(tmp_path, caplog):
    base = tmp_path / "corpus"
    write_wav(base / "s1/a/voice.wav", _tone(1.0))
    write_wav(base / "s1/a/silent.wav", np.zeros(16000))
    (base / "train.csv").write_text("File,Speaker\ns1/a/voice.wav,s1\ns1/a/silent.wav,s1\n")
    builder = speaker_corpus.prepare(base / "train.csv", base, tmp_path / "tfds", workers=1)
    assert builder.info.splits["train"].num_examples == 2
    assert _report(tmp_path / "tfds" / "train.report.csv") == {"silent.wav": ("warning", "silent (all samples zero)")}
    assert "1 file(s) digitally silent (kept)" in caplog.text


def test_preparation_that_does_not_fit_on_disk_is_refused(mixed_corpus, tmp_path, monkeypatch, capsys):
    from data_pipelines import staging

    monkeypatch.setattr(staging, "free_bytes", lambda folder: 10**5)
    with pytest.raises(InputError, match=r"not enough disk space on .*tfds: preparing 10 files .* 0\.1 MB free"):
        speaker_corpus.prepare(mixed_corpus / "train.csv", mixed_corpus, tmp_path / "tfds", workers=1)
    assert not (tmp_path / "tfds" / "train.staging").exists()  # refused before anything was written
    # The plan printed first: the disk needed is 3 copies (staging, TFDS's temporary one, records) of 16-bit audio.
    needed_mb = float(re.search(r"needs up to ([\d.]+) MB", capsys.readouterr().out).group(1))
    seconds = sum(sf.info(str(p)).duration for p in mixed_corpus.rglob("*.wav"))
    seconds += speaker_corpus.audio_io.duration_seconds(next(mixed_corpus.rglob("*.m4a")))
    assert needed_mb == pytest.approx(3 * 2 * 16000 * seconds / 1e6, abs=0.051)


def test_a_prepared_dataset_with_missing_shards_is_refused(demo_dir, tmp_path):
    from data_pipelines import input_pipeline

    config = input_pipeline.default_config()
    config.train_csv = str(tmp_path / "train.csv")
    config.base_dir = str(demo_dir)
    config.tfds_dir = str(tmp_path / "tfds")
    config.prepare_workers = 1
    (tmp_path / "train.csv").write_text("\n".join((demo_dir / corpus.TRAIN_CSV).read_text().splitlines()[:4]) + "\n")
    assert len(input_pipeline.load_source(config)) == 3
    shard = next((tmp_path / "tfds").rglob("*.array_record*"))
    shard.unlink()
    with pytest.raises(InputError, match=r"is incomplete: 1 of its 1 shard files are missing.*prepare` again"):
        input_pipeline.load_source(config)


def test_tfds_preparation_messages_do_not_reach_the_user(tmp_path, capsys, caplog):
    base = tmp_path / "corpus"
    write_wav(base / "s1/a/voice.wav", _tone(1.0))
    (base / "train.csv").write_text("File,Speaker\ns1/a/voice.wav,s1\n")
    data_dir = tmp_path / "tfds"
    with caplog.at_level("INFO"):
        speaker_corpus.prepare(base / "train.csv", base, data_dir, workers=1)
    out = capsys.readouterr().out
    assert "preparing 1 files" in out  # ours
    assert "Downloading and preparing dataset" not in out
    assert "has no dataset_info.json" not in caplog.text and "Using custom data configuration" not in caplog.text


def test_bench_prepare_counts_files_and_extrapolates(tmp_path):
    from ssps_jax.bench import prepare as bench_prepare

    result = bench_prepare.run(tmp_path, files=6, seconds=1.2, fmt="wav", workers=[1], storage="int16")
    row = result["rows"][0]
    assert row["workers"] == 1 and row["files"] == 6
    assert 0 < row["stage1_s"] <= row["total_s"]
    wavs = sorted((tmp_path / "corpus").rglob("*.wav"))
    assert len(wavs) == 6 and result["audio_seconds"] == pytest.approx(sum(sf.info(str(p)).duration for p in wavs))
    hours = bench_prepare.VOXCELEB2_DEV_FILES / (6 / row["total_s"]) / 3600
    assert f"| {hours:.1f} h |" in bench_prepare.table(result)
