"""DINO (Caron et al., 2021) for speaker embeddings, as sslsv trains it (docs/method.md §6).

The student is encoder + `DINOHead`; the teacher has the same module tree
and its own variables (an EMA of the student's parameters; its BatchNorm
statistics are its own, updated by its forward passes in training mode, as
sslsv's momentum encoder does). Global views go through the networks in one
call and local views in another, so BatchNorm statistics are per group over
the global batch, as in sslsv.

The loss (`dino_loss`) is the cross-entropy between the centred, sharpened
teacher distribution of each global view and the student distribution of
every *other* view, averaged over the G x (G + L) - G pairs.

The step: the teacher (training-mode BatchNorm, as sslsv's momentum encoder)
embeds the global views; with SSPS, y^ comes from the teacher encoder in
inference mode, both teacher outputs are replaced before the loss and both
original ones are queued (the positive branch is the teacher's). The student
is updated by SGD (gradients clipped per tensor, last layer frozen in epoch
0: the optimizer), then the teacher by EMA with tau on a cosine from
start_tau to end_tau, and the centre from the teacher outputs the loss used.
Evaluation embeds with the teacher encoder.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from ssps_jax.methods.base import Fail, Method, Target, views_input
from ssps_jax.methods.common import ema, momentum_tau, validate_momentum
from ssps_jax.models import build_encoder
from ssps_jax.models.heads import WeightNormDense
from ssps_jax.models.layers import batch_norm
from ssps_jax.optim import make_optimizer
from ssps_jax.sharding import DATA


def _wide(x: jnp.ndarray) -> jnp.ndarray:
    """At least float32 (bf16 compute is widened for the softmaxes and the centre; float64 stays)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# sslsv's DINOHead initialises its MLP with trunc_normal(std=0.02), biases zero.
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


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


def teacher_temperature(epoch: jnp.ndarray, final: float, warmup: float, warmup_epochs: int) -> jnp.ndarray:
    """Linear warm-up from `warmup` to `final` over `warmup_epochs` epochs (linspace per epoch), then `final`."""
    if warmup_epochs <= 1:
        return jnp.where(epoch < warmup_epochs, warmup, final)
    ramp = warmup + (final - warmup) * epoch / (warmup_epochs - 1)
    return jnp.where(epoch < warmup_epochs, ramp, final)


@dataclasses.dataclass(frozen=True)
class DINOSettings:
    student_temperature: float
    teacher_temperature: float
    teacher_temperature_warmup: float
    teacher_temperature_warmup_epochs: int
    center_momentum: float
    start_tau: float
    end_tau: float
    steps_per_epoch: int
    total_steps: int


