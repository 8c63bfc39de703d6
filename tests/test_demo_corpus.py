"""The embedded demo corpus: layout, determinism, and that it carries speaker AND session."""

import csv
import dataclasses
import hashlib
import itertools
import json

import librosa
import numpy as np
import pytest
import soundfile as sf
from conftest import SMALL_CORPUS
from scipy import signal
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve
from sklearn.preprocessing import StandardScaler

from data_pipelines import manifests
from data_pipelines.demo_corpus import channel, corpus, voice
from data_pipelines.errors import InputError
from ssps_jax import cli


def _tree_digest(root):
    """{relative path: sha256} of every file under root."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


TINY_ARGS = [
    "--seed=3",
    "--train-speakers=3",
    "--test-speakers=2",
    "--sessions=2",
    "--utterances=2",
    "--min-seconds=1",
    "--max-seconds=1.5",
]


def test_prepare_demo_twice_is_byte_identical(tmp_path):
    # Same seed, different worker counts: the same bytes in every file.
    cli.main(["prepare-demo", str(tmp_path / "a"), *TINY_ARGS, "--workers=1"])
    cli.main(["prepare-demo", str(tmp_path / "b"), *TINY_ARGS, "--workers=2"])
    a, b = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert len(a) > 20
    assert a == b
    cli.main(["prepare-demo", str(tmp_path / "c"), *TINY_ARGS, "--workers=1", "--seed=4"])
    c = _tree_digest(tmp_path / "c")
    assert a.keys() != c.keys() or all(a[k] != c[k] for k in a if k.endswith(".wav"))


def test_default_size_and_scale():
    spec = corpus.DemoCorpusSpec()
    assert spec.train_speakers >= 60 and spec.sessions >= 3 and spec.test_speakers >= 20
    assert (spec.min_seconds, spec.max_seconds) == (3.0, 8.0)
    grown = spec.scaled(2.5)
    assert (grown.train_speakers, grown.test_speakers) == (150, 50)
    assert dataclasses.replace(grown, train_speakers=spec.train_speakers, test_speakers=spec.test_speakers) == spec


def _spectral_distortion(clean, recorded):
    """Mean |dB difference| of the Welch spectra, the overall gain taken out."""
    _, a = signal.welch(clean, voice.SAMPLE_RATE, nperseg=512)
    _, b = signal.welch(recorded, voice.SAMPLE_RATE, nperseg=512)
    d = 10 * np.log10(b + 1e-12) - 10 * np.log10(a + 1e-12)
    return float(np.mean(np.abs(d - d.mean())))


def test_mild_channels_colour_speech_less():
    """channel.milder keeps a recording condition (room, noise draws) but changes the speech less, every time."""
    rng = np.random.default_rng(0)
    speech = voice.synthesize(voice.sample_voice(rng), rng, 2.0)
    for k in range(8):
        drawn = channel.sample_channel(np.random.default_rng([1, k]))
        default, mild = (
            _spectral_distortion(speech, channel.apply_channel(speech, c, np.random.default_rng(k)))
            for c in (drawn, channel.milder(drawn))
        )
        assert mild < default, (k, mild, default)


@pytest.mark.parametrize(
    "change, message",
    [({"channels": "loud"}, "channels must be one of default, mild, got 'loud'"), ({"session_drift": -1.0}, "-1.0")],
)
def test_bad_regime_is_a_clear_error(tmp_path, change, message):
    with pytest.raises(InputError, match=message):
        corpus.write_demo_corpus(tmp_path, dataclasses.replace(SMALL_CORPUS, **change))
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_layout(demo_dir):
    train = _rows(demo_dir / corpus.TRAIN_CSV)
    test = _rows(demo_dir / corpus.TEST_CSV)
    assert list(train[0]) == ["File", "Speaker", "Session"]
    for rows, n_speakers in ((train, SMALL_CORPUS.train_speakers), (test, SMALL_CORPUS.test_speakers)):
        assert len(rows) == n_speakers * SMALL_CORPUS.sessions * SMALL_CORPUS.utterances
        assert len({r["Speaker"] for r in rows}) == n_speakers
        for speaker, group in itertools.groupby(rows, key=lambda r: r["Speaker"]):
            assert len({r["Session"] for r in group}) == SMALL_CORPUS.sessions, speaker
    for r in train[:: len(train) // 7] + test[:3]:
        # sslsv layout: demo/<speaker>/<session>/<utt>.wav, relative to the base folder.
        assert r["File"].split("/")[:3] == ["demo", r["Speaker"], r["Session"]]
        info = sf.info(demo_dir / r["File"])
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert SMALL_CORPUS.min_seconds <= info.duration <= SMALL_CORPUS.max_seconds + 1e-3
    for category in ("speech", "music", "noise"):
        assert len(list((demo_dir / "musan_split" / category).glob("*/*.wav"))) == SMALL_CORPUS.background_files
    assert len(list((demo_dir / "simulated_rirs").glob("*/*/*.wav"))) == 3 * SMALL_CORPUS.rirs_per_room
    assert json.loads((demo_dir / "demo_corpus.json").read_text()) == dataclasses.asdict(SMALL_CORPUS)
    # The manifest parser accepts what the generator writes.
    assert len(manifests.read_utterances(demo_dir / corpus.TRAIN_CSV)) == len(train)


def test_trials_are_speaker_disjoint_cross_session_and_balanced(demo_dir):
    train_speakers = {r["Speaker"] for r in _rows(demo_dir / corpus.TRAIN_CSV)}
    test = {r["File"]: r for r in _rows(demo_dir / corpus.TEST_CSV)}
    trials = manifests.read_trials(demo_dir / corpus.TRIALS, base_dir=demo_dir)
    labels = np.array([t.label for t in trials])
    assert labels.sum() == (1 - labels).sum()  # balanced
    n_targets = SMALL_CORPUS.test_speakers * (SMALL_CORPUS.sessions * (SMALL_CORPUS.sessions - 1) // 2)
    assert labels.sum() == n_targets * SMALL_CORPUS.utterances**2  # every cross-session pair
    assert len({(t.enrol, t.test) for t in trials}) == len(trials)
    for t in trials:
        a, b = test[t.enrol], test[t.test]
        assert a["Speaker"] not in train_speakers and b["Speaker"] not in train_speakers
        assert t.label == (a["Speaker"] == b["Speaker"])
        if t.label:
            assert a["Session"] != b["Session"]


def _eer(target_scores, nontarget_scores):
    """EER from scikit-learn's ROC, as an independent reference."""
    y = np.r_[np.ones(len(target_scores)), np.zeros(len(nontarget_scores))]
    fpr, tpr, _ = roc_curve(y, np.r_[target_scores, nontarget_scores])
    fnr = 1 - tpr
    i = np.argmin(np.abs(fnr - fpr))
    return (fpr[i] + fnr[i]) / 2


