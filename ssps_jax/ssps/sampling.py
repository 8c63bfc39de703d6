"""Pseudo-positive sampling on device (docs/method.md §5): the samplers, by name.

Each sampler is one module of ssps/samplers/ exposing one `Sampler` object
(ssps/samplers/base.py): its config keys and defaults, their checks, whether
it needs the epoch-start clustering or the index file's labels, and its
`sample`, vectorised over the batch and run per device inside the train
step's shard_map. `config.ssps.sampling` picks one; `sample` dispatches to it.

  kmeans-repr  SSPS-Clustering: a positive-queue row of one of the M clusters nearest the anchor's
  kmeans       the centroid of such a cluster
  knn          SSPS-NN: the positive-queue row beside one of the M reference rows nearest y^
  oracle       a diagnostic: the anchor's speaker from another session, by labels

Adding a sampler: write ssps/samplers/<name>.py with a `Sampler` subclass and
its `SAMPLER` object, and add one line to REGISTRY.
"""

from __future__ import annotations

from ssps_jax.ssps.samplers import kmeans, kmeans_repr, knn, oracle
from ssps_jax.ssps.samplers.base import Sample, Sampler, SamplingConfig
from ssps_jax.ssps.state import SSPSState

__all__ = ["REGISTRY", "Sample", "Sampler", "SamplingConfig", "default_config", "get", "sample"]

REGISTRY: dict[str, Sampler] = {
    s.name: s
    for s in (
        kmeans_repr.SAMPLER,
        kmeans.SAMPLER,
        knn.SAMPLER,
        oracle.SAMPLER,
    )
}


def get(name: str) -> Sampler:
    """The sampler registered as `name` (config.ssps.sampling)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown SSPS sampling {name!r}: one of {tuple(REGISTRY)}") from None


def default_config() -> dict:
    """Every sampler's `config.ssps` keys with their defaults (keys shared by samplers: the first one's)."""
    keys = {}
    for s in REGISTRY.values():
        keys.update({k: v for k, v in s.default_config().items() if k not in keys})
    return keys


def sample(state: SSPSState, anchors_local, y_ref_local, key, cfg: SamplingConfig, axis: str) -> Sample:
    """This device's pseudo-positives, drawn by the sampler `cfg.method` names."""
    return get(cfg.method).sample(state, anchors_local, y_ref_local, key, cfg, axis)


def label_free() -> tuple[str, ...]:
    """The samplers that need no labels (what a benchmark on random queues can run)."""
    return tuple(name for name, s in REGISTRY.items() if not s.needs_labels)
