"""Log-mel features in PyTorch, with exactly our definition (docs/method.md §7, ssps_jax/features.py).

sslsv's BaseEncoder runs torchaudio's MelSpectrogram (centred reflect-padded
frames, periodic window zero-padded to n_fft, power 2, HTK mels without
filter normalisation), then `log(x + 1e-6)` and a non-affine InstanceNorm1d,
all under no_grad. There is no torchaudio here: torch.stft does the framing
and FFT, and the window and filterbank are our NumPy ones, so both
implementations multiply by the same matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssps_jax import features


class LogMel(nn.Module):
    """Waveforms (B, n) -> log-mel (B, n_mels, 1 + n // hop), each mel bin normalised over time."""

    def __init__(self, config: features.LogMelConfig):
        super().__init__()
        self.n_fft = config.n_fft
        self.hop_length = config.hop_length
        # Constants, not state: they stay out of the state_dict, whose keys are sslsv's parameter names.
        self.register_buffer("window", torch.from_numpy(features.window(config)), persistent=False)
        filterbank = features.mel_filterbank(config).T.copy()  # (n_mels, n_fft // 2 + 1)
        self.register_buffer("filterbank", torch.from_numpy(filterbank), persistent=False)

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spectrum = torch.stft(
            wave.float(),
            self.n_fft,
            self.hop_length,
            win_length=self.n_fft,  # the window is already zero-padded to n_fft, centred
            window=self.window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )  # (B, n_fft // 2 + 1, T)
        power = spectrum.real.square() + spectrum.imag.square()
        mel = torch.log(self.filterbank @ power + 1e-6)
        return F.instance_norm(mel, eps=1e-5)  # sslsv's InstanceNorm1d(n_mels): biased variance over time
