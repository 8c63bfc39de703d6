"""Augmentation on the accelerator (`data.augment.on = "device"`): the host's arithmetic, in the step.

The host (data_pipelines/input_pipeline.py) cuts the crops and draws the
augmentation, exactly as on the host path (data_pipelines/augment.py's
`Augmenter.draw`), and sends, per example, for each group G of augmented
views (`views`, or DINO's `global_views` and `local_views`):

  G          int16 (V, n)      the clean crops
  G_rir      int16 (V, R)      the drawn RIR, its first R samples; zeros: no reverberation
  G_noise    int16 (V, K, n)   the drawn noise excerpts; zeros: no noise in that slot
  G_snr      float32 (V, K)    their SNRs, dB
  reference  int16 (n_ref)     the clean reference crop

`model_batch` turns that into the batch the methods take (float32 views and
reference, the same keys as the host path), with the host path's arithmetic:
int16 / 32768; the RIR scaled to unit energy and convolved (FFT), the result
cut to the crop's length; each noise scaled to its SNR against the
reverberated crop and added. It runs inside the train step on each device's
slice of the batch (ssps_jax/train_step.py calls it once, before any method's
step), per example: no randomness and no communication, so any number of
devices computes the same views. A batch of float32 waveforms (the host path)
passes through unchanged.

Everything is float32, whatever the model's compute dtype, as the log-mel
features are (ssps_jax/features.py).
"""

from __future__ import annotations

import jax.numpy as jnp

from data_pipelines.augment import PACKED, PCM_SCALE


def waveform(x: jnp.ndarray) -> jnp.ndarray:
    """int16 PCM -> float32 in [-1, 1); float waveforms pass unchanged."""
    return x.astype(jnp.float32) / PCM_SCALE if x.dtype == jnp.int16 else x


def fft_size(length: int) -> int:
    """The smallest 2^a 3^b 5^c >= length: FFT sizes every backend's FFT is fast at (cuFFT, ducc, TPU).

    Not scipy.fft.next_fast_len: it also allows factors 7 and 11 (fast in pocketfft, not everywhere).
    For a 2 s crop and a 1 s RIR: 48 000, against 65 536 for the next power of two.
    """
    best, p2 = 1 << max(length - 1, 0).bit_length(), 1
    while p2 < best:
        p3 = p2
        while p3 < best:
            p5 = p3
            while p5 < length:
                p5 *= 5
            best = min(best, p5)
            p3 *= 3
        p2 *= 2
    return best


def fft_convolve(x: jnp.ndarray, h: jnp.ndarray) -> jnp.ndarray:
    """The linear convolution of x (..., n) with h (..., r), its first n samples (scipy's fftconvolve, cut).

    The FFT has at least n + r - 1 points, so nothing wraps around into the first n samples.
    """
    n, r = x.shape[-1], h.shape[-1]
    size = fft_size(n + r - 1)
    return jnp.fft.irfft(jnp.fft.rfft(x, size) * jnp.fft.rfft(h, size), size)[..., :n]


def reverberate(x: jnp.ndarray, rir: jnp.ndarray) -> jnp.ndarray:
    """x (..., n) convolved with the unit-energy `rir` (..., R); x itself where the RIR is all zeros."""
    energy = jnp.sum(jnp.square(rir), axis=-1, keepdims=True)
    reverbed = fft_convolve(x, rir / jnp.sqrt(jnp.maximum(energy, 1e-24)))
    return jnp.where(energy > 0, reverbed, x)


def add_noises(x: jnp.ndarray, noise: jnp.ndarray, snr_db: jnp.ndarray) -> jnp.ndarray:
    """x (..., n) plus each noise (..., K, n) scaled to its SNR (..., K) against x; all-zero noises add nothing."""
    p_clean = jnp.mean(jnp.square(x), axis=-1)[..., None]
    p_noise = jnp.mean(jnp.square(noise), axis=-1)
    gain = jnp.sqrt(p_clean / (jnp.maximum(p_noise, 1e-12) * 10 ** (snr_db / 10)))
    # A sum of products, not a contraction: on TPUs a float32 dot runs at bf16 precision by default.
    return x + jnp.sum(gain[..., None] * noise, axis=-2)


def augment(crops: jnp.ndarray, rir=None, noise=None, snr=None) -> jnp.ndarray:
    """The augmented float32 views of a group from what the host sent (module docstring)."""
    x = waveform(crops)
    if rir is not None:
        x = reverberate(x, rir.astype(jnp.float32))
    if noise is not None:
        x = add_noises(x, waveform(noise), snr)
    return x


def model_batch(batch: dict) -> dict:
    """The batch as the methods take it: float32 waveforms, without the augmentation arrays."""

    def aux_of(key: str) -> str | None:
        group, _, aux = key.rpartition("_")
        return aux if aux in PACKED and group in batch else None

    return {
        key: augment(x, **{aux: batch[f"{key}_{aux}"] for aux in PACKED if f"{key}_{aux}" in batch})
        for key, x in batch.items()
        if aux_of(key) is None
    }
