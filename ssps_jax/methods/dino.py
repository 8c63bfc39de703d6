"""DINO (Caron et al., 2021) for speaker embeddings, as sslsv trains it (SPEC section 6).

The student is encoder + `DINOHead`; the teacher has the same module tree
and its own variables (an EMA of the student's parameters; its BatchNorm
statistics are its own, updated by its forward passes in training mode, as
sslsv's momentum encoder does). Global views go through the networks in one
call and local views in another, so BatchNorm statistics are per group over
the global batch, as in sslsv.

The loss (`dino_loss`) is the cross-entropy between the centred, sharpened
teacher distribution of each global view and the student distribution of
every *other* view, averaged over the G x (G + L) - G pairs.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ssps_jax.models.layers import batch_norm, torch_default_init


def _wide(x: jnp.ndarray) -> jnp.ndarray:
    """At least float32 (bf16 compute is widened for the softmaxes and the centre; float64 stays)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# sslsv's DINOHead initialises its MLP with trunc_normal(std=0.02), biases zero.
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


class WeightNormDense(nn.Module):
    """Linear layer without bias whose weight rows have unit norm (weight_norm with g fixed at 1).

    sslsv: nn.utils.weight_norm(nn.Linear(..., bias=False)) with weight_g filled with 1
    and frozen, so the effective weight is v / ||v|| per output unit.
    """

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        v = self.param("weight_v", torch_default_init, (x.shape[-1], self.features))  # (in, out)
        w = v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-12)
        return jnp.dot(x.astype(self.dtype), w.astype(self.dtype))


class DINOProjector(nn.Module):
    """sslsv's DINOHead.mlp: (Linear-BN-GELU) x 2, then Linear to the bottleneck; names are its indices."""

    hidden_dim: int
    bottleneck_dim: int
    dtype: jnp.dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        for dense, bn in ((0, 1), (3, 4)):
            x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=_trunc_normal, name=f"layers_{dense}")(x)
            x = batch_norm(train, self.bn_axis_name, self.dtype, name=f"layers_{bn}")(x)
            x = nn.gelu(x, approximate=False)  # torch.nn.GELU: the exact erf form
        return nn.Dense(self.bottleneck_dim, dtype=self.dtype, kernel_init=_trunc_normal, name="layers_6")(x)


class DINOHead(nn.Module):
    """`mlp`, L2 normalisation, weight-normalised `last_layer` (sslsv's DINOHead, same names)."""

    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    output_dim: int = 65536
    dtype: jnp.dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = DINOProjector(self.hidden_dim, self.bottleneck_dim, self.dtype, self.bn_axis_name, name="mlp")(x, train)
        x = _wide(x)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return _wide(WeightNormDense(self.output_dim, dtype=self.dtype, name="last_layer")(x))


class DINO(nn.Module):
    """Encoder + DINO head; the same tree serves as student and (with other variables) as teacher."""

    encoder: nn.Module
    head: DINOHead

    def __call__(self, views: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """views (B, V, n) of one crop length -> head outputs (V, B, K), all V views in one call."""
        b, v, n = views.shape
        y = self.encoder(jnp.swapaxes(views, 0, 1).reshape(v * b, n), train=train)
        return self.head(y, train=train).reshape(v, b, -1)

    def student(self, global_views: jnp.ndarray, local_views: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        """(G + L, B, K): global views in one call, local views in another (sslsv's grouping)."""
        return jnp.concatenate([self(global_views, train), self(local_views, train)], axis=0)

    def embed(self, wave: jnp.ndarray, lengths: jnp.ndarray | None = None) -> jnp.ndarray:
        """Speaker embeddings: the encoder output in inference mode (evaluated with the teacher's variables)."""
        return self.encoder(wave, lengths, train=False)


def dino_loss(
    student: jnp.ndarray,
    teacher: jnp.ndarray,
    center: jnp.ndarray,
    student_temperature: float,
    teacher_temperature: jnp.ndarray,
) -> jnp.ndarray:
    """Mean over (teacher global view j, student view i != j) of the batch-mean cross-entropy.

    student (V, n, K) logits of all views; teacher (G, n, K) logits of the
    global views (constants); center (K,). The student's first G views are
    the same crops as the teacher's. Returns this device's mean (its pmean
    over devices is the loss of the global batch, as for nt_xent).
    """
    log_p = jax.nn.log_softmax(_wide(student) / student_temperature, axis=-1)
    q = jax.nn.softmax((_wide(teacher) - center) / teacher_temperature, axis=-1)
    q = lax.stop_gradient(q)
    cross = -jnp.einsum("jnk,ink->jin", q, log_p) / student.shape[1]  # (G, V, n) summed over n below
    cross = jnp.sum(cross, axis=-1)  # (G, V): batch means
    g, v = cross.shape
    off_diagonal = jnp.arange(g)[:, None] != jnp.arange(v)[None, :]
    return jnp.sum(jnp.where(off_diagonal, cross, 0.0)) / (g * v - g)


def update_center(center: jnp.ndarray, teacher: jnp.ndarray, momentum: float, axis_name: str | None) -> jnp.ndarray:
    """center <- m center + (1 - m) mean of the teacher logits over the global batch and its global views."""
    mean = jnp.mean(_wide(teacher), axis=(0, 1))
    if axis_name is not None:
        mean = lax.pmean(mean, axis_name)
    return momentum * center + (1 - momentum) * mean


def teacher_momentum(step: jnp.ndarray, total_steps: int, start: float = 0.996, end: float = 1.0) -> jnp.ndarray:
    """tau from `start` to `end` by a half cosine over training (sslsv's MomentumUpdater)."""
    return end - (end - start) * (jnp.cos(math.pi * step / total_steps) + 1) / 2


def teacher_temperature(epoch: jnp.ndarray, final: float, warmup: float, warmup_epochs: int) -> jnp.ndarray:
    """Linear warm-up from `warmup` to `final` over `warmup_epochs` epochs (linspace per epoch), then `final`."""
    if warmup_epochs <= 1:
        return jnp.where(epoch < warmup_epochs, warmup, final)
    ramp = warmup + (final - warmup) * epoch / (warmup_epochs - 1)
    return jnp.where(epoch < warmup_epochs, ramp, final)


def ema(teacher, student, tau: jnp.ndarray):
    """teacher <- tau teacher + (1 - tau) student, leaf by leaf."""
    return jax.tree.map(lambda t, s: tau * t + (1 - tau) * s, teacher, student)
