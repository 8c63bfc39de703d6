"""Waveform augmentation with MUSAN-style noises and room impulse responses.

Folder layouts are those sslsv prepares:

  <noise_dir>/<category>/<source>/*.wav    category in speech | music | noise
  <rir_dir>/<room type>/<room>/*.wav

Behaviour follows sslsv's DataAugmentation (facts, not code): a RIR is
normalised to unit energy and the convolution is truncated to the input
length; a noise category is drawn uniformly, then 1 (by default) file of it,
cropped (wrap-padded) to the input length and scaled to an SNR drawn
uniformly from the category's range. One deliberate difference: SNRs are
exact (powers get a 1e-12 guard, not sslsv's 1e-4 offset in dB), so the
augmentation strength does not depend on the recording level.

All randomness comes from the `rng` argument, so that grain's per-record
generators make the pipeline deterministic and resumable.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import soundfile as sf
from etils import epath
from scipy import signal

from data_pipelines import audio_io, paths
from data_pipelines.crops import random_crop
from data_pipelines.errors import InputError

STRATEGIES = ("reverb", "noise", "either", "both", "all")
CATEGORIES = ("speech", "music", "noise")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    strategy: str = "both"
    aug_prob: float = 1.0
    # SNR ranges in dB and number of files per category (docs/method.md §10).
    snr: tuple[tuple[float, float], ...] = ((13.0, 20.0), (5.0, 15.0), (0.0, 15.0))
    count: tuple[tuple[int, int], ...] = ((1, 1), (1, 1), (1, 1))

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise InputError(f"augment strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not 0.0 <= self.aug_prob <= 1.0:
            raise InputError(f"augment aug_prob must be in [0, 1], got {self.aug_prob}")
        for name, ranges in (("snr", self.snr), ("count", self.count)):
            if len(ranges) != len(CATEGORIES) or any(lo > hi for lo, hi in ranges):
                raise InputError(f"augment {name} needs one (low, high) per category {CATEGORIES}, got {ranges}")


def add_noise(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """clean + noise scaled so that 10 log10(P_clean / P_scaled_noise) = snr_db."""
    p_clean = np.mean(np.square(clean, dtype=np.float64))
    p_noise = np.mean(np.square(noise, dtype=np.float64))
    scale = np.sqrt(p_clean / (max(p_noise, 1e-12) * 10 ** (snr_db / 10)))
    return (clean + scale * noise).astype(clean.dtype)


def reverberate(x: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolution with the unit-energy RIR, truncated to the input length."""
    rir = rir / max(np.sqrt(np.sum(np.square(rir, dtype=np.float64))), 1e-12)
    return signal.fftconvolve(x, rir.astype(x.dtype))[: len(x)]


def _wav_files(folder: epath.Path, pattern: str) -> list[epath.Path]:
    return sorted(folder.glob(pattern))


class Augmenter:
    """Applies the configured strategy to float32 waveforms.

    Only file lists are built at construction (cheap to pickle into grain
    worker processes); audio is read on demand, a random excerpt at a time.
    """

    def __init__(self, config: AugmentConfig, noise_dir: epath.PathLike | None, rir_dir: epath.PathLike | None):
        self.config = config
        need_noise = config.strategy != "reverb"
        need_rir = config.strategy != "noise"
        self.noise_files: dict[str, list[epath.Path]] = {}
        if noise_dir and need_noise:
            for category in CATEGORIES:
                files = _wav_files(epath.Path(noise_dir) / category, "*/*.wav")
                if files:
                    self.noise_files[category] = files
        self.rir_files = _wav_files(epath.Path(rir_dir), "*/*/*.wav") if rir_dir and need_rir else []
        if need_noise and not self.noise_files:
            raise InputError(
                f"augment strategy {config.strategy!r} adds noise, but noise_dir {noise_dir!r} has no "
                f"<category>/<source>/*.wav file for categories {CATEGORIES}"
            )
        if need_rir and not self.rir_files:
            raise InputError(
                f"augment strategy {config.strategy!r} adds reverb, but rir_dir {rir_dir!r} has no "
                "<room type>/<room>/*.wav file"
            )

    def _read_excerpt(self, path: epath.Path, length: int, rng: np.random.Generator) -> np.ndarray:
        """A random `length`-sample excerpt of `path`, wrap-padded if shorter."""
        with paths.readable(path) as source, sf.SoundFile(source) as f:
            if f.frames > length:
                f.seek(int(rng.integers(0, f.frames - length + 1)))
                return f.read(length, dtype="float32", always_2d=True).mean(axis=1)
            audio = f.read(dtype="float32", always_2d=True)
        return random_crop(audio.mean(axis=1), length, rng)

    def reverb(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        path = self.rir_files[rng.integers(len(self.rir_files))]
        rir = audio_io.read_audio(path).samples.astype(np.float32) / 32768.0
        return reverberate(x, rir)

    def noise(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        categories = list(self.noise_files)
        category = categories[rng.integers(len(categories))]
        c = CATEGORIES.index(category)
        files = self.noise_files[category]
        count = min(int(rng.integers(self.config.count[c][0], self.config.count[c][1] + 1)), len(files))
        out = x
        for k in rng.choice(len(files), size=count, replace=False):
            noise = self._read_excerpt(files[k], len(x), rng)
            out = out + (add_noise(x, noise, rng.uniform(*self.config.snr[c])) - x)
        return out

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.config.aug_prob:
            return x
        strategy = self.config.strategy
        if strategy == "either":
            strategy = ("reverb", "noise")[rng.integers(2)]
        elif strategy == "all":
            strategy = ("none", "reverb", "noise", "both")[rng.integers(4)]
        if strategy in ("reverb", "both"):
            x = self.reverb(x, rng)
        if strategy in ("noise", "both"):
            x = self.noise(x, rng)
        return x.astype(np.float32)
