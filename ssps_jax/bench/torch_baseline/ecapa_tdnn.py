"""ECAPA-TDNN in PyTorch with sslsv's module tree (sslsv/encoders/ECAPATDNN.py), layout (B, C, T).

Attribute names are sslsv's, so `state_dict()` keys are the sslsv keys that
ssps_jax.models.sslsv_names derives from our Flax paths
(`blocks.1.res2net_block.blocks.6.norm.running_var`, `asp.tdnn.conv.conv.weight`,
`fc.conv.weight`, ...); the log-mel front end keeps its constants out of the
state_dict. The sslsv facts mirrored:
  * every convolution is Conv1dSamePaddingReflect: reflect padding of
    dilation * (kernel - 1) // 2 frames on each side, then nn.Conv1d;
  * TDNNBlock = conv -> ReLU -> BatchNorm1d (PyTorch defaults: momentum 0.1,
    eps 1e-5, running_var updated with the *unbiased* batch variance);
  * Res2Net: chunk 0 passes through, chunk 1 goes through block 0, chunk i
    through block i - 1 after adding the previous output;
  * SE: mean over time -> conv1 -> ReLU -> conv2 -> sigmoid gates;
  * MFA concatenates the outputs of the SE-Res2Net blocks; attentive
    statistics pooling with global context (mean and std with uniform
    weights appended to every frame), std = sqrt(clamp(var, 1e-12));
  * asp_bn on (B, 2C, 1), then fc as a kernel-1 convolution, squeezed.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import torch
import torch.nn.functional as F
from torch import nn

from ssps_jax.bench.torch_baseline.features import LogMel
from ssps_jax.features import LogMelConfig


class ReflectConv1d(nn.Module):
    """sslsv's Conv1dSamePaddingReflect at stride 1: output length = input length."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
        super().__init__()
        self.padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding:
            x = F.pad(x, (self.padding, self.padding), mode="reflect")
        return self.conv(x)


class TDNNBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
        super().__init__()
        self.conv = ReflectConv1d(in_channels, out_channels, kernel_size, dilation)
        self.norm = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.relu(self.conv(x)))


class Res2NetBlock(nn.Module):
    def __init__(self, channels: int, scale: int, kernel_size: int, dilation: int):
        super().__init__()
        width = channels // scale
        self.scale = scale
        self.blocks = nn.ModuleList(TDNNBlock(width, width, kernel_size, dilation) for _ in range(scale - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.chunk(x, self.scale, dim=1)
        out, y = [chunks[0]], None
        for block, chunk in zip(self.blocks, chunks[1:]):
            y = block(chunk if y is None else chunk + y)
            out.append(y)
        return torch.cat(out, dim=1)


class SEBlock(nn.Module):
    def __init__(self, channels: int, se_channels: int):
        super().__init__()
        self.conv1 = ReflectConv1d(channels, se_channels, 1)
        self.conv2 = ReflectConv1d(se_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=2, keepdim=True)
        return torch.sigmoid(self.conv2(F.relu(self.conv1(s)))) * x


class SERes2NetBlock(nn.Module):
    def __init__(
        self, in_channels: int, channels: int, res2net_scale: int, se_channels: int, kernel_size: int, dilation: int
    ):
        super().__init__()
        self.tdnn1 = TDNNBlock(in_channels, channels, 1)
        self.res2net_block = Res2NetBlock(channels, res2net_scale, kernel_size, dilation)
        self.tdnn2 = TDNNBlock(channels, channels, 1)
        self.se_block = SEBlock(channels, se_channels)
        # sslsv creates the shortcut only when the width changes (None otherwise: no state_dict entry).
        self.shortcut = ReflectConv1d(in_channels, channels, 1) if in_channels != channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        return self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x)))) + residual


def _weighted_statistics(x: torch.Tensor, weights: torch.Tensor, eps: float = 1e-12):
    """Mean and std over time (dim 2) with weights summing to 1 (sslsv's _compute_statistics)."""
    mean = (weights * x).sum(dim=2)
    std = torch.sqrt((weights * (x - mean.unsqueeze(2)).square()).sum(dim=2).clamp(min=eps))
    return mean, std


class AttentiveStatisticsPooling(nn.Module):
    def __init__(self, channels: int, attention_channels: int, global_context: bool):
        super().__init__()
        self.global_context = global_context
        self.tdnn = TDNNBlock(3 * channels if global_context else channels, attention_channels, 1)
        self.conv = ReflectConv1d(attention_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, 2C, 1)."""
        attn = x
        if self.global_context:
            mean, std = _weighted_statistics(x, 1.0 / x.shape[-1])
            context = torch.cat([mean, std], dim=1).unsqueeze(2).expand(-1, -1, x.shape[-1])
            attn = torch.cat([x, context], dim=1)
        weights = F.softmax(self.conv(torch.tanh(self.tdnn(attn))), dim=2)
        mean, std = _weighted_statistics(x, weights)
        return torch.cat([mean, std], dim=1).unsqueeze(2)


class ECAPATDNN(nn.Module):
    """Waveforms (B, n) -> speaker embeddings (B, encoder_dim)."""

    def __init__(
        self,
        mel: LogMelConfig,
        channels: Sequence[int],
        kernel_sizes: Sequence[int],
        dilations: Sequence[int],
        attention_channels: int,
        res2net_scale: int,
        se_channels: int,
        global_context: bool,
        encoder_dim: int,
    ):
        super().__init__()
        self.encoder_dim = encoder_dim
        self.features = LogMel(mel)
        self.blocks = nn.ModuleList([TDNNBlock(mel.n_mels, channels[0], kernel_sizes[0], dilations[0])])
        for i in range(1, len(channels) - 1):
            self.blocks.append(
                SERes2NetBlock(channels[i - 1], channels[i], res2net_scale, se_channels, kernel_sizes[i], dilations[i])
            )
        # sslsv sizes the MFA input as channels[-2] * blocks, i.e. the sum of the SE-Res2Net widths.
        self.mfa = TDNNBlock(sum(channels[1:-1]), channels[-1], kernel_sizes[-1], dilations[-1])
        self.asp = AttentiveStatisticsPooling(channels[-1], attention_channels, global_context)
        self.asp_bn = nn.BatchNorm1d(2 * channels[-1])
        self.fc = ReflectConv1d(2 * channels[-1], encoder_dim, 1)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.features(wave)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        x = self.mfa(torch.cat(outputs[1:], dim=1))
        x = self.asp_bn(self.asp(x))
        return self.fc(x).squeeze(2)


def build_encoder(model: ml_collections.ConfigDict) -> ECAPATDNN:
    """The encoder of `config.model`, as our ssps_jax.models.build_encoder builds it (ECAPA-TDNN only)."""
    if model.encoder != "ecapa_tdnn":
        raise ValueError(f"the PyTorch baseline implements ECAPA-TDNN only; config.model.encoder is {model.encoder!r}")
    e = model.ecapa_tdnn
    return ECAPATDNN(
        mel=LogMelConfig(**model.mel),
        channels=tuple(e.channels),
        kernel_sizes=tuple(e.kernel_sizes),
        dilations=tuple(e.dilations),
        attention_channels=e.attention_channels,
        res2net_scale=e.res2net_scale,
        se_channels=e.se_channels,
        global_context=e.global_context,
        encoder_dim=model.encoder_dim,
    )
