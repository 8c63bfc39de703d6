"""Augmentation: SNR accuracy per category, the RIR path, strategies, bad folders."""

import numpy as np
import pytest

from data_pipelines.audio_io import write_wav
from data_pipelines.augment import CATEGORIES, AugmentConfig, Augmenter
from data_pipelines.errors import InputError


def _speechlike(n, seed):
    rng = np.random.default_rng(seed)
    envelope = np.repeat(rng.uniform(0.0, 1.0, n // 800 + 1), 800)[:n]  # syllable-ish bursts
    return (0.1 * envelope * rng.normal(size=n)).astype(np.float32)


@pytest.fixture
def banks(tmp_path):
    """One noise folder per category (MUSAN layout) and one RIR folder."""
    rng = np.random.default_rng(0)
    for c in CATEGORIES:
        for k in range(2):
            # Shorter and longer than a 2 s crop, to exercise excerpting and wrap-padding.
            write_wav(tmp_path / "musan" / c / "src" / f"{c}-{k}.wav", 0.3 * rng.uniform(-1, 1, (1 + 2 * k) * 16000))
    rir = np.exp(-np.arange(4000) / 600) * rng.normal(size=4000)
    rir[0] = 3.0
    write_wav(tmp_path / "rirs" / "smallroom" / "Room001" / "Room001-00001.wav", 0.9 * rir / np.abs(rir).max())
    return tmp_path


def _snr_db(clean, augmented):
    noise = augmented.astype(np.float64) - clean
    return 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise**2))


@pytest.mark.parametrize("category", CATEGORIES)
def test_noise_snr_within_half_a_db_of_target(banks, category, tmp_path):
    # Only this category's folder is given, so it is the one drawn.
    only = tmp_path / f"only-{category}"
    only.mkdir()
    (only / category).symlink_to(banks / "musan" / category)
    rng = np.random.default_rng(1)
    for target in (0.0, 7.5, 20.0):
        snr = tuple((target, target) for _ in CATEGORIES)
        aug = Augmenter(AugmentConfig(strategy="noise", snr=snr), noise_dir=only, rir_dir=None)
        for seed in range(5):
            clean = _speechlike(32000, seed)
            assert abs(_snr_db(clean, aug(clean, rng)) - target) < 0.5
    # Default ranges (docs/method.md §10): the realised SNR falls in the category's range.
    lo, hi = AugmentConfig().snr[CATEGORIES.index(category)]
    aug = Augmenter(AugmentConfig(strategy="noise"), noise_dir=only, rir_dir=None)
    snrs = [_snr_db(c, aug(c, rng)) for c in (_speechlike(32000, s) for s in range(40))]
    assert lo - 0.5 < min(snrs) and max(snrs) < hi + 0.5
    assert max(snrs) - min(snrs) > (hi - lo) / 3  # drawn across the range, not fixed


def test_reverb_is_unit_energy_rir_convolution_truncated(banks):
    aug = Augmenter(AugmentConfig(strategy="reverb"), noise_dir=None, rir_dir=banks / "rirs")
    import soundfile as sf

    rir, _ = sf.read(banks / "rirs/smallroom/Room001/Room001-00001.wav", dtype="float64")
    rir /= np.sqrt(np.sum(rir**2))
    clean = _speechlike(32000, 3)
    expected = np.convolve(clean.astype(np.float64), rir)[: len(clean)]
    out = aug(clean, np.random.default_rng(0))
    assert out.shape == clean.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_strategies(banks):
    clean = _speechlike(32000, 4)
    rng = np.random.default_rng(0)

    def augmenter(strategy, aug_prob=1.0):
        return Augmenter(AugmentConfig(strategy=strategy, aug_prob=aug_prob), banks / "musan", banks / "rirs")

    reverbed = augmenter("reverb")(clean, rng)
    # p = 0 leaves every input untouched.
    assert all(np.array_equal(augmenter("both", aug_prob=0.0)(clean, rng), clean) for _ in range(10))

    def kinds(strategy, n=60):
        """What each call did: 'none', 'reverb', 'noise' or 'both'."""
        out = []
        for _ in range(n):
            y = augmenter(strategy)(clean, rng)
            if np.array_equal(y, clean):
                out.append("none")
            elif np.allclose(y, reverbed, atol=1e-5):
                out.append("reverb")
            elif abs(np.corrcoef(y, clean)[0, 1]) > abs(np.corrcoef(y, reverbed)[0, 1]):
                out.append("noise")
            else:
                out.append("both")
        return set(out)

    assert kinds("reverb") == {"reverb"}
    assert kinds("noise") == {"noise"}
    assert kinds("either") == {"reverb", "noise"}
    assert kinds("all") == {"none", "reverb", "noise", "both"}
    assert kinds("both") == {"both"}
    # aug_prob = 0.5: about half untouched.
    half = augmenter("reverb", aug_prob=0.5)
    untouched = sum(np.array_equal(half(clean, rng), clean) for _ in range(200))
    assert 70 < untouched < 130


def test_same_generator_state_same_output(banks):
    aug = Augmenter(AugmentConfig(strategy="all"), banks / "musan", banks / "rirs")
    clean = _speechlike(32000, 5)
    outs = [aug(clean, np.random.default_rng(42)) for _ in range(2)]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(InputError, match=r"noise_dir .*nothing-here"):
        Augmenter(AugmentConfig(strategy="noise"), tmp_path / "nothing-here", None)
    with pytest.raises(InputError, match=r"rir_dir .*no-rirs"):
        Augmenter(AugmentConfig(strategy="reverb"), None, tmp_path / "no-rirs")
    with pytest.raises(InputError, match="strategy"):
        AugmentConfig(strategy="chorus")
    with pytest.raises(InputError, match="snr"):
        AugmentConfig(snr=((5, 1), (0, 1), (0, 1)))