@pytest.fixture(scope="module")
def mfcc_stats(demo_dir):
    """MFCC mean+std per train utterance, with speaker, session and utterance number."""
    rows = _rows(demo_dir / corpus.TRAIN_CSV)
    feats = []
    for r in rows:
        x, sr = sf.read(demo_dir / r["File"], dtype="float32")
        m = librosa.feature.mfcc(y=x, sr=sr, n_mfcc=20, n_fft=512, hop_length=160, n_mels=40)
        feats.append(np.concatenate([m.mean(axis=1), m.std(axis=1)]))
    speaker = np.array([r["Speaker"] for r in rows])
    session = np.array([r["Session"] for r in rows])
    utt = np.array([int(r["File"][-9:-4]) for r in rows])
    return np.stack(feats), speaker, session, utt


def test_corpus_carries_speaker_and_session(mfcc_stats):
    x, speaker, session, utt = mfcc_stats
    train = utt <= SMALL_CORPUS.utterances - 2  # hold out 2 utterances of every session
    x = StandardScaler().fit(x[train]).transform(x)
    accuracy = {}
    for name, y in (("speaker", speaker), ("session", session)):
        clf = LogisticRegression(max_iter=5000).fit(x[train], y[train])
        accuracy[name] = float(np.mean(clf.predict(x[~train]) == y[~train]))
        chance = 1 / len(set(y))
        print(f"{name}: accuracy {accuracy[name]:.3f}, chance {chance:.3f}")
        assert accuracy[name] > 8 * chance
    # Session is more than speaker: it is predictable among one speaker's sessions.
    clf = LogisticRegression(max_iter=5000).fit(x[train], session[train])
    proba = clf.predict_proba(x[~train])
    column = {c: i for i, c in enumerate(clf.classes_)}
    sessions_of = {s: sorted(set(session[speaker == s])) for s in set(speaker)}
    predicted = [max(sessions_of[s], key=lambda c: p[column[c]]) for s, p in zip(speaker[~train], proba)]
    within = np.mean(np.array(predicted) == session[~train])
    print(f"session among the speaker's own {SMALL_CORPUS.sessions}: accuracy {within:.3f}")
    assert within > 2 / SMALL_CORPUS.sessions


def test_channel_is_a_confound_for_cosine_scoring(mfcc_stats):
    x, speaker, session, _ = mfcc_stats
    x = StandardScaler().fit_transform(x)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scores = x @ x.T
    iu = np.triu_indices(len(x), 1)
    same_speaker = (speaker[:, None] == speaker[None])[iu]
    same_session = (session[:, None] == session[None])[iu]
    s = scores[iu]
    eer_same = _eer(s[same_speaker & same_session], s[~same_speaker])
    eer_cross = _eer(s[same_speaker & ~same_session], s[~same_speaker])
    print(f"EER same-session targets {eer_same:.3f}, cross-session targets {eer_cross:.3f}")
    assert eer_cross > eer_same + 0.10
