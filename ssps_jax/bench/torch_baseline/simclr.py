"""SimCLR in PyTorch as sslsv trains it (sslsv/methods/SimCLR, _BaseSiameseMethod), and Flax -> torch weights.

sslsv facts mirrored:
  * each view goes through the encoder in its own call (BatchNorm
    statistics per view), then the optional projector
    (Linear-BN-ReLU x 2, Linear: sslsv's nn.Sequential, keys `projector.<i>`);
  * SimCLRLoss: Z = L2-normalised [Z_1; Z_2], sim = Z Z^T / temperature;
    for every row the positive is the other view of the same example and
    the negatives are the 2N - 2 other columns; logits = [positive |
    negatives], cross-entropy against class 0. One process: the whole global
    batch is on this device, so there is nothing to gather.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from flax import traverse_util
from torch import nn

from ssps_jax.bench.torch_baseline.ecapa_tdnn import ECAPATDNN, build_encoder
from ssps_jax.methods import simclr
from ssps_jax.models.sslsv_names import sslsv_name, to_torch_layout


class SimCLR(nn.Module):
    """Encoder (+ optional projector) applied to each of two views; attribute names are sslsv's."""

    def __init__(self, encoder: ECAPATDNN, projector_dims: tuple[int, int] | None = None):
        super().__init__()
        self.encoder = encoder
        self.projector = None
        if projector_dims is not None:
            hidden, output = projector_dims
            self.projector = nn.Sequential(
                nn.Linear(encoder.encoder_dim, hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Linear(hidden, output),
            )

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """views (B, 2, n) -> embeddings of view 1 and view 2, each (B, D)."""
        out = []
        for v in range(2):
            y = self.encoder(views[:, v])
            out.append(y if self.projector is None else self.projector(y))
        return out[0], out[1]


def build_simclr(config: ml_collections.ConfigDict) -> SimCLR:
    """Our SimCLR method's build_model (ssps_jax.methods.simclr), in PyTorch."""
    if config.method != simclr.METHOD.name:  # the one method written here
        raise ValueError(f"the PyTorch baseline implements SimCLR only; config.method is {config.method!r}")
    s = config.simclr
    projector = (s.projector_hidden_dim, s.projector_output_dim) if s.projector else None
    return SimCLR(build_encoder(config.model), projector)


def _contrastive_masks(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) masks over the 2n x 2n similarities, as sslsv's create_contrastive_masks."""
    rows = torch.arange(2 * n, device=device)
    same_example = (rows[:, None] % n) == (rows[None, :] % n)
    identity = rows[:, None] == rows[None, :]
    return same_example & ~identity, ~same_example


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over both views of the batch: mean over the 2N anchors."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), p=2, dim=1)
    sim = z @ z.T / temperature
    positive_mask, negative_mask = _contrastive_masks(n, z.device)
    positives = sim[positive_mask].view(2 * n, 1)
    negatives = sim[negative_mask].view(2 * n, 2 * n - 2)
    logits = torch.cat([positives, negatives], dim=1)
    return F.cross_entropy(logits, torch.zeros(2 * n, dtype=torch.long, device=z.device))


def flax_state_dict(variables: Mapping) -> dict[str, np.ndarray]:
    """Our {"params", "batch_stats"} -> {sslsv key: array in PyTorch layout} (ssps_jax.models.sslsv_names)."""
    state = {}
    for collection in ("params", "batch_stats"):
        for path, value in traverse_util.flatten_dict(dict(variables.get(collection, {}))).items():
            state[sslsv_name(path, collection)] = np.array(to_torch_layout(path, np.asarray(value)), order="C")
    return state


def load_flax_variables(torch_model: nn.Module, variables: Mapping) -> None:
    """Copies our Flax variables into `torch_model`, whose state_dict keys are the sslsv names of their paths.

    Pass the variables of the same module: those of our SimCLR model (paths
    `encoder/...`, `projector/...`) for a torch SimCLR, or the encoder's own
    for a torch ECAPATDNN. Every key must match in name and shape; only
    PyTorch's BatchNorm counters (`num_batches_tracked`) have no counterpart
    and are left as they are.
    """
    target = torch_model.state_dict()
    source = flax_state_dict(variables)
    unknown = sorted(set(source) - set(target))
    missing = sorted(k for k in set(target) - set(source) if not k.endswith("num_batches_tracked"))
    if unknown or missing:
        raise KeyError(f"Flax variables and torch state_dict differ: unknown {unknown[:5]}, missing {missing[:5]}")
    for key, array in source.items():
        if tuple(target[key].shape) != array.shape:
            raise ValueError(f"{key}: torch shape {tuple(target[key].shape)}, Flax (transposed) {array.shape}")
    loaded = {key: torch.from_numpy(array).to(target[key].dtype) for key, array in source.items()}
    torch_model.load_state_dict(loaded, strict=False)
