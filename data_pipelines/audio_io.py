"""Reading and writing audio files, with the checks corpus preparation needs.

Everything downstream works on 16 kHz mono. Files that are not get converted
here (and the caller is told, so it can report it); files that cannot be used
raise `AudioFileError` with the path and a one-line reason.

Two decoders, one conversion:

- libsndfile (soundfile) reads WAV, FLAC, OGG/Vorbis, Opus, MP3 and the other
  formats it knows; it is tried first for every file, because it is the
  fastest on PCM and its int16 round trip is exact.
- FFmpeg, through PyAV (`av`, whose wheels bundle FFmpeg: no system ffmpeg),
  decodes what libsndfile cannot open: AAC in .m4a/.mp4 (VoxCeleb2), and any
  other format FFmpeg reads. Its first audio stream is decoded as FFmpeg's
  demuxer delivers it (edit lists, i.e. encoder priming, applied as FFmpeg
  applies them), converted to planar float at the stream's own rate and
  channels.

Both give float samples at the file's rate; the same downmix (channel mean)
and the same soxr resampling then apply whatever the decoder, so a file
converted to WAV or left as m4a differs only by the codec. When both decoders
fail the reason is FFmpeg's (libsndfile's is often just "format not
recognised"), prefixed by "unreadable".

`is_silent` flags digitally silent audio (every sample zero after
conversion): it is valid audio, so preparation keeps it, but it is almost
always a broken file, so it is reported as a warning.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import soundfile as sf
from etils import epath

from data_pipelines import paths
from data_pipelines.errors import InputError

SAMPLE_RATE = 16000


class AudioFileError(InputError):
    """An audio file that cannot be used; `reason` is short and human-readable."""

    def __init__(self, path: epath.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # picklable with its two arguments: it crosses process boundaries
        return type(self), (self.path, self.reason)


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


def encode_flac(samples: np.ndarray) -> bytes:
    """16 kHz mono int16 -> the bytes of a FLAC file (lossless: `decode_flac` gives `samples` back)."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def decode_flac(data: bytes) -> np.ndarray:
    """The int16 samples of a FLAC file held in memory."""
    samples, _ = sf.read(io.BytesIO(data), dtype="int16")
    return samples


def is_silent(samples: np.ndarray) -> bool:
    """Digital silence: every sample is zero."""
    return not np.any(samples)


def _read_ffmpeg(path: epath.Path) -> tuple[np.ndarray, int]:
    """(frames x channels float32, rate) of the first audio stream, decoded by FFmpeg through PyAV."""
    import av  # deferred: only files libsndfile cannot read need it

    try:
        with paths.readable(path) as source, av.open(source) as container:
            if not container.streams.audio:
                raise AudioFileError(path, "unreadable (no audio stream)")
            stream = container.streams.audio[0]
            # Only the sample format changes: rate and channels stay the file's (converted below, as for soundfile).
            to_float = av.AudioResampler(format="fltp")
            planes = [
                frame.to_ndarray() for decoded in container.decode(stream) for frame in to_float.resample(decoded)
            ]
            planes += [frame.to_ndarray() for frame in to_float.resample(None)]
            rate = stream.codec_context.sample_rate
    except av.FFmpegError as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise AudioFileError(path, f"unreadable ({reason})") from None
    if not planes:
        return np.zeros((0, 1), np.float32), rate
    return np.concatenate(planes, axis=1).T, rate


def _read_any(path: epath.Path) -> tuple[np.ndarray, int]:
    """(frames x channels float32, rate): libsndfile if it can, else FFmpeg."""
    try:
        with paths.readable(path) as source:
            return sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError):
        return _read_ffmpeg(path)


def write_m4a(path: Path | str, x: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Writes mono float audio as AAC in an MP4 container (as VoxCeleb2 is distributed), creating parent folders."""
    import av  # deferred: only benchmarks and tests write m4a

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=sample_rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.asarray(x, np.float32)[None, :], format="flt", layout="mono")
        frame.sample_rate = sample_rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def read_audio(path: epath.PathLike, min_seconds: float = 0.0) -> Audio:
    """Reads `path` as 16 kHz mono int16 PCM.

    Multi-channel files are averaged to mono and other sample rates are
    resampled with soxr (through librosa); both are recorded in `notes`.
    Raises AudioFileError when the file is missing, unreadable by both
    decoders, empty, or shorter than `min_seconds` (after resampling).
    """
    path = epath.Path(path)
    if not path.is_file():
        raise AudioFileError(path, "missing")
    data, rate = _read_any(path)
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


def duration_seconds(path: epath.PathLike) -> float:
    """A file's duration from its header (no decoding); 0.0 when neither decoder can tell."""
    try:
        with paths.readable(path) as source:
            return sf.info(source).duration
    except (sf.LibsndfileError, RuntimeError, ValueError):
        pass
    import av

    try:
        with paths.readable(path) as source, av.open(source) as container:
            return (container.duration or 0) / av.time_base
    except av.FFmpegError:
        return 0.0
