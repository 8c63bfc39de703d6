"""Reading and writing audio files, with the checks corpus preparation needs.

Everything downstream works on 16 kHz mono. Files that are not get converted
here (and the caller is told, so it can report it); files that cannot be used
raise `AudioFileError` with the path and a one-line reason.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import soundfile as sf

from data_pipelines.errors import InputError

SAMPLE_RATE = 16000


class AudioFileError(InputError):
    """An audio file that cannot be used; `reason` is short and human-readable."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # int16, mono, SAMPLE_RATE
    notes: tuple[str, ...]  # conversions applied, e.g. "resampled from 44100 Hz"


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """Float in [-1, 1) to int16 with the same scale soundfile reads back (1/32768)."""
    return np.clip(np.round(np.asarray(x, np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def write_wav(path: Path | str, x: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Writes mono float audio as 16-bit PCM WAV, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, to_pcm16(x), sample_rate, subtype="PCM_16", format="WAV")


def read_audio(path: Path | str, min_seconds: float = 0.0) -> Audio:
    """Reads `path` as 16 kHz mono int16 PCM.

    Multi-channel files are averaged to mono and other sample rates are
    resampled with soxr (through librosa); both are recorded in `notes`.
    Raises AudioFileError when the file is missing, unreadable, empty, or
    shorter than `min_seconds` (after resampling).
    """
    path = Path(path)
    if not path.is_file():
        raise AudioFileError(path, "missing")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise AudioFileError(path, f"unreadable ({e})") from None
    if data.size == 0:
        raise AudioFileError(path, "empty (no samples)")
    notes = []
    if data.shape[1] > 1:
        notes.append(f"downmixed {data.shape[1]} channels")
    mono = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        import librosa  # deferred: importing librosa costs ~1 s

        mono = librosa.resample(mono, orig_sr=rate, target_sr=SAMPLE_RATE, res_type="soxr_hq")
        notes.append(f"resampled from {rate} Hz")
    if not np.all(np.isfinite(mono)):
        raise AudioFileError(path, "corrupt (non-finite samples)")
    if len(mono) < min_seconds * SAMPLE_RATE:
        raise AudioFileError(path, f"too short ({len(mono) / SAMPLE_RATE:.2f} s < {min_seconds:g} s)")
    return Audio(to_pcm16(mono), tuple(notes))
