"""Log-mel features on the accelerator (docs/method.md §7), as sslsv computes them.

sslsv uses torchaudio's MelSpectrogram then `log(x + 1e-6)` and a non-affine
InstanceNorm1d. Spelled out:
  * periodic Hamming (or Hann) window of `win_length`, zero-padded on both
    sides to `n_fft` (torch.stft's convention);
  * centred frames: the waveform is reflect-padded by n_fft // 2 on both sides,
    frame t starts at t * hop, so there are 1 + n // hop frames;
  * power spectrum |rfft|^2, HTK mel filterbank from 0 Hz to Nyquist without
    filter normalisation, `log(x + 1e-6)`;
  * instance normalisation: every mel bin gets zero mean and unit (biased)
    variance over time, epsilon 1e-5.
With `lengths`, every sequence is framed, padded and normalised as if alone.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import librosa
import numpy as np
from scipy import signal

from ssps_jax import ops


@dataclasses.dataclass(frozen=True)
class LogMelConfig:
    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 40
    window: str = "hamming"  # or "hann" (sslsv's DINO configs)


def num_frames(num_samples, hop_length: int):
    """Frames of a centred STFT of `num_samples` samples (works on ints and arrays)."""
    return 1 + num_samples // hop_length


def window(config: LogMelConfig) -> np.ndarray:
    """The analysis window, periodic, zero-padded to n_fft like torch.stft does."""
    w = signal.get_window(config.window, config.win_length, fftbins=True)
    left = (config.n_fft - config.win_length) // 2
    return np.pad(w, (left, config.n_fft - config.win_length - left)).astype(np.float32)


def mel_filterbank(config: LogMelConfig) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) HTK-scale triangular filters, not area-normalised."""
    fb = librosa.filters.mel(
        sr=config.sample_rate,
        n_fft=config.n_fft,
        n_mels=config.n_mels,
        fmin=0.0,
        fmax=config.sample_rate / 2,
        htk=True,
        norm=None,
    )
    return fb.T.astype(np.float32)


def log_mel(
    wave: jnp.ndarray, config: LogMelConfig, lengths: jnp.ndarray | None = None
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """(B, n) waveforms -> (B, T, n_mels) normalised log-mel, and frame lengths.

    Always computed in float32, whatever the model's compute dtype.
    """
    wave = wave.astype(jnp.float32)
    n = wave.shape[1]
    frames = num_frames(n, config.hop_length)
    padded = ops.reflect_pad(wave, config.n_fft // 2, lengths)  # (B, n + n_fft)
    starts = jnp.arange(frames) * config.hop_length
    index = starts[:, None] + jnp.arange(config.n_fft)[None, :]  # (T, n_fft)
    spectrum = jnp.fft.rfft(padded[:, index] * window(config), axis=-1)
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
    mel = jnp.log(power @ mel_filterbank(config) + 1e-6)  # (B, T, n_mels)

    frame_lengths = None if lengths is None else num_frames(lengths, config.hop_length)
    mask = ops.sequence_mask(frame_lengths, frames)
    mean = ops.masked_mean(mel, mask, axis=1, keepdims=True)
    var = ops.masked_mean(jnp.square(mel - mean), mask, axis=1, keepdims=True)
    return (mel - mean) / jnp.sqrt(var + 1e-5), frame_lengths
