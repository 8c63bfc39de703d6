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

Augmenting a crop is two halves, so that the arithmetic can run on the host
or on the accelerator (`data.augment.on`) from the same random choices:

  `Augmenter.draw`   every random choice for one crop -- augment or not (aug_prob),
                     the strategy (either / all), which RIR, the noise category,
                     how many of its files and which, each file's excerpt, each
                     SNR -- with the int16 audio they pick: a `Draw`. Always on the
                     host, from the caller's generator.
  `Augmenter.apply`  the arithmetic on the host (NumPy / SciPy): reverberation,
                     then every noise scaled to its SNR against the reverberated
                     crop and added (several speech files make babble).
  `Augmenter.pack`   the draws of a group of crops as fixed-shape int16 arrays and
                     SNRs, for ssps_jax/device_augment.py to do the same arithmetic
                     inside the train step.

Where the randomness lives (decided once, for both paths): on the host, from
the `rng` argument, which the input pipeline takes from grain's per-record
generator (seeded by the seed and the record's position in the epoch). So a
record's crops and draws depend on nothing else: a resumed run, any number of
grain workers, hosts or devices see the same ones, and the accelerator's part
is a deterministic function of the batch (no device keys at all).

Augmentation files are read through `AudioBank`: 16 kHz mono PCM-16 WAV files
(MUSAN and the simulated RIRs as distributed, and `ssps-jax prepare-demo`'s)
are read in place, only the excerpt drawn, at the data offset of their
header (parsed once per process by scipy.io.wavfile); any other file is
decoded whole by audio_io.read_audio (converted to 16 kHz mono) when drawn.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import numpy as np
from etils import epath
from scipy import signal
from scipy.io import wavfile

from data_pipelines import audio_io, paths
from data_pipelines.crops import random_crop
from data_pipelines.errors import InputError

STRATEGIES = ("reverb", "noise", "either", "both", "all")
CATEGORIES = ("speech", "music", "noise")
PCM_SCALE = 32768.0  # int16 -> float, as soundfile reads PCM-16
PACKED = ("rir", "noise", "snr")  # what `Augmenter.pack` gives a group of crops, each `<group>_<name>` in a batch

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    strategy: str = "both"
    aug_prob: float = 1.0
    # SNR ranges in dB and number of files per category (docs/method.md §10).
    snr: tuple[tuple[float, float], ...] = ((13.0, 20.0), (5.0, 15.0), (0.0, 15.0))
    count: tuple[tuple[int, int], ...] = ((1, 1), (1, 1), (1, 1))
    # On the accelerator, RIRs travel at a fixed length: the first `rir_seconds` of the drawn RIR
    # (zero-padded), the rest is cut. The host path convolves whole RIRs.
    rir_seconds: float = 1.0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise InputError(f"augment strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not 0.0 <= self.aug_prob <= 1.0:
            raise InputError(f"augment aug_prob must be in [0, 1], got {self.aug_prob}")
        for name, ranges in (("snr", self.snr), ("count", self.count)):
            if len(ranges) != len(CATEGORIES) or any(lo > hi for lo, hi in ranges):
                raise InputError(f"augment {name} needs one (low, high) per category {CATEGORIES}, got {ranges}")
        if not self.rir_seconds > 0:  # also NaN
            raise InputError(f"augment rir_seconds must be > 0, got {self.rir_seconds}")

    @property
    def adds_reverb(self) -> bool:
        return self.strategy != "noise"

    @property
    def adds_noise(self) -> bool:
        return self.strategy != "reverb"

    @property
    def noise_slots(self) -> int:
        """Noise excerpts per crop on the accelerator: the most files any category can draw."""
        return max(hi for _, hi in self.count) if self.adds_noise else 0

    @property
    def rir_samples(self) -> int:
        return round(self.rir_seconds * audio_io.SAMPLE_RATE) if self.adds_reverb else 0

    def packed(self, crops: int, length: int) -> dict[str, np.ndarray]:
        """Zeros in the layout `Augmenter.pack` fills for `crops` crops of `length` samples (zeros: nothing drawn)."""
        out = {}
        if self.adds_reverb:
            out["rir"] = np.zeros((crops, self.rir_samples), np.int16)
        if self.adds_noise:
            out["noise"] = np.zeros((crops, self.noise_slots, length), np.int16)
            out["snr"] = np.zeros((crops, self.noise_slots), np.float32)
        return out


@dataclasses.dataclass(frozen=True)
class Draw:
    """The random choices of augmenting one crop, with the audio they picked (int16)."""

    rir: np.ndarray | None = None  # the whole RIR; None: no reverberation
    noises: tuple[np.ndarray, ...] = ()  # excerpts of the crop's length
    snrs: tuple[float, ...] = ()  # their SNRs, dB
    rir_index: int = -1  # which file of the RIR bank (-1: none)
    category: int = -1  # index in CATEGORIES of the noise (-1: none)


def noise_gain(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> float:
    """The factor g with 10 log10(P_clean / P_{g noise}) = snr_db (powers in float64)."""
    p_clean = np.mean(np.square(clean, dtype=np.float64))
    p_noise = np.mean(np.square(noise, dtype=np.float64))
    return float(np.sqrt(p_clean / (max(p_noise, 1e-12) * 10 ** (snr_db / 10))))


def add_noise(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """clean + noise scaled so that 10 log10(P_clean / P_scaled_noise) = snr_db."""
    return (clean + noise_gain(clean, noise, snr_db) * noise).astype(clean.dtype)


def reverberate(x: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolution with the unit-energy RIR, truncated to the input length."""
    rir = rir / max(np.sqrt(np.sum(np.square(rir, dtype=np.float64))), 1e-12)
    return signal.fftconvolve(x, rir.astype(x.dtype))[: len(x)]


def _pcm16_layout(path: epath.Path) -> tuple[int, int] | None:
    """(byte offset of the samples, frames) of a local 16 kHz mono PCM-16 WAV file; None for any other file
    (and for a remote object, which is decoded whole through audio_io)."""
    if paths.is_remote(path):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", wavfile.WavFileWarning)  # chunks it skips (LIST, ...)
            rate, data = wavfile.read(path, mmap=True)
    except (ValueError, EOFError):  # not a WAV file scipy reads: decoded whole instead
        return None
    layout = (int(data.offset), len(data))
    ok = rate == audio_io.SAMPLE_RATE and data.dtype == np.dtype("<i2") and data.ndim == 1
    del data  # closes the mapping: one file descriptor per file would exhaust them on 60k RIRs
    return layout if ok else None


class AudioBank:
    """Augmentation files of one kind, read as 16 kHz mono int16 an excerpt at a time.

    Only the file list is built at construction (cheap to pickle into grain
    worker processes); each file's header is parsed on first use, once per process.
    """

    def __init__(self, files: list[epath.Path]):
        self.files = files
        self._layout: dict[int, tuple[int, int] | None] = {}

    def __len__(self) -> int:
        return len(self.files)

    def _where(self, i: int) -> tuple[int, int] | None:
        if i not in self._layout:
            self._layout[i] = _pcm16_layout(self.files[i])
        return self._layout[i]

    def read(self, i: int) -> np.ndarray:
        """The whole of file `i`."""
        where = self._where(i)
        if where is None:
            return audio_io.read_audio(self.files[i]).samples
        return np.fromfile(self.files[i], dtype="<i2", count=where[1], offset=where[0])

    def excerpt(self, i: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """A uniformly placed `length`-sample excerpt of file `i`, wrap-padded if it is shorter."""
        where = self._where(i)
        frames = len(audio := self.read(i)) if where is None else where[1]
        if frames > length:
            start = int(rng.integers(0, frames - length + 1))
            if where is None:
                return audio[start : start + length]
            return np.fromfile(self.files[i], dtype="<i2", count=length, offset=where[0] + 2 * start)
        return random_crop(audio if where is None else self.read(i), length, rng)


class Augmenter:
    """Draws and applies the configured strategy (module docstring)."""

    def __init__(self, config: AugmentConfig, noise_dir: epath.PathLike | None, rir_dir: epath.PathLike | None):
        self.config = config
        self.noise: dict[str, AudioBank] = {}
        if noise_dir and config.adds_noise:
            for category in CATEGORIES:
                files = sorted((epath.Path(noise_dir) / category).glob("*/*.wav"))
                if files:
                    self.noise[category] = AudioBank(files)
        self.rirs = AudioBank(sorted(epath.Path(rir_dir).glob("*/*/*.wav")) if rir_dir and config.adds_reverb else [])
        if config.adds_noise and not self.noise:
            raise InputError(
                f"augment strategy {config.strategy!r} adds noise, but noise_dir {noise_dir!r} has no "
                f"<category>/<source>/*.wav file for categories {CATEGORIES}"
            )
        if config.adds_reverb and not len(self.rirs):
            raise InputError(
                f"augment strategy {config.strategy!r} adds reverb, but rir_dir {rir_dir!r} has no "
                "<room type>/<room>/*.wav file"
            )
        self._cut_warned = False

    def draw(self, length: int, rng: np.random.Generator) -> Draw:
        """The random choices of augmenting one crop of `length` samples."""
        if rng.random() >= self.config.aug_prob:
            return Draw()
        strategy = self.config.strategy
        if strategy == "either":
            strategy = ("reverb", "noise")[rng.integers(2)]
        elif strategy == "all":
            strategy = ("none", "reverb", "noise", "both")[rng.integers(4)]
        rir, rir_index, noises, snrs, category = None, -1, [], [], -1
        if strategy in ("reverb", "both"):
            rir_index = int(rng.integers(len(self.rirs)))
            rir = self.rirs.read(rir_index)
        if strategy in ("noise", "both"):
            name = list(self.noise)[rng.integers(len(self.noise))]
            category = CATEGORIES.index(name)
            bank = self.noise[name]
            lo, hi = self.config.count[category]
            count = min(int(rng.integers(lo, hi + 1)), len(bank))
            for k in rng.choice(len(bank), size=count, replace=False):
                noises.append(bank.excerpt(int(k), length, rng))
                snrs.append(float(rng.uniform(*self.config.snr[category])))
        return Draw(rir, tuple(noises), tuple(snrs), rir_index, category)

    @staticmethod
    def apply(x: np.ndarray, draw: Draw) -> np.ndarray:
        """The drawn augmentation of the float32 crop `x` (host arithmetic)."""
        if draw.rir is not None:
            x = reverberate(x, draw.rir.astype(np.float32) / PCM_SCALE)
        clean = x  # every noise's SNR is against the (reverberated) crop, not against the other noises
        for noise, snr in zip(draw.noises, draw.snrs):
            noise = noise.astype(np.float32) / PCM_SCALE
            x = x + noise_gain(clean, noise, snr) * noise
        return x.astype(np.float32)

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(x, self.draw(len(x), rng))

    def pack(self, draws: list[Draw], length: int) -> dict[str, np.ndarray]:
        """The draws of a group of crops as the accelerator takes them (`AugmentConfig.packed`'s layout):
        the RIR's first rir_samples, the noise excerpts in the first slots, zeros where nothing was drawn."""
        out = self.config.packed(len(draws), length)
        for v, d in enumerate(draws):
            if d.rir is not None:
                n = min(len(d.rir), self.config.rir_samples)
                out["rir"][v, :n] = d.rir[:n]
                if n < len(d.rir) and not self._cut_warned:
                    self._cut_warned = True
                    logger.warning(
                        "RIR %s is %.2f s long: the accelerator convolves its first %.2f s "
                        "(data.augment.rir_seconds; warned once per process)",
                        self.rirs.files[d.rir_index],
                        len(d.rir) / audio_io.SAMPLE_RATE,
                        self.config.rir_seconds,
                    )
            for k, (noise, snr) in enumerate(zip(d.noises, d.snrs)):
                out["noise"][v, k] = noise
                out["snr"][v, k] = snr
        return out
