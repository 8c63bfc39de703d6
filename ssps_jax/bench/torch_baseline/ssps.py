"""SSPS kmeans-repr (SSPS-Clustering) in PyTorch, the way sslsv does it (sslsv/methods/_SSPS).

sslsv facts mirrored:
  * queues are flat tensors on the training device: reference queue
    (dataset index, y^) and positive queue (dataset index, z'); the batch of
    epoch step s is written at rows [(s B) mod C, (s B) mod C + B) of each
    (SSPS.update_buffers), z' detached;
  * KMeans.run: init with K random queue rows (randperm), then iterations + 1
    E-steps -- `chunk @ centroids.T` and a max over row chunks of one batch --
    with an M-step after all but the last: the rows of each cluster
    grouped on the host, a Python loop over the K clusters summing its rows,
    centroid = sum / count where count > 0, then L2 normalisation; the last
    E-step's labels are the assignment of the dataset indices in the queue
    (-1 for the others);
  * _create_cluster_to_nearby_clusters: a Python loop over the clusters,
    top-M similarities of the centroid against all centroids, stored as lists;
  * SSPS_KMeansReprSampling.sample: a Python loop over the anchors (one
    device sync per anchor): c = assignment[i]; c* drawn with torch.multinomial
    among the neighbours of c; candidates = positive-queue dataset indices
    whose assignment is c* (`assignment[queue_indices] == c*`, recomputed
    for every anchor); one drawn uniformly; then _find_train_indices_in_queue,
    another loop over the anchors, maps each drawn dataset index to the
    *last* queue row holding it; `apply` copies those rows of the positive
    queue over the anchors' positives (the others keep theirs).

Where sslsv differs from docs/method.md (§3-§5, §12), this follows it (and ssps_jax), because the
benchmark and the equivalence test compare the same algorithm:
  * reference queue capacity = train-set size rounded down to the batch
    (sslsv has that too for kmeans-repr; it sizes it to Q' only for knn);
  * empty rows (index -1) take part in nothing: sslsv fills the queues with
    randn rows that k-means clusters until they are overwritten, and indexes
    `assignment[-1]` (the last dataset index) for empty positive rows;
  * a cluster with no rows keeps its previous centroid (sslsv does this too);
  * neighbours are the M nearest *other* centroids, the cluster itself
    excluded explicitly (sslsv takes top-(M + 1) and drops the first, which is
    the cluster itself unless centroids tie); M = 0 means the cluster itself;
  * no speaker / video diagnostics (sslsv looks every anchor up in a pandas
    table of the train list): the benchmark has no labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssps_jax.ssps.samplers import kmeans_repr
from ssps_jax.ssps.sampling import SamplingConfig


def _draw(size: int, exponential: bool, lam: float, generator: torch.Generator) -> int:
    """A rank in [0, size): uniform, or with weights lambda exp(-lambda rank) (sslsv's _sample)."""
    if exponential:
        probabilities = lam * torch.exp(-lam * torch.arange(size, dtype=torch.float32))
    else:
        probabilities = torch.ones(size) / size
    return int(torch.multinomial(probabilities / probabilities.sum(), 1, generator=generator))


def _assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int) -> torch.Tensor:
    """E-step: the centroid of highest dot product for every row, one chunk of rows at a time."""
    return torch.cat([(rows @ centroids.T).max(dim=1).indices for rows in x.split(chunk, dim=0)])


def _cluster_sums(x: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """M-step sums: each cluster's rows found on the host, then summed in a loop over the clusters."""
    labels = labels.cpu()
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_clusters)
    members = torch.split(order, counts.tolist())
    sums = torch.zeros(num_clusters, x.shape[1], device=x.device)
    for k in range(num_clusters):
        if len(members[k]):
            sums[k] = x[members[k].to(x.device)].sum(dim=0)
    return sums, counts.to(x.device)


@torch.no_grad()
def spherical_kmeans(
    x: torch.Tensor, num_clusters: int, iterations: int, chunk: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids (K, D), label of every row (R,)) of the L2-normalised rows x (R, D), sslsv's KMeans.run."""
    if x.shape[0] < num_clusters:
        raise ValueError(f"k-means needs at least K = {num_clusters} rows, the queue holds {x.shape[0]}")
    centroids = x[torch.randperm(x.shape[0], generator=generator)[:num_clusters].to(x.device)].clone()
    for _ in range(iterations):
        sums, counts = _cluster_sums(x, _assign(x, centroids, chunk), num_clusters)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled].unsqueeze(1)
        centroids = F.normalize(centroids, p=2, dim=1)
    return centroids, _assign(x, centroids, chunk)


