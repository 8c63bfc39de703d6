"""Decoding: m4a/AAC through FFmpeg (PyAV), lossless FLAC bytes, and the reasons bad files are given."""

import av
import numpy as np
import pytest
import scipy.signal

from data_pipelines import audio_io

RATE = audio_io.SAMPLE_RATE


def _speechlike(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """Noise shaped by a slow envelope: aperiodic, so its alignment after the codec is unambiguous."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    noise = np.convolve(rng.standard_normal(n), np.hanning(9) / 4.5, mode="same")  # lowpassed, within AAC's band
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * np.arange(n) / rate)
    return (0.2 * noise * envelope).astype(np.float32)


def _aligned_snr_db(decoded: np.ndarray, source: np.ndarray) -> float:
    """SNR of `decoded` against `source`, after removing the codec's delay (found by cross-correlation)."""
    max_lag = 4096
    lags = scipy.signal.correlate(decoded[: len(source)], source[: len(source) - max_lag], mode="valid", method="fft")
    lag = int(np.argmax(lags))
    part = decoded[lag : lag + len(source)]
    ref = source[: len(part)]
    return 10 * np.log10(np.sum(ref**2) / np.sum((part - ref) ** 2))


def test_m4a_decodes_to_the_source_within_aac_tolerance(tmp_path):
    source = _speechlike(2.0, RATE)
    audio_io.write_m4a(tmp_path / "a.m4a", source)
    audio = audio_io.read_audio(tmp_path / "a.m4a")
    assert audio.notes == ()  # 16 kHz mono AAC: decoded, not converted
    assert audio.samples.dtype == np.int16
    decoded = audio.samples.astype(np.float64) / 32768
    # AAC adds up to a few frames of encoder delay and padding.
    assert len(source) <= len(decoded) <= len(source) + 3 * 1024
    assert _aligned_snr_db(decoded, source) > 15
    assert audio_io.duration_seconds(tmp_path / "a.m4a") == pytest.approx(2.0, abs=0.2)


def test_m4a_at_another_rate_is_resampled_to_16k(tmp_path):
    t = np.arange(48000) / 48000
    audio_io.write_m4a(tmp_path / "b.m4a", (0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), 48000)
    audio = audio_io.read_audio(tmp_path / "b.m4a")
    assert audio.notes == ("resampled from 48000 Hz",)
    decoded = audio.samples.astype(np.float64) / 32768
    assert RATE <= len(decoded) <= RATE + 3 * 1024 * RATE // 48000
    # The same tone, at the same level, at 16 kHz (the codec's delay shifts it by a fraction of a sample).
    middle = decoded[2000:14000]
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(len(middle))))
    assert abs(np.argmax(spectrum) * RATE / len(middle) - 1000) < 2
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.05)


def test_undecodable_files_are_named_with_the_decoders_reason(tmp_path):
    (tmp_path / "broken.m4a").write_bytes(b"\x00\x00\x00\x18ftypM4A " + bytes(range(256)) * 4)
    with pytest.raises(audio_io.AudioFileError) as e:
        audio_io.read_audio(tmp_path / "broken.m4a")
    assert e.value.path == str(tmp_path / "broken.m4a")
    assert e.value.reason.startswith("unreadable (") and len(e.value.reason) > len("unreadable ()")
    # A container FFmpeg opens that holds no audio at all.
    with av.open(str(tmp_path / "video.mp4"), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = 16
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    with pytest.raises(audio_io.AudioFileError, match="no audio stream"):
        audio_io.read_audio(tmp_path / "video.mp4")


def test_flac_bytes_round_trip_exactly():
    samples = audio_io.to_pcm16(_speechlike(0.7, RATE, seed=2))
    samples[:5] = [-32768, 32767, 0, -1, 1]  # the extremes survive too
    data = audio_io.encode_flac(samples)
    assert data[:4] == b"fLaC"
    np.testing.assert_array_equal(audio_io.decode_flac(data), samples)


def test_silence_is_all_zero_samples():
    assert audio_io.is_silent(np.zeros(100, np.int16))
    assert not audio_io.is_silent(np.array([0, 0, 1, 0], np.int16))
