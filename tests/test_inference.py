"""A trained model outside training: `extract`, `score` and the Verifier API agree with `evaluate`.

One tiny SimCLR run is trained for an epoch with its evaluation (cosine and
AS-Norm scores written per trial); the embeddings `extract` writes, the
scores `score` prints and those of the Python API are compared with the
scores that evaluation wrote for the same trials.
"""

import json

import numpy as np
import pytest
from conftest import tiny_config

from data_pipelines import audio_io
from data_pipelines.demo_corpus import corpus
from data_pipelines.errors import InputError
from ssps_jax import cli
from ssps_jax import extract as extract_lib
from ssps_jax.evaluation.verification import trial_list_name
from ssps_jax.inference import Verifier

TOL = 2e-5  # the scores files hold 6 decimals; embeddings of one recording in other batches differ by ~1e-7


@pytest.fixture(scope="module")
def run(demo_dir, tmp_path_factory):
    """(workdir, {"cosine": {(enrol, test): score}, "as-norm": {...}}) of an epoch of tiny SimCLR, evaluated."""
    from ssps_jax.train import train

    workdir = tmp_path_factory.mktemp("inference") / "run"
    c = tiny_config(demo_dir)
    c.train.epochs = 1
    c.eval.every_epochs = 1
    c.eval.score_norm = "as-norm"
    c.eval.cohort_size = 24
    c.eval.cohort_top_k = 8
    c.eval.cohort_seconds = 1.0
    c.eval.bootstrap = 20
    train(c, workdir)
    (step_dir,) = (workdir / "eval").iterdir()
    name = trial_list_name(corpus.TRIALS)
    scores = {}
    for kind, suffix in (("cosine", ""), ("as-norm", ".as-norm")):
        rows = [line.split() for line in (step_dir / f"{name}{suffix}.scores.txt").read_text().splitlines()]
        scores[kind] = {(e, t): float(s) for s, _, e, t in rows}
    return workdir, scores


def test_extract_embeddings_give_evaluate_scores(run, demo_dir, tmp_path):
    workdir, scores = run
    out = tmp_path / "emb.npz"
    cli.main(["extract", "--workdir", str(workdir), "--trials", str(demo_dir / corpus.TRIALS), "--out", str(out)])
    got = np.load(out)
    emb, row = got["embeddings"], {f: i for i, f in enumerate(got["ids"])}
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    assert len(row) == len({f for pair in scores["cosine"] for f in pair})
    pairs = list(scores["cosine"])
    ours = np.array([emb[row[e]] @ emb[row[t]] for e, t in pairs])
    np.testing.assert_allclose(ours, [scores["cosine"][p] for p in pairs], atol=TOL)
    assert not (tmp_path / "emb.npz.parts").exists()  # joined and removed


def test_score_prints_evaluate_cosine_and_as_norm_and_decides(run, demo_dir, capsys):
    workdir, scores = run
    (metrics_path,) = workdir.glob("eval/step_*/metrics.json")
    stored = json.loads(metrics_path.read_text())["results"][trial_list_name(corpus.TRIALS)]
    for pair in list(scores["cosine"])[:2]:
        cli.main(["score", str(workdir), *(str(demo_dir / f) for f in pair)])
        *lines, decision = capsys.readouterr().out.splitlines()
        printed = dict(line.split() for line in lines)
        assert set(printed) == {"cosine", "as-norm"}
        for kind in printed:
            assert float(printed[kind]) == pytest.approx(scores[kind][pair], abs=TOL)
        # Decided on AS-Norm (the workdir's eval.score_norm) with the EER threshold its evaluation stored.
        threshold = stored["as-norm"]["eer_threshold"]
        same = float(printed["as-norm"]) >= threshold
        assert decision.startswith(f"{'same' if same else 'different'}: as-norm {printed['as-norm']} ")
        assert decision.endswith(
            f"threshold {threshold:.6f} (the EER threshold of demo_trials at step 15, from {metrics_path})"
        )

    pair = [str(demo_dir / f) for f in next(iter(scores["cosine"]))]
    cli.main(["score", str(workdir), *pair, "--no-norm", "--threshold", "-1"])
    *lines, decision = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["cosine"]
    assert decision.startswith("same: cosine ") and decision.endswith("threshold -1.000000 (--threshold)")


