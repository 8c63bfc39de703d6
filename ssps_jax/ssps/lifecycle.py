"""SSPS over a run: one object for its state, its schedule, the epoch-start clustering and its part of a step.

The schedule (docs/method.md §3-§5), in epochs counted from 0:
  before start_epoch - 1  SSPS is idle: the run compiles and runs the plain step;
  start_epoch - 1         the queues fill (the SSPS step program, nothing replaced);
  start_epoch on          every epoch starts with k-means of the reference queue
                          (clustering variants), and every step replaces the
                          positives of the anchors that got a pseudo-positive.
`fills_queues`, `samples` and `sampling_on` state that rule once, for the
training loop (Python integers) and inside the step (traced arrays) alike.

A disabled `SSPS` (config.ssps.enabled False) is a valid object that never
fills, samples or clusters, so the loop calls it the same way either way.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from data_pipelines.errors import ConfigError
from ssps_jax.observe import say
from ssps_jax.ssps import sampling
from ssps_jax.ssps.clustering import make_cluster_fn, nmi
from ssps_jax.ssps.state import SSPSState, init_ssps_state

QUEUE_DTYPES = ("float32", "bfloat16")


def default_config() -> dict:
    """`config.ssps`: off; on, the papers' main setting (docs/method.md §5), then each sampler's keys."""
    return {
        "enabled": False,
        "start_epoch": 100,  # queues fill from start_epoch - 1, clustering and sampling from start_epoch
        # A sampler of ssps/sampling.py: kmeans-repr (SSPS-Clustering) | kmeans (centroid) | knn (SSPS-NN) |
        # oracle: a diagnostic, not a method -- the anchor's own speaker from another session, by the index
        # file's labels (the headroom)
        "sampling": "kmeans-repr",
        "pos_queue_size": 25000,  # Q' capacity, rounded down to a multiple of the global batch
        "queue_dtype": "float32",  # or "bfloat16": half the queue memory
        **sampling.default_config(),
    }


def validate(config: ml_collections.ConfigDict, method, fail) -> None:
    """Checks `config.ssps` (when enabled) and what `method` (a methods.base.Method) cannot do with it."""
    s = config.ssps
    if not s.enabled:
        return
    if s.sampling not in sampling.REGISTRY:
        fail("ssps.sampling", f"must be one of {tuple(sampling.REGISTRY)}, got {s.sampling!r}")
    if s.queue_dtype not in QUEUE_DTYPES:
        fail("ssps.queue_dtype", f"must be one of {QUEUE_DTYPES}, got {s.queue_dtype!r}")
    if s.start_epoch < 1:
        fail("ssps.start_epoch", f"must be >= 1 (queues fill during epoch start_epoch - 1), got {s.start_epoch}")
    if s.pos_queue_size < config.train.global_batch_size:
        fail("ssps.pos_queue_size", f"{s.pos_queue_size} is smaller than one global batch")
    if config.data.crops.reference_seconds <= 0:
        fail("data.crops.reference_seconds", "SSPS needs the clean reference crop (> 0 s)")
    selected = sampling.get(s.sampling)
    selected.validate(config, method, fail)
    for sampler in sampling.REGISTRY.values():
        if sampler is not selected:
            sampler.validate_unselected(config, fail)


def sampling_config(s: ml_collections.ConfigDict) -> sampling.SamplingConfig:
    """The pseudo-positive sampling of `config.ssps`."""
    return sampling.SamplingConfig(
        method=s.sampling,
        inter_size=s.inter_sampling_size,
        inter_exp=s.inter_sampling_prob == "exp",
        inter_lambda=s.inter_sampling_lambda,
        intra_size=s.intra_sampling_size,
        intra_exp=s.intra_sampling_prob == "exp",
        intra_lambda=s.intra_sampling_lambda,
        oracle_purity=s.oracle_purity,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class SSPS:
    """Self-Supervised Positive Sampling in a run of `steps_per_epoch` steps an epoch."""

    sampling: sampling.SamplingConfig
    start_epoch: int
    steps_per_epoch: int
    enabled: bool = True
    pos_queue_size: int = 25000  # Q', rounded down to a multiple of the global batch
    kmeans_clusters: int = 25000
    kmeans_iterations: int = 10
    kmeans_chunk_elements: int = 1 << 26
    queue_dtype: str = "float32"
    mesh: Mesh | None = None  # where the epoch-start clustering runs (the loop's calls only)

    @classmethod
    def from_config(cls, s: ml_collections.ConfigDict, steps_per_epoch: int, mesh: Mesh | None = None) -> SSPS:
        return cls(
            sampling=sampling_config(s),
            start_epoch=s.start_epoch,
            steps_per_epoch=steps_per_epoch,
            enabled=s.enabled,
            pos_queue_size=s.pos_queue_size,
            kmeans_clusters=s.kmeans_clusters,
            kmeans_iterations=s.kmeans_iterations,
            kmeans_chunk_elements=s.kmeans_chunk_elements,
            queue_dtype=s.queue_dtype,
            mesh=mesh,
        )

    @property
    def clustered(self) -> bool:
        """Whether pseudo-positives come from a clustering (kmeans-repr, kmeans), not nearest rows or labels."""
        return sampling.get(self.sampling.method).clustered

    # -- the schedule --------------------------------------------------------------------------------------

    def fills_queues(self, epoch: int) -> bool:
        """Whether the steps of `epoch` run the SSPS step program (queues live)."""
        return self.enabled and epoch >= self.start_epoch - 1

    def samples(self, epoch):
        """Whether `epoch` replaces positives (int or traced)."""
        return epoch >= self.start_epoch

    def sampling_on(self, epoch: jax.Array, clustered_epoch: jax.Array) -> jax.Array:
        """Inside the step: sampling is on, and for the clustering variants the state holds this epoch's clustering."""
        on = self.samples(epoch)
        return on & (clustered_epoch == epoch) if self.clustered else on

    # -- the state -----------------------------------------------------------------------------------------

    def init_state(
        self,
        mesh: Mesh,
        *,
        dataset_size: int,
        global_batch: int,
        ref_dim: int,
        positive_shape: tuple[int, int],
        labels: tuple[np.ndarray, np.ndarray] | None = None,
        abstract: bool = False,
    ) -> SSPSState | None:
        """Empty queues sized for this dataset and batch (None when disabled); `labels` (speaker, session) are
        for the diagnostics only (-1: unknown). `abstract`: shapes and shardings, no device memory."""
        if not self.enabled:
            return None
        pos_capacity = self.pos_queue_size - self.pos_queue_size % global_batch
        # The reference queue holds one epoch; for knn it is aligned with Q' instead (docs/method.md §3, §5).
        ref_capacity = self.steps_per_epoch * global_batch if self.clustered else pos_capacity
        if self.clustered and self.kmeans_clusters > ref_capacity:
            raise ConfigError(
                f"config.ssps.kmeans_clusters: {self.kmeans_clusters} clusters for a reference queue of "
                f"{ref_capacity} rows"
            )
        if labels is None:
            labels = (np.full(dataset_size, -1, np.int32),) * 2
        views, pos_dim = positive_shape
        return init_ssps_state(
            mesh,
            dataset_size=dataset_size,
            global_batch=global_batch,
            ref_capacity=ref_capacity,
            pos_capacity=pos_capacity,
            ref_dim=ref_dim,
            pos_dim=pos_dim,
            views=views,
            clusters=self.kmeans_clusters if self.clustered else 1,
            neighbours=self.sampling.inter_size,
            dtype=jnp.dtype(self.queue_dtype),
            speaker=labels[0],
            session=labels[1],
            abstract=abstract,
        )

    # -- the loop's call at every epoch start ----------------------------------------------------------------

    def cluster_program(self):
        """The jitted epoch-start clustering: (queues, key, epoch) -> queues; made once per SSPS object."""
        if "_cluster_fn" not in self.__dict__:  # frozen dataclass: cache by hand
            fn = make_cluster_fn(
                self.mesh, self.kmeans_iterations, self.sampling.inter_size, self.kmeans_chunk_elements
            )
            object.__setattr__(self, "_cluster_fn", fn)
        return self.__dict__["_cluster_fn"]

    def before_epoch(self, queues: SSPSState | None, epoch: int, rng: jax.Array) -> tuple[SSPSState | None, dict]:
        """Clusters the reference queue when `epoch` needs it and the state does not hold that epoch's clustering
        yet (as after a resume mid-epoch); returns the queues and the scalars to log ({} when nothing ran).

        `rng` is the run's base key: the clustering of epoch e is keyed by fold_in(split(rng)[1], e).
        """
        if not (self.enabled and self.clustered and self.samples(epoch)) or int(queues.clustered_epoch) == epoch:
            return queues, {}
        started = time.perf_counter()
        key = jax.random.fold_in(jax.random.split(rng)[1], epoch)
        queues = self.cluster_program()(queues, key, jnp.int32(epoch))
        assignment = np.asarray(queues.assignment.addressable_data(0))
        seconds = time.perf_counter() - started
        present = assignment >= 0
        scalars = {"kmeans_seconds": seconds, "clusters_used": float(len(np.unique(assignment[present])))}
        scalars["cluster_size_cv"] = cluster_size_cv(assignment, self.kmeans_clusters)
        for name in ("speaker", "session"):
            y = np.asarray(getattr(queues, name).addressable_data(0))
            if np.all(y[present] >= 0):
                scalars[f"nmi_{name}"] = nmi(y[present], assignment[present])
        say(
            f"ssps epoch {epoch + 1}: k-means in {seconds:.1f} s; "
            + ", ".join(f"{k} {v:.3f}" for k, v in scalars.items() if k != "kmeans_seconds")
        )
        return queues, scalars


def cluster_size_cv(assignment: np.ndarray, clusters: int) -> float:
    """Coefficient of variation (std / mean) of the K cluster sizes, empty clusters included: a label-free
    view of how uneven the clustering is (issue 16, a candidate warning that needs no labels)."""
    sizes = np.bincount(assignment[assignment >= 0], minlength=clusters).astype(np.float64)
    return float(sizes.std() / sizes.mean()) if sizes.sum() else math.nan