class DINOMethod(Method):
    name = "dino"
    title = "DINO"
    summary = "DINO: head sizes, student/teacher temperatures, teacher EMA, frozen last layer"
    demo_config = "demo_dino_ssps.py"
    sslsv_momentum = ("teacher", {"encoder": "encoder_momentum", "head": "head_momentum"})
    sslsv_buffers = {"center": "loss_fn.center"}
    sslsv_sizes = {
        "head": "dino.head_hidden_dim / head_bottleneck_dim / head_output_dim",
        "loss_fn": "dino.head_hidden_dim / head_bottleneck_dim / head_output_dim",
        "center": "dino.head_output_dim",  # the loss's centre, method state of its own
    }
    crop_mode = "dino"

    def default_config(self) -> dict:
        return {  # sslsv's DINO defaults
            "head_hidden_dim": 2048,
            "head_bottleneck_dim": 256,
            "head_output_dim": 65536,
            "student_temperature": 0.1,
            "teacher_temperature": 0.04,
            "teacher_temperature_warmup": 0.04,  # linear from this to teacher_temperature ...
            "teacher_temperature_warmup_epochs": 10,  # ... over these epochs (equal values: no warm-up)
            "center_momentum": 0.9,
            "start_tau": 0.996,  # teacher EMA momentum, by a half cosine to end_tau over training
            "end_tau": 1.0,
            "freeze_last_layer_epochs": 1,
        }

    def preset(self, config: ml_collections.ConfigDict) -> None:
        """Multi-crop views, augmentation 'all', SGD 0.2 with momentum 0.9, weight decay 5e-5 except on biases
        and norms, gradients clipped at 3.0 per tensor (sslsv's DINO)."""
        super().preset(config)
        config.data.augment.strategy = "all"
        config.optim.optimizer = "sgd"
        config.optim.learning_rate = 0.2
        config.optim.momentum = 0.9
        config.optim.weight_decay = 5e-5
        config.optim.decay_biases_and_norms = False
        config.optim.clip_grad_per_param = 3.0

    def validate(self, config: ml_collections.ConfigDict, fail: Fail) -> None:
        d = config.dino
        for key in ("head_hidden_dim", "head_bottleneck_dim", "head_output_dim"):
            if d[key] < 1:
                fail(f"dino.{key}", f"must be >= 1, got {d[key]}")
        for key in ("student_temperature", "teacher_temperature", "teacher_temperature_warmup"):
            if d[key] <= 0:
                fail(f"dino.{key}", f"must be > 0, got {d[key]}")
        validate_momentum("dino", d, fail)
        if not 0 <= d.center_momentum <= 1:
            fail("dino.center_momentum", f"must be in [0, 1], got {d.center_momentum}")
        if d.freeze_last_layer_epochs < 0 or d.teacher_temperature_warmup_epochs < 0:
            fail("dino", "freeze_last_layer_epochs and teacher_temperature_warmup_epochs must be >= 0")
        if config.data.crops.global_count < 1:
            fail("data.crops.global_count", f"DINO needs global views, got {config.data.crops.global_count}")

    def build_model(self, config: ml_collections.ConfigDict, bn_axis_name: str | None = None) -> DINO:
        d = config.dino
        dtype = jnp.dtype(config.model.dtype)
        head = DINOHead(d.head_hidden_dim, d.head_bottleneck_dim, d.head_output_dim, dtype, bn_axis_name)
        return DINO(encoder=build_encoder(config.model, bn_axis_name), head=head)

    def build_optimizer(self, config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
        """sslsv's optimizer with the head's last layer frozen for `dino.freeze_last_layer_epochs`."""
        return make_optimizer(
            config.optim, steps_per_epoch, total_steps, "last_layer", config.dino.freeze_last_layer_epochs
        )

    def example_input(self, config: ml_collections.ConfigDict) -> jax.ShapeDtypeStruct:
        return views_input(config.data.crops.global_seconds)

    def settings(self, config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> DINOSettings:
        d = config.dino
        return DINOSettings(
            student_temperature=d.student_temperature,
            teacher_temperature=d.teacher_temperature,
            teacher_temperature_warmup=d.teacher_temperature_warmup,
            teacher_temperature_warmup_epochs=d.teacher_temperature_warmup_epochs,
            center_momentum=d.center_momentum,
            start_tau=d.start_tau,
            end_tau=d.end_tau,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
        )

    def init_state(self, config: ml_collections.ConfigDict, variables: dict) -> dict:
        """The teacher starts as a copy of the student; the centre as zeros."""
        return {
            "teacher": variables,
            "center": jnp.zeros((config.dino.head_output_dim,), jnp.float32),
        }

    def positive_shape(self, config: ml_collections.ConfigDict) -> tuple[int, int]:
        """Both teacher outputs of the global views."""
        return config.data.crops.global_count, config.dino.head_output_dim

    def reference_misfit(self, config: ml_collections.ConfigDict) -> str | None:
        return "a DINO head output"  # logits over the head's K outputs, not an embedding

    def eval_variables(self, state) -> dict:
        return state.method_state["teacher"]

    def target(self, state, batch, *, model, settings: DINOSettings):
        """The teacher's (training-mode) head outputs of the global views (G, n, K), and this epoch's teacher
        temperature."""
        s = settings
        epoch = state.step // s.steps_per_epoch
        teacher = state.method_state["teacher"]
        teacher_out, updates = model.apply(teacher, batch["global_views"], train=True, mutable=["batch_stats"])
        temperature = teacher_temperature(
            epoch, s.teacher_temperature, s.teacher_temperature_warmup, s.teacher_temperature_warmup_epochs
        )
        return Target(lax.stop_gradient(teacher_out), updates, temperature)

    def forward(self, variables, batch, rng, *, model, settings):
        """The student's head outputs of every view (G + L, n, K)."""
        student_out, updates = model.apply(
            variables,
            batch["global_views"],
            batch["local_views"],
            method=type(model).student,
            mutable=["batch_stats"],
        )
        return student_out, updates["batch_stats"]

    def loss(self, outputs, positive, *, state, target, settings: DINOSettings, **_):
        center = state.method_state["center"]
        return dino_loss(outputs, positive, center, settings.student_temperature, target.extra), {}

    def update(self, state, params, outputs, positive, target, *, settings: DINOSettings):
        """The teacher's EMA step, and the centre from the teacher outputs the loss used."""
        s = settings
        teacher, center = state.method_state["teacher"], state.method_state["center"]
        tau = momentum_tau(state.step, s.total_steps, s.start_tau, s.end_tau)
        method_state = {
            "teacher": {"params": ema(teacher["params"], params, tau), **target.updates},
            "center": update_center(center, positive, s.center_momentum, DATA),
        }
        return method_state, {"tau": tau, "teacher_temperature": target.extra}


METHOD = DINOMethod()