def test_verifier_embeds_files_and_waveforms_alike(run, demo_dir):
    workdir, scores = run
    verifier = Verifier.from_workdir(workdir, normalise=False)
    a, b = (demo_dir / f for f in next(iter(scores["cosine"])))
    wave = audio_io.read_audio(a).samples  # int16
    one = verifier.embed(a)
    assert one.shape == (16,)
    np.testing.assert_allclose(verifier.embed(wave), one, atol=1e-6)
    np.testing.assert_allclose(verifier.embed(wave.astype(np.float32) / 32768), one, atol=1e-6)
    both = verifier.embed([a, b])
    np.testing.assert_allclose(both[0], one, atol=1e-6)  # batched with another recording, or alone
    assert verifier.score(a, b) == pytest.approx(verifier.score(b, a), abs=1e-7)
    assert verifier.score(a, b) == pytest.approx(float(both[0] @ both[1]), abs=1e-6)
    assert verifier.scores(a, b) == {"cosine": pytest.approx(verifier.score(a, b), abs=1e-6)}  # no cohort
    with pytest.raises(InputError, match="1-D"):
        verifier.embed([np.zeros((2, 16000), np.float32)])


def test_extract_resumes_after_an_interruption(run, demo_dir, tmp_path, monkeypatch):
    workdir, _ = run
    files = extract_lib.read_file_list(demo_dir / corpus.TRIALS, trials=True)
    out = tmp_path / "emb.npz"
    read = audio_io.read_audio
    reads: list[str] = []

    def counted(path, **kwargs):
        reads.append(str(path))
        if fail_at is not None and str(path) == str(demo_dir / files[fail_at]):
            raise KeyboardInterrupt  # a kill in the middle of the third part
        return read(path, **kwargs)

    monkeypatch.setattr(extract_lib.audio_io, "read_audio", counted)
    fail_at = 40
    with pytest.raises(KeyboardInterrupt):
        extract_lib.extract(workdir, files, out, part_files=16)
    assert sorted(p.name for p in (tmp_path / "emb.npz.parts").glob("*.npy")) == ["0.npy", "1.npy"]
    assert not out.exists()

    fail_at, reads[:] = None, []
    extract_lib.extract(workdir, files, out, part_files=16)
    assert {r.split(str(demo_dir) + "/")[1] for r in reads} == set(files[32:])  # only the missing parts
    resumed = np.load(out)
    assert list(resumed["ids"]) == files

    whole = tmp_path / "whole.npz"
    extract_lib.extract(workdir, files, whole)
    np.testing.assert_allclose(resumed["embeddings"], np.load(whole)["embeddings"], atol=1e-6)


def test_extract_refuses_to_mix_extractions_and_names_missing_files(run, demo_dir, tmp_path):
    workdir, _ = run
    files = extract_lib.read_file_list(demo_dir / corpus.TRIALS, trials=True)
    parts = tmp_path / "emb.npz.parts"
    parts.mkdir()
    (parts / "source.json").write_text(json.dumps({"workdir": str(workdir.resolve()), "step": 0, "files": "x"}))
    with pytest.raises(InputError, match=r"another extraction \(its step, files differ\)"):
        extract_lib.extract(workdir, files, tmp_path / "emb.npz")
    with pytest.raises(InputError, match=r"1 of the 2 listed files are missing, e.g. .*nowhere\.wav"):
        extract_lib.extract(workdir, [files[0], "nowhere.wav"], tmp_path / "other.npz")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# test files\n{files[0]}\n\n{files[0]}\n")
    with pytest.raises(InputError, match="more than once"):
        extract_lib.read_file_list(listing)


def test_exports_through_the_cli_embed_as_the_workdir(run, demo_dir, tmp_path):
    """`export --format stablehlo` and `--format sslsv` (then import) give the workdir's embeddings."""
    from ssps_jax.export import load_stablehlo
    from ssps_jax.sslsv_checkpoint import import_sslsv
    from ssps_jax.train import load_config

    workdir, scores = run
    files = [demo_dir / f for f in next(iter(scores["cosine"]))]
    verifier = Verifier.from_workdir(workdir, normalise=False)
    expected = verifier.embed(files)

    cli.main(["export", "--workdir", str(workdir), "--format", "stablehlo", "--out", str(tmp_path / "m.stablehlo")])
    waves = [audio_io.read_audio(f).samples.astype(np.float32) / 32768 for f in files]
    batch = np.zeros((2, max(map(len, waves))), np.float32)
    for row, w in zip(batch, waves):
        row[: len(w)] = w
    got = load_stablehlo(tmp_path / "m.stablehlo")(batch, np.array([len(w) for w in waves], np.int32))
    np.testing.assert_allclose(got, expected, atol=1e-5)

    cli.main(["export", "--workdir", str(workdir), "--format", "sslsv", "--out", str(tmp_path / "model.pt")])
    import_sslsv(tmp_path / "model.pt", load_config(workdir), tmp_path / "imported")
    again = Verifier.from_workdir(tmp_path / "imported", normalise=False)
    assert again.step == 0
    np.testing.assert_array_equal(again.embed(files), expected)
