"""Supervised speaker classification with AAM-softmax, as sslsv trains it: the upper bound of the SSL tables.

The encoder's embedding of one crop per utterance (the first view of the
siamese crops; the second is not used) goes through sslsv's speaker
classifier, the cosines between the embedding and one learnt weight row
per training speaker, and the loss is the additive angular margin softmax
(ArcFace, Deng et al., 2019) on those cosines (docs/method.md §6.4).

The labels come from the train split's index file: `build` puts the speaker
id of every dataset index in the method state (`speaker_labels`, replicated),
and the step looks the batch's up by its dataset indices on the device. A
train split without labels is refused when the run is built. Evaluation is
unchanged: the encoder output, scored by cosine. SSPS does not apply (there
is no positive view to replace).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines.errors import ConfigError
from ssps_jax.methods.base import Fail
from ssps_jax.methods.common import SiameseMethod, aam, normalise
from ssps_jax.models import build_encoder


class SpeakerClassifier(nn.Module):
    """Cosines between the embeddings and one weight row per speaker (sslsv's SpeakerClassifier)."""

    classes: int

    @nn.compact
    def __call__(self, y: jnp.ndarray) -> jnp.ndarray:
        # (classes, D) as in torch, Xavier-uniform (torch's fan_in / fan_out of a (classes, D) matrix).
        weight = self.param(
            "weight", nn.initializers.xavier_uniform(in_axis=1, out_axis=0), (self.classes, y.shape[-1])
        )
        y = y.astype(jnp.promote_types(y.dtype, jnp.float32))
        return normalise(y) @ normalise(weight.astype(y.dtype)).T


class Supervised(nn.Module):
    """Encoder + speaker classifier; trained on the first view of the siamese crops."""

    encoder: nn.Module
    classes: int

    def setup(self):
        self.classifier = SpeakerClassifier(self.classes)

    def __call__(self, views: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """views (B, V, n) -> cosines (B, classes) of the first view's embedding."""
        return self.classifier(self.encoder(views[:, 0], train=train))

    def embed(self, wave: jnp.ndarray, lengths: jnp.ndarray | None = None) -> jnp.ndarray:
        return self.encoder(wave, lengths, train=False)


def aam_softmax(cosines: jnp.ndarray, labels: jnp.ndarray, margin: float, scale: float):
    """(mean cross-entropy, accuracy) of AAM-softmax over this device's rows, as sslsv computes it.

    The target class's cosine gets ArcFace's additive angular margin
    (`common.aam`); all logits are multiplied by `scale`. The accuracy is that
    of the logits with the margin, as sslsv reports it.
    """
    cosines = cosines.astype(jnp.promote_types(cosines.dtype, jnp.float32))
    with_margin = aam(cosines, margin)
    target = jax.nn.one_hot(labels, cosines.shape[-1], dtype=bool)
    logits = scale * jnp.where(target, with_margin, cosines)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=-1))
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    return loss, accuracy


@dataclasses.dataclass(frozen=True)
class SupervisedSettings:
    margin: float
    scale: float


class SupervisedMethod(SiameseMethod):
    name = "supervised"
    title = "Supervised"
    summary = "supervised AAM-softmax on the train split's speaker labels: classes, margin, scale"
    needs_labels = True
    demo_config = "demo_supervised.py"
    sslsv_sizes = {"classifier": "supervised.classes"}  # no projector

    def default_config(self) -> dict:
        return {  # sslsv's Supervised defaults (classifier 'speaker': AAM-softmax)
            "classes": 5994,  # speakers of VoxCeleb2 dev
            "aam_margin": 0.2,
            "aam_scale": 30.0,
        }

    def validate(self, config: ml_collections.ConfigDict, fail: Fail) -> None:
        s = config.supervised
        if s.classes < 2:
            fail("supervised.classes", f"must be >= 2, got {s.classes}")
        if not 0 <= s.aam_margin < math.pi / 2:
            fail("supervised.aam_margin", f"must be in [0, pi/2) radians, got {s.aam_margin}")
        if s.aam_scale <= 0:
            fail("supervised.aam_scale", f"must be > 0, got {s.aam_scale}")
        if config.ssps.enabled:
            fail("ssps.enabled", "the supervised baseline has no positive view for SSPS to replace")

    def build_model(self, config: ml_collections.ConfigDict, bn_axis_name: str | None = None) -> Supervised:
        return Supervised(encoder=build_encoder(config.model, bn_axis_name), classes=config.supervised.classes)

    def settings(self, config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
        s = config.supervised
        return SupervisedSettings(margin=s.aam_margin, scale=s.aam_scale)

    def label_state(self, config: ml_collections.ConfigDict, speaker: np.ndarray) -> dict:
        speakers = int(speaker.max()) + 1
        if speakers > config.supervised.classes:
            raise ConfigError(
                f"config.supervised.classes: {config.supervised.classes}, but {config.data.train_csv} "
                f"has {speakers} speakers"
            )
        return {"speaker_labels": np.asarray(speaker, np.int32)}

    def positive_shape(self, config: ml_collections.ConfigDict) -> tuple[int, int]:
        return 1, config.model.encoder_dim  # never queued: validate refuses SSPS

    def online_positive(self, outputs):
        return None  # no positive view: the classifier's cosines

    def loss(self, outputs, positive, *, state, batch, settings: SupervisedSettings, **_):
        """AAM-softmax of the cosines against the batch's speakers (looked up on the device: the table is
        replicated and the batch carries its dataset indices)."""
        labels = state.method_state["speaker_labels"][batch["index"]]
        loss, accuracy = aam_softmax(outputs, labels, settings.margin, settings.scale)
        return loss, {"accuracy": accuracy}


METHOD = SupervisedMethod()
