"""Recording conditions: what a session does to every utterance recorded in it.

In VoxCeleb a session is one YouTube video: one room, one microphone, one
codec, one background. Those shared conditions are what makes two crops of the
same utterance (or two utterances of the same video) look alike for reasons
that have nothing to do with the speaker. A `Channel` reproduces that chain:

  speech -> room (reverb) -> microphone/codec (band limits, EQ, saturation)
         -> + background noise at the session SNR (+ mains hum) -> gain
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.fft
from scipy import signal

from data_pipelines.demo_corpus.voice import SAMPLE_RATE


@dataclasses.dataclass(frozen=True)
class Channel:
    highpass_hz: float
    lowpass_hz: float
    eq: np.ndarray  # (n_bands, 3): centre Hz, gain dB, bandwidth in octaves
    rir: np.ndarray | None  # room impulse response, unit energy; None: dry
    drive: float  # tanh saturation drive; 0: linear
    noise_slope_db_oct: float  # spectral slope of the background noise
    noise_eq: np.ndarray  # (n_bands, 3) colouring of the background noise
    snr_db: float
    hum_hz: float  # mains hum fundamental; 0: none
    hum_db: float  # hum level relative to the noise
    level_dbfs: float  # RMS level of the recording


def synthetic_rir(rng: np.random.Generator, rt60: float, drr_db: float) -> np.ndarray:
    """Exponentially decaying noise tail plus a direct path, unit energy.

    High frequencies decay faster than low ones, as in real rooms: the tail is
    the sum of a low and a high band with different decay times.
    """
    n = int(min(1.2 * rt60, 1.0) * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    sos = signal.butter(2, 2000, btype="low", fs=SAMPLE_RATE, output="sos")
    white = rng.normal(0.0, 1.0, n)
    low = signal.sosfilt(sos, white)
    high = white - low
    tail = low * np.exp(-6.9 * t / rt60) + high * np.exp(-6.9 * t / (0.6 * rt60))
    onset = int(rng.uniform(0.002, 0.01) * SAMPLE_RATE)  # direct path to first reflections
    tail[:onset] = 0.0
    rir = tail
    rir[0] = np.sqrt(10 ** (drr_db / 10) * np.sum(tail**2))
    return rir / np.sqrt(np.sum(rir**2))


def sample_channel(rng: np.random.Generator) -> Channel:
    """Draws a random recording condition."""

    def bands(n, gain):
        return np.stack(
            [
                np.exp(rng.uniform(np.log(150), np.log(6000), n)),
                rng.uniform(-gain, gain, n),
                rng.uniform(0.5, 2.0, n),
            ],
            axis=1,
        )

    reverberant = rng.random() < 0.7
    return Channel(
        highpass_hz=float(np.exp(rng.uniform(np.log(60), np.log(400)))),
        lowpass_hz=rng.uniform(2800, 7800),
        eq=bands(3, 9.0),
        rir=synthetic_rir(rng, rng.uniform(0.15, 0.8), rng.uniform(-3, 10)) if reverberant else None,
        drive=rng.uniform(1.0, 4.0) if rng.random() < 0.25 else 0.0,
        noise_slope_db_oct=rng.uniform(-6.0, 1.0),
        noise_eq=bands(2, 12.0),
        snr_db=rng.uniform(5.0, 30.0),
        hum_hz=rng.choice([50.0, 60.0]) if rng.random() < 0.3 else 0.0,
        hum_db=rng.uniform(-10.0, 0.0),
        level_dbfs=rng.uniform(-32.0, -20.0),
    )


def milder(channel: Channel) -> Channel:
    """The same recording condition, gentler (the corpus's `channels = "mild"`, a regime probe).

    EQ and noise colouring at 40% of their dB gains, no saturation, SNR mapped
    from [5, 30] to [10, 30] dB, band limits opened to at least 200 Hz - 5 kHz.
    It transforms a drawn channel rather than drawing differently, so a mild
    corpus uses the same random draws as the default one with the same seed.
    """
    return dataclasses.replace(
        channel,
        eq=channel.eq * np.array([1.0, 0.4, 1.0]),
        noise_eq=channel.noise_eq * np.array([1.0, 0.4, 1.0]),
        drive=0.0,
        snr_db=10.0 + (channel.snr_db - 5.0) * 0.8,
        highpass_hz=min(channel.highpass_hz, 200.0),
        lowpass_hz=max(channel.lowpass_hz, 5000.0),
    )


def _bands_db(freqs: np.ndarray, bands: np.ndarray) -> np.ndarray:
    """Sum of Gaussian bumps on a log-frequency axis, in dB."""
    octaves = np.log2(np.maximum(freqs, 1.0)[:, None] / bands[None, :, 0])
    return np.sum(bands[:, 1] * np.exp(-0.5 * (octaves / (bands[:, 2] / 2)) ** 2), axis=1)


def _filter(x: np.ndarray, gain: np.ndarray, fft_size: int) -> np.ndarray:
    """Zero-phase filtering by a magnitude response sampled on rfft bins of `fft_size`."""
    return scipy.fft.irfft(scipy.fft.rfft(x, fft_size) * gain, fft_size)[: len(x)]


def apply_channel(speech: np.ndarray, channel: Channel, rng: np.random.Generator) -> np.ndarray:
    """Records `speech` (float, any level) in `channel`; fresh noise from `rng`."""
    n = len(speech)
    fft_size = scipy.fft.next_fast_len(n, real=True)
    freqs = np.fft.rfftfreq(fft_size, 1 / SAMPLE_RATE)
    x = speech
    if channel.rir is not None:
        x = signal.fftconvolve(x, channel.rir)[:n]

    # Microphone and codec: Butterworth-shaped band limits and a smooth EQ.
    with np.errstate(divide="ignore"):
        highpass = 1 / np.sqrt(1 + (channel.highpass_hz / np.maximum(freqs, 1e-3)) ** 8)
    lowpass = 1 / np.sqrt(1 + (freqs / channel.lowpass_hz) ** 12)
    x = _filter(x, highpass * lowpass * 10 ** (_bands_db(freqs, channel.eq) / 20), fft_size)
    x = x / np.sqrt(np.mean(x**2) + 1e-12)
    if channel.drive > 0:
        x = np.tanh(channel.drive * x / 3) * 3 / channel.drive

    slope = (np.maximum(freqs, 50.0) / 1000.0) ** (channel.noise_slope_db_oct / 6.02)
    noise = _filter(rng.normal(0.0, 1.0, n), slope * 10 ** (_bands_db(freqs, channel.noise_eq) / 20), fft_size)
    noise /= np.sqrt(np.mean(noise**2) + 1e-12)
    if channel.hum_hz > 0:
        t = np.arange(n) / SAMPLE_RATE
        phase = rng.uniform(0, 2 * np.pi)
        hum = sum(np.sin(2 * np.pi * k * channel.hum_hz * t + k * phase) / k for k in range(1, 6))
        noise += 10 ** (channel.hum_db / 20) * hum / np.sqrt(np.mean(hum**2))
        noise /= np.sqrt(np.mean(noise**2))
    signal_power = np.mean(x**2)
    x = x + noise * np.sqrt(signal_power / 10 ** (channel.snr_db / 10))

    x *= 10 ** (channel.level_dbfs / 20) / np.sqrt(np.mean(x**2) + 1e-12)
    return np.clip(x, -1.0, 32767 / 32768)
