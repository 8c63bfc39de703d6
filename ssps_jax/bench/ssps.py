"""`ssps-jax bench-ssps`: one k-means run and SSPS sampling per step, at a given size, on the devices present.

Queues are filled with random unit vectors directly on the devices, in
their sharded training layout, and the programs timed are the training ones:
`clustering.make_cluster_fn` (k-means + final assignment + neighbour table)
and the SSPS part of the train step (`ssps.step.pseudo_positives` followed
by `ssps.step.enqueue`), both jitted over a mesh of all devices. Each is
compiled by a first call, then timed as the median of synchronised repeats.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ssps_jax import sharding
from ssps_jax.bench.timing import devices_line, median_seconds
from ssps_jax.ssps import lifecycle, sampling
from ssps_jax.ssps import step as ssps_step
from ssps_jax.ssps.clustering import make_cluster_fn
from ssps_jax.ssps.lifecycle import SSPS
from ssps_jax.ssps.state import SSPSState, init_ssps_state, partition_specs


@dataclasses.dataclass(frozen=True)
class Sizes:
    n: int  # dataset size = reference queue rows (rounded down to the batch)
    k: int  # clusters
    dim: int  # embedding dimension (reference and positive queues)
    batch: int  # global batch
    queue: int  # Q', rounded down to the batch
    iterations: int
    neighbours: int  # M
    sampling: str
    queue_dtype: str

    @property
    def clustered(self) -> bool:
        """Whether the sampler needs k-means (else its reference queue is aligned with Q')."""
        return sampling.get(self.sampling).clustered


def random_queues(mesh, sizes: Sizes, seed: int = 0) -> SSPSState:
    """Full queues of random unit vectors, a random clustering; in the training layout on `mesh`."""
    b = sizes.batch
    ref_rows, pos_rows = sizes.n - sizes.n % b, sizes.queue - sizes.queue % b
    if not sizes.clustered:
        ref_rows = pos_rows
    empty = init_ssps_state(
        mesh,
        dataset_size=sizes.n,
        global_batch=b,
        ref_capacity=ref_rows,
        pos_capacity=pos_rows,
        ref_dim=sizes.dim,
        pos_dim=sizes.dim,
        views=1,
        clusters=sizes.k,
        neighbours=sizes.neighbours,
        dtype=jnp.dtype(sizes.queue_dtype),
        speaker=np.full(sizes.n, -1),
        session=np.full(sizes.n, -1),
    )

    def fill(state: SSPSState) -> SSPSState:
        keys = jax.random.split(jax.random.PRNGKey(seed), 6)

        def unit(key, shape):
            x = jax.random.normal(key, shape, jnp.float32)
            return (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(state.ref_emb.dtype)

        ref_index = jax.random.permutation(keys[0], sizes.n)[:ref_rows].reshape(state.ref_index.shape)
        pos_index = jax.random.choice(keys[1], sizes.n, (pos_rows,), replace=False).reshape(state.pos_index.shape)
        return state.replace(
            ref_index=ref_index.astype(jnp.int32),
            ref_emb=unit(keys[2], state.ref_emb.shape),
            pos_index=pos_index.astype(jnp.int32),
            pos_emb=unit(keys[3], state.pos_emb.shape),
            assignment=jax.random.randint(keys[4], state.assignment.shape, 0, sizes.k, jnp.int32),
            centroids=unit(keys[5], state.centroids.shape).astype(jnp.float32),
            neighbours=jax.random.randint(keys[5], state.neighbours.shape, 0, sizes.k, jnp.int32),
            clustered_epoch=jnp.zeros((), jnp.int32),
        )

    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs())
    return jax.jit(fill, out_shardings=shardings, donate_argnums=0)(empty)


def make_sampling_step(mesh, sizes: Sizes, steps_per_epoch: int):
    """(queues, step, index, y_ref, key) -> (queues, positives, mask): SSPS's share of a train step."""
    cfg = SSPS(
        sampling=sampling.SamplingConfig(method=sizes.sampling, inter_size=sizes.neighbours),
        start_epoch=0,
        steps_per_epoch=steps_per_epoch,
    )

    def step(queues, step, index, y_ref, key):
        positives, mask, _ = ssps_step.pseudo_positives(queues, step, index, y_ref, key, cfg, sharding.DATA)
        queues = ssps_step.enqueue(queues, step, steps_per_epoch, index, y_ref, positives)
        return queues, positives, mask

    specs = partition_specs()
    data = P(sharding.DATA)
    sharded = jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(specs, P(), data, data, P()),
        out_specs=(specs, P(None, sharding.DATA), data),
        check_vma=False,
    )
    return jax.jit(sharded, donate_argnums=0)


