"""Crops (docs/method.md §2): lengths, positions, wrap-padding, a clean reference crop."""

import numpy as np
import pytest

from data_pipelines.crops import CropConfig, make_views, random_crop, wrap_pad
from data_pipelines.errors import InputError


def _find(haystack, needle):
    """Start positions where `needle` occurs in `haystack`."""
    candidates = np.flatnonzero(haystack[: len(haystack) - len(needle) + 1] == needle[0])
    return [i for i in candidates if np.array_equal(haystack[i : i + len(needle)], needle)]


def test_wrap_pad_repeats_from_the_start():
    x = np.arange(1, 8, dtype=np.float32)  # 7 samples
    np.testing.assert_array_equal(wrap_pad(x, 17), np.tile(x, 3)[:17])
    np.testing.assert_array_equal(wrap_pad(x, 7), x)
    np.testing.assert_array_equal(wrap_pad(x, 3), x)  # long enough: unchanged, not cut


def test_random_crop_positions_are_uniform_over_all_starts():
    x = np.arange(100, dtype=np.float32)
    rng = np.random.default_rng(0)
    starts = []
    for _ in range(4000):
        crop = random_crop(x, 91, rng)
        assert len(crop) == 91
        np.testing.assert_array_equal(crop, x[int(crop[0]) : int(crop[0]) + 91])
        starts.append(int(crop[0]))
    counts = np.bincount(starts, minlength=10)
    assert len(counts) == 10  # starts 0..9, no other
    assert counts.min() > 300 and counts.max() < 500  # ~400 each


def test_short_audio_is_wrap_padded_before_cropping():
    x = np.arange(1, 51, dtype=np.float32)  # 50 samples, crop of 120
    crop = random_crop(x, 120, np.random.default_rng(1))
    np.testing.assert_array_equal(crop, np.tile(x, 3)[:120])


def test_siamese_views_are_2s_augmented_and_reference_is_a_clean_4s_crop():
    rng = np.random.default_rng(0)
    audio = rng.normal(size=5 * 16000).astype(np.float32)
    calls = []

    def augment(crop, rng):
        calls.append(len(crop))
        return -crop  # exact, and unmistakable

    out = make_views(audio, CropConfig(), rng, augment)
    assert set(out) == {"views", "reference"}
    assert out["views"].shape == (2, 32000) and out["views"].dtype == np.float32
    assert out["reference"].shape == (64000,) and out["reference"].dtype == np.float32
    assert calls == [32000, 32000]  # each view augmented once, the reference never
    assert len(_find(audio, out["reference"])) == 1  # an untouched crop of the input
    for view in out["views"]:
        assert len(_find(audio, -view)) == 1


def test_dino_views():
    rng = np.random.default_rng(0)
    audio = rng.normal(size=3 * 16000).astype(np.float32)  # shorter than the 4 s crops
    calls = []
    out = make_views(audio, CropConfig(mode="dino"), rng, lambda c, r: calls.append(len(c)) or c)
    assert out["global_views"].shape == (2, 64000)
    assert out["local_views"].shape == (4, 32000)
    assert out["reference"].shape == (64000,)
    assert calls == [64000] * 2 + [32000] * 4
    padded = wrap_pad(audio, 64000)
    for view in [*out["global_views"], *out["local_views"], out["reference"]]:
        assert len(_find(padded, view)) >= 1


def test_crops_are_independent_and_reference_is_optional():
    audio = np.random.default_rng(0).normal(size=10 * 16000).astype(np.float32)
    out = make_views(audio, CropConfig(reference_seconds=0), np.random.default_rng(3))
    assert set(out) == {"views"}
    a, b = (_find(audio, v)[0] for v in out["views"])
    assert a != b


@pytest.mark.parametrize("field, value", [("mode", "simclr"), ("frame_seconds", 0), ("reference_seconds", -1)])
def test_invalid_crop_config_names_the_field(field, value):
    with pytest.raises(InputError, match=field):
        CropConfig(**{field: value})
