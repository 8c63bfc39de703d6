"""Crops of an utterance: the views a self-supervised example is made of (docs/method.md §2).

Per utterance `i`:
  siamese (SimCLR, ...): 2 crops of `frame_seconds` (2 s), each augmented
                         independently;
  dino:                  `global_count` (2) crops of `global_seconds` (4 s) and
                         `local_count` (4) crops of `local_seconds` (2 s), all
                         augmented;
  both, for SSPS:        one crop of `reference_seconds` (4 s), never augmented
                         (0 disables it).
Every crop starts at an independent uniform position. Audio shorter than a
crop is wrap-padded (repeated from its start), as sslsv does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from data_pipelines.errors import InputError

SAMPLE_RATE = 16000
MODES = ("siamese", "dino")


def wrap_pad(x: np.ndarray, length: int) -> np.ndarray:
    """`x` repeated from its start until it is at least `length` long."""
    if len(x) == 0:
        raise ValueError("cannot wrap-pad empty audio")
    if len(x) >= length:
        return x
    return np.pad(x, (0, length - len(x)), mode="wrap")


def random_crop(x: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A `length`-sample crop at a uniform random position (wrap-padded first)."""
    x = wrap_pad(x, length)
    start = int(rng.integers(0, len(x) - length + 1))
    return x[start : start + length]


@dataclasses.dataclass(frozen=True)
class CropConfig:
    mode: str = "siamese"
    frame_seconds: float = 2.0
    global_count: int = 2
    global_seconds: float = 4.0
    local_count: int = 4
    local_seconds: float = 2.0
    reference_seconds: float = 4.0  # 0: no reference crop (no SSPS)

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError(f"crop mode must be one of {MODES}, got {self.mode!r}")
        for name in ("frame_seconds", "global_seconds", "local_seconds"):
            if getattr(self, name) <= 0:
                raise InputError(f"crop {name} must be > 0, got {getattr(self, name)}")
        if self.reference_seconds < 0:
            raise InputError(f"crop reference_seconds must be >= 0, got {self.reference_seconds}")


def _samples(seconds: float) -> int:
    return round(seconds * SAMPLE_RATE)


def view_groups(config: CropConfig) -> list[tuple[str, int, int]]:
    """(name, crops, samples) of each group of augmented views an example carries."""
    if config.mode == "siamese":
        return [("views", 2, _samples(config.frame_seconds))]
    return [
        ("global_views", config.global_count, _samples(config.global_seconds)),
        ("local_views", config.local_count, _samples(config.local_seconds)),
    ]


def reference_samples(config: CropConfig) -> int:
    """Samples of the clean reference crop; 0: none."""
    return _samples(config.reference_seconds) if config.reference_seconds > 0 else 0


def make_views(
    audio: np.ndarray,
    config: CropConfig,
    rng: np.random.Generator,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    pack: Callable[[str, np.ndarray, np.random.Generator], dict[str, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """The views of one utterance (a waveform, float32 or int16) as a dict of arrays.

    siamese: {"views": (2, frame)}; dino: {"global_views": (G, global),
    "local_views": (L, local)}; plus {"reference": (reference,)} when enabled.
    A group's crops are all cut first; then `augment(crop, rng)` makes each
    view from its crop (its own draw), or `pack(name, crops, rng)` gives the
    arrays the example carries for the group `name` from its stacked crops
    (augmentation on the accelerator: input_pipeline.TrainExamples). Views
    have the dtype `augment` returns, else the audio's; so has the reference,
    never augmented.
    """

    out = {}
    for name, count, samples in view_groups(config):
        crops = [random_crop(audio, samples, rng) for _ in range(count)]
        if pack is not None:
            out.update(pack(name, np.stack(crops), rng))
        else:
            out[name] = np.stack([augment(c, rng) for c in crops] if augment is not None else crops)
    if reference := reference_samples(config):
        out["reference"] = random_crop(audio, reference, rng)
    return out