def run(sizes: Sizes, repeats: int = 3, steps: int = 20, seed: int = 0) -> dict:
    """Times one k-means run and the per-step sampling; returns the figures."""
    mesh = sharding.make_mesh()
    if sizes.batch % mesh.size:
        raise ValueError(f"batch {sizes.batch} is not divisible by the {mesh.size} devices")
    state = random_queues(mesh, sizes, seed)
    result = {"devices": devices_line(), **dataclasses.asdict(sizes)}
    queue_bytes = sum(x.nbytes for x in (state.ref_index, state.ref_emb, state.pos_index, state.pos_emb))
    result["queue_mib_per_device"] = queue_bytes / mesh.size / 2**20

    if sizes.clustered:
        cluster = make_cluster_fn(mesh, sizes.iterations, sizes.neighbours)
        key = jax.random.PRNGKey(seed)

        def kmeans_once():
            nonlocal state
            state = cluster(state, key, jnp.int32(0))
            return state.assignment

        first, median = median_seconds(kmeans_once, repeats)
        result.update(kmeans_first_call_s=first, kmeans_s=median, kmeans_iteration_s=median / (sizes.iterations + 1))

    steps_per_epoch = state.ref_index.shape[0]
    step_fn = make_sampling_step(mesh, sizes, steps_per_epoch)
    batch = NamedSharding(mesh, P(sharding.DATA))
    rng = np.random.default_rng(seed)
    index = jax.device_put(rng.choice(sizes.n, sizes.batch, replace=False).astype(np.int32), batch)
    y = rng.normal(size=(sizes.batch, sizes.dim)).astype(np.float32)
    y_ref = jax.device_put(y / np.linalg.norm(y, axis=1, keepdims=True), batch)
    counter = iter(range(10**9))

    def sample_once():
        nonlocal state
        s = next(counter)
        state, positives, mask = step_fn(state, jnp.int32(s), index, y_ref, jax.random.PRNGKey(s))
        return positives, mask

    first, median = median_seconds(sample_once, steps)
    result.update(sampling_first_call_s=first, sampling_step_ms=1e3 * median)
    return result


def table(result: dict) -> str:
    """The figures as a markdown table."""
    rows = [
        ("devices", result["devices"]),
        ("N (reference queue) / K / D", f"{result['n']} / {result['k']} / {result['dim']}"),
        ("global batch / Q'", f"{result['batch']} / {result['queue']}"),
        ("sampling / M / queue dtype", f"{result['sampling']} / {result['neighbours']} / {result['queue_dtype']}"),
        ("queue memory per device", f"{result['queue_mib_per_device']:.1f} MiB"),
    ]
    if "kmeans_s" in result:
        rows += [
            (
                f"k-means run ({result['iterations']} iterations + final E-step, neighbours)",
                f"{result['kmeans_s']:.3f} s",
            ),
            ("k-means per iteration", f"{result['kmeans_iteration_s']:.3f} s"),
            ("k-means first call (compile + run)", f"{result['kmeans_first_call_s']:.1f} s"),
        ]
    rows += [
        ("SSPS sampling + queue writes per step", f"{result['sampling_step_ms']:.2f} ms"),
        ("sampling first call (compile + run)", f"{result['sampling_first_call_s']:.1f} s"),
    ]
    lines = ["| measure | value |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)]
    return "\n".join(lines)


def main(args) -> None:
    sizes = Sizes(
        n=args.n,
        k=args.k,
        dim=args.dim,
        batch=args.batch,
        queue=args.queue,
        iterations=args.iterations,
        neighbours=args.neighbours,
        sampling=args.sampling or lifecycle.default_config()["sampling"],
        queue_dtype=args.queue_dtype,
    )
    result = run(sizes, repeats=args.repeats, steps=args.steps)
    print(table(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written to {args.json}")
