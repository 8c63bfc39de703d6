"""Log-mel features against librosa / NumPy, and exactness of the padded path."""

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
from scipy import signal

from ssps_jax import features, ops
from ssps_jax.features import LogMelConfig, log_mel, num_frames


def _reference(wave, config):
    """The definition of docs/method.md §7 with librosa's STFT/mel and NumPy, independent of our code."""
    win = signal.get_window(config.window, config.win_length, fftbins=True)
    power = librosa.feature.melspectrogram(
        y=wave.astype(np.float64),
        sr=config.sample_rate,
        n_fft=config.n_fft,
        win_length=config.win_length,
        hop_length=config.hop_length,
        window=win,
        center=True,
        pad_mode="reflect",
        power=2.0,
        n_mels=config.n_mels,
        htk=True,
        norm=None,
        fmin=0.0,
        fmax=config.sample_rate / 2,
    )  # (n_mels, T)
    mel = np.log(power + 1e-6)
    mel = (mel - mel.mean(axis=1, keepdims=True)) / np.sqrt(mel.var(axis=1, keepdims=True) + 1e-5)
    return mel.T


@pytest.mark.parametrize(
    "config", [LogMelConfig(), LogMelConfig(n_mels=80, window="hann")], ids=["40-hamming", "80-hann"]
)
def test_log_mel_matches_librosa(config):
    rng = np.random.default_rng(0)
    t = np.arange(32000) / 16000
    waves = np.stack(
        [
            0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.normal(size=len(t)),
            0.1 * rng.normal(size=len(t)) * (1 + np.sin(2 * np.pi * 3 * t)),
        ]
    ).astype(np.float32)
    ours, lengths = jax.jit(lambda w: log_mel(w, config))(waves)
    assert lengths is None
    assert ours.shape == (2, num_frames(32000, 160), config.n_mels) == (2, 201, config.n_mels)
    for wave, got in zip(waves, np.asarray(ours)):
        np.testing.assert_array_less(np.abs(got - _reference(wave, config)), 1e-3)


def test_padded_batch_equals_each_sequence_alone():
    config = LogMelConfig()
    rng = np.random.default_rng(1)
    sizes = [16000, 23456, 8001, 32000]
    waves = [rng.normal(size=n).astype(np.float32) for n in sizes]
    batch = np.zeros((len(sizes), 32000), np.float32)
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    feats, frames = jax.jit(lambda w, n: log_mel(w, config, n))(batch, jnp.array(sizes))
    np.testing.assert_array_equal(frames, [num_frames(n, 160) for n in sizes])
    for i, w in enumerate(waves):
        alone, _ = log_mel(w[None], config)
        np.testing.assert_allclose(feats[i, : frames[i]], alone[0], atol=1e-4)


def test_reflect_pad_with_lengths_reflects_at_each_end():
    x = jnp.arange(1.0, 9.0)[None, :, None].repeat(2, axis=0)  # two copies of 1..8
    out = ops.reflect_pad(x, 2, jnp.array([8, 5]))[..., 0]
    np.testing.assert_array_equal(out[0], [3, 2, 1, 2, 3, 4, 5, 6, 7, 8, 7, 6])
    np.testing.assert_array_equal(out[1, :9], [3, 2, 1, 2, 3, 4, 5, 4, 3])  # sequence 1..5
    np.testing.assert_array_equal(ops.reflect_pad(x, 2, jnp.array([8, 8])), ops.reflect_pad(x, 2))


@pytest.mark.parametrize(
    "config",
    # 400 taps: 3 hops of 160, zeros past the waveform's padding; 401: a partial hop; 320: 2 whole hops.
    [LogMelConfig(), LogMelConfig(n_mels=80, window="hann", win_length=401), LogMelConfig(win_length=320)],
    ids=["40-hamming", "80-hann-401", "40-hamming-320"],
)
def test_dft_convolution_equals_the_fft_of_the_frames(config):
    """The accelerators' STFT (the windowed DFT as a convolution over hops) against the CPU's (FFT of frames)."""
    rng = np.random.default_rng(3)
    wave = (0.1 * rng.normal(size=(3, 8000)) * np.linspace(0, 2, 8000)).astype(np.float32)
    frames = num_frames(wave.shape[1], config.hop_length)
    padded = ops.reflect_pad(jnp.asarray(wave), config.n_fft // 2)
    fft = features.mel_energies_fft(padded, config, frames)
    conv = features.mel_energies_conv(padded, config, frames)
    assert conv.shape == fft.shape == (3, frames, config.n_mels)
    np.testing.assert_allclose(conv, fft, rtol=2e-5, atol=1e-6 * float(jnp.max(fft)))
    filters, bank = features.dft_filters(config)
    assert filters.shape == (config.win_length, config.n_fft) and bank.shape == (config.n_fft, config.n_mels)
