"""Array helpers for variable-length sequences: reflect padding and masked statistics.

Evaluation embeds utterances of many lengths, padded to a few bucket lengths
so that compilation stays bounded. For the padded result to *equal* the
unpadded one, every operation that looks along time must ignore the padding:
reflect padding must reflect at each sequence's own end, and means, variances
and softmaxes must skip padded frames. `lengths=None` means "no padding" and
takes the plain (faster) path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sequence_mask(lengths: jnp.ndarray | None, size: int) -> jnp.ndarray | None:
    """(B, size) boolean mask of the valid positions; None when lengths is None."""
    if lengths is None:
        return None
    return jnp.arange(size)[None, :] < lengths[:, None]


def reflect_pad(x: jnp.ndarray, pad: int, lengths: jnp.ndarray | None = None) -> jnp.ndarray:
    """Reflect-pads axis 1 of `x` (B, T, ...) by `pad` on both sides.

    With `lengths`, sequence b is reflected at its own last valid position
    lengths[b] - 1, as if it had been padded alone; positions past it are
    garbage that valid outputs never read. Like torch's reflect mode, needs
    length > pad.
    """
    if pad == 0:
        return x
    if lengths is None:
        widths = [(0, 0), (pad, pad)] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x, widths, mode="reflect")
    size = x.shape[1]
    source = jnp.arange(-pad, size + pad)[None, :]  # (1, T + 2 pad)
    last = (lengths - 1)[:, None]
    source = jnp.abs(source)  # left edge: -k -> k
    source = jnp.where(source > last, 2 * last - source, source)  # right edge of each sequence
    source = jnp.clip(source, 0, size - 1)
    index = source.reshape(source.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def masked_mean(x: jnp.ndarray, mask: jnp.ndarray | None, axis: int = 1, keepdims: bool = False) -> jnp.ndarray:
    """Mean over `axis` of the positions where `mask` (B, T) is true."""
    if mask is None:
        return jnp.mean(x, axis=axis, keepdims=keepdims)
    m = mask.reshape(mask.shape + (1,) * (x.ndim - 2)).astype(x.dtype)
    total = jnp.sum(x * m, axis=axis, keepdims=keepdims)
    return total / jnp.maximum(jnp.sum(m, axis=axis, keepdims=keepdims), 1)


def masked_softmax(logits: jnp.ndarray, mask: jnp.ndarray | None, axis: int = 1) -> jnp.ndarray:
    """Softmax over `axis`, giving zero weight to masked-out positions."""
    if mask is None:
        return jax.nn.softmax(logits, axis=axis)
    return jax.nn.softmax(logits, axis=axis, where=mask.reshape(mask.shape + (1,) * (logits.ndim - 2)))
