"""Names of our variables in sslsv's PyTorch state_dict, for importing sslsv checkpoints.

The Flax module tree mirrors sslsv's nn.Module tree, so a variable's sslsv
name follows from its Flax path by four rules (docs/sslsv_parameter_mapping.md):
  1. path segments join with '.', and an indexed segment `name_<i>` is
     `name.<i>` (ModuleList / Sequential children), `layers_<i>` alone is `<i>`
     (an nn.Sequential that *is* the attribute, e.g. the projector);
  2. Conv/Dense `kernel` is `weight`, transposed to PyTorch's layout;
  3. BatchNorm `scale` is `weight`; its batch_stats `mean`/`var` are
     `running_mean`/`running_var` (PyTorch's `num_batches_tracked` has no
     counterpart);
  4. everything else keeps its name (`bias`, the SAP `attention`, DINO's
     weight-normalised `weight_v`, stored (in, out) like a Dense kernel;
     sslsv's `weight_g` is fixed at 1 and has no counterpart).
"""

from __future__ import annotations

import re

import numpy as np

_INDEXED = re.compile(r"^(.*)_(\d+)$")
_LEAVES = {
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def sslsv_name(path: tuple[str, ...], collection: str = "params") -> str:
    """Flax path within `collection` (e.g. ('encoder', 'blocks_0', 'conv', 'conv', 'kernel')) -> sslsv key."""
    parts = []
    for segment in path[:-1]:
        match = _INDEXED.match(segment)
        if match and match.group(1) == "layers":
            parts.append(match.group(2))
        elif match:
            parts.extend(match.groups())
        else:
            parts.append(segment)
    leaf = path[-1]
    parts.append("weight" if leaf == "kernel" else _LEAVES.get((collection, leaf), leaf))
    return ".".join(parts)


def to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """Our array -> the layout of sslsv's tensor of the same name."""
    if path[-1] not in ("kernel", "weight_v"):
        return value
    if value.ndim == 2:  # Dense (in, out) -> Linear (out, in)
        return value.T
    # Conv (*spatial, in, out) -> (out, in, *spatial)
    return np.transpose(value, (value.ndim - 1, value.ndim - 2, *range(value.ndim - 2)))
