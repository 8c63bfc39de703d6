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
import functools

import jax
import jax.numpy as jnp
import librosa
import numpy as np
from jax import lax
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


def dft_filters(config: LogMelConfig) -> tuple[np.ndarray, np.ndarray]:
    """The windowed real DFT as convolution filters, and the mel filterbank that sums their squares.

    Filters (win_length, n_fft): the cosine of bins 0 .. n_fft / 2 (the real
    parts), then the sine of bins 1 .. n_fft / 2 - 1 (the imaginary parts; those
    of bin 0 and of the Nyquist bin are zero), each times the window's non-zero
    taps: n_fft output channels, a whole number of a TPU's 128-lane tiles.
    Bank (n_fft, n_mels): the mel filterbank's row of each filter's bin, so that
    squares @ bank = |rfft|^2 @ mel_filterbank.
    """
    left = (config.n_fft - config.win_length) // 2
    taps = np.arange(config.win_length)[:, None] + left  # the frame sample each tap sees
    bins = config.n_fft // 2
    cos_bins, sin_bins = np.arange(bins + 1)[None, :], np.arange(1, bins)[None, :]
    # Angles from the exact integer phase (k m mod n_fft): no float64 drift over long windows.
    cos = np.cos(2 * np.pi * (taps * cos_bins % config.n_fft) / config.n_fft)
    sin = np.sin(2 * np.pi * (taps * sin_bins % config.n_fft) / config.n_fft)
    w = window(config).astype(np.float64)[left : left + config.win_length, None]
    filters = np.concatenate([w * cos, w * sin], axis=1)
    fb = mel_filterbank(config)
    return filters.astype(np.float32), np.concatenate([fb, fb[1:bins]], axis=0)


def mel_energies_fft(padded: jnp.ndarray, config: LogMelConfig, frames: int) -> jnp.ndarray:
    """(B, T, n_mels) mel energies of the padded waveforms: frames gathered, windowed, FFT'd (the CPU's way)."""
    index = (jnp.arange(frames) * config.hop_length)[:, None] + jnp.arange(config.n_fft)[None, :]  # (T, n_fft)
    spectrum = jnp.fft.rfft(padded[:, index] * window(config), axis=-1)
    return (jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2) @ mel_filterbank(config)


def mel_energies_conv(padded: jnp.ndarray, config: LogMelConfig, frames: int) -> jnp.ndarray:
    """The same as `mel_energies_fft`, as one convolution with `dft_filters` (accelerators' way).

    No (B, T, n_fft) frame array is gathered, transposed or stored, which an
    FFT needs: on a TPU this moves a sixth of the bytes for as many FLOPs (XLA:TPU
    computes FFTs as matrix products), docs/performance.md. The waveform is cut
    into hops, (B, n / hop, hop), and the window spans `ceil(win_length / hop)`
    of them (the taps past the window are zero): a stride-1 convolution with
    `hop` input channels. (A strided convolution of the waveform as one channel
    is the same sum, but XLA:TPU copies a 1-wide channel axis into tiled
    layouts: 9x the waveform's bytes in the paper's SimCLR-SSPS step.) At
    full float32 precision on every backend (a TPU's default would round the
    frames to bfloat16).
    """
    hop = config.hop_length
    filters, bank = dft_filters(config)
    blocks = -(-config.win_length // hop)
    filters = np.pad(filters, ((0, blocks * hop - config.win_length), (0, 0)))
    left = (config.n_fft - config.win_length) // 2  # the window's zero taps are left out
    need = (frames - 1 + blocks) * hop
    padded = padded[:, left : left + need]
    padded = jnp.pad(padded, ((0, 0), (0, need - padded.shape[1])))  # zeros under the zero taps only
    spectrum = lax.conv_general_dilated(
        padded.reshape(padded.shape[0], -1, hop),
        filters.reshape(blocks, hop, -1),
        window_strides=(1,),
        padding="VALID",
        dimension_numbers=("NWC", "WIO", "NWC"),
        precision=lax.Precision.HIGHEST,
    )  # (B, T, n_fft): real parts of bins 0 .. n_fft / 2, imaginary parts of bins 1 .. n_fft / 2 - 1
    return jnp.square(spectrum) @ bank


def log_mel(
    wave: jnp.ndarray, config: LogMelConfig, lengths: jnp.ndarray | None = None
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """(B, n) waveforms -> (B, T, n_mels) normalised log-mel, and frame lengths.

    Always computed in float32, whatever the model's compute dtype. The power
    spectrum is an FFT of gathered frames on CPUs (where an FFT's n log n
    beats a DFT's n^2 FLOPs) and a DFT convolution over hops on accelerators
    (where bytes, not FLOPs, bound it): the choice is made when the program is
    lowered for its platform (`lax.platform_dependent`).
    """
    with jax.named_scope("log_mel"):
        wave = wave.astype(jnp.float32)
        frames = num_frames(wave.shape[1], config.hop_length)
        padded = ops.reflect_pad(wave, config.n_fft // 2, lengths)  # (B, n + n_fft)
        energies = lax.platform_dependent(
            padded,
            cpu=functools.partial(mel_energies_fft, config=config, frames=frames),
            default=functools.partial(mel_energies_conv, config=config, frames=frames),
        )
        mel = jnp.log(energies + 1e-6)  # (B, T, n_mels)

        frame_lengths = None if lengths is None else num_frames(lengths, config.hop_length)
        mask = ops.sequence_mask(frame_lengths, frames)
        mean = ops.masked_mean(mel, mask, axis=1, keepdims=True)
        var = ops.masked_mean(jnp.square(mel - mean), mask, axis=1, keepdims=True)
        return (mel - mean) / jnp.sqrt(var + 1e-5), frame_lengths