@torch.no_grad()
def nearest_clusters(centroids: torch.Tensor, count: int) -> list[list[int]]:
    """For every cluster, its `count` nearest other centroids, nearest first; itself when count = 0."""
    table = []
    for c in range(centroids.shape[0]):
        if count == 0:
            table.append([c])
            continue
        sims = centroids[c] @ centroids.T
        sims[c] = -float("inf")
        table.append(torch.topk(sims, count).indices.tolist())
    return table


class KMeansReprSSPS:
    """The memory queues, the epoch's clustering and the per-step sampling of SSPS-Clustering."""

    def __init__(
        self,
        *,
        dataset_size: int,
        global_batch: int,
        ref_dim: int,
        pos_dim: int,
        pos_queue_size: int,
        clusters: int,
        iterations: int,
        sampling: SamplingConfig,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ):
        if sampling.method != kmeans_repr.SAMPLER.name:  # the one sampler written here
            raise ValueError(
                f"the PyTorch baseline implements SSPS {kmeans_repr.SAMPLER.name} only, got {sampling.method!r}"
            )
        self.global_batch = global_batch
        self.clusters = clusters
        self.iterations = iterations
        self.sampling = sampling
        self.device = torch.device(device)
        # Draws happen on the host, like sslsv's torch.multinomial and torch.randperm.
        self.generator = torch.Generator().manual_seed(seed)
        ref_capacity = dataset_size - dataset_size % global_batch
        pos_capacity = pos_queue_size - pos_queue_size % global_batch
        self.steps_per_epoch = dataset_size // global_batch
        self.ref_index = torch.full((ref_capacity,), -1, dtype=torch.long, device=self.device)
        self.ref_emb = torch.zeros(ref_capacity, ref_dim, device=self.device)
        self.pos_index = torch.full((pos_capacity,), -1, dtype=torch.long, device=self.device)
        self.pos_emb = torch.zeros(pos_capacity, pos_dim, device=self.device)
        self.assignment = torch.full((dataset_size,), -1, dtype=torch.long, device=self.device)
        self.centroids: torch.Tensor | None = None
        self.neighbours: list[list[int]] = []

    @property
    def clustered(self) -> bool:
        return bool(self.neighbours)

    @torch.no_grad()
    def cluster(self) -> None:
        """Epoch start: k-means of the reference queue, assignment of its indices, neighbour table."""
        filled = self.ref_index >= 0
        centroids, labels = spherical_kmeans(
            self.ref_emb[filled], self.clusters, self.iterations, self.global_batch, self.generator
        )
        self.assignment.fill_(-1)
        self.assignment[self.ref_index[filled]] = labels
        self.centroids = centroids
        self.neighbours = nearest_clusters(centroids, self.sampling.inter_size)

    @torch.no_grad()
    def sample(self, indices: torch.Tensor) -> torch.Tensor:
        """Positive-queue row of each anchor's pseudo-positive (B,), -1: keep the ordinary positive."""
        chosen = torch.full_like(indices, -1)
        if not self.clustered:
            return chosen
        s = self.sampling
        for i, index in enumerate(indices):
            cluster = self.assignment[index].item()
            if cluster < 0:
                continue
            nearby = self.neighbours[cluster]
            target = nearby[_draw(len(nearby), s.inter_exp, s.inter_lambda, self.generator)]
            in_target = (self.pos_index >= 0) & (self.assignment[self.pos_index.clamp(min=0)] == target)
            candidates = self.pos_index[in_target]
            if len(candidates) == 0:
                continue
            # The config allows only uniform intra-cluster draws for the clustering variants.
            chosen[i] = candidates[_draw(len(candidates), False, 0.0, self.generator)]
        return self._queue_rows(chosen)

    def _queue_rows(self, chosen: torch.Tensor) -> torch.Tensor:
        """Dataset indices -> the last positive-queue row holding each (sslsv's _find_train_indices_in_queue)."""
        rows = torch.full_like(chosen, -1)
        for i, index in enumerate(chosen):
            if index == -1:
                continue
            matches = torch.nonzero(self.pos_index == index).view(-1)
            if len(matches):
                rows[i] = matches[-1]
        return rows

    def replace(self, positives: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The positives with the sampled queue rows in place of the anchors that got one (as constants)."""
        replaced = positives.clone()
        found = rows >= 0
        replaced[found] = self.pos_emb[rows[found]].to(replaced.dtype)
        return replaced

    @torch.no_grad()
    def enqueue(self, step_in_epoch: int, indices: torch.Tensor, y_ref: torch.Tensor, positives: torch.Tensor) -> None:
        """Writes the batch into both queues at row (step_in_epoch * B) mod capacity."""
        b = indices.shape[0]
        start = (step_in_epoch * b) % self.ref_index.shape[0]
        self.ref_index[start : start + b] = indices
        self.ref_emb[start : start + b] = y_ref
        start = (step_in_epoch * b) % self.pos_index.shape[0]
        self.pos_index[start : start + b] = indices
        self.pos_emb[start : start + b] = positives.detach()
