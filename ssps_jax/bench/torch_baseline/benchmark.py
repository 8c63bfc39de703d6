"""`run_benchmark`: SimCLR(-SSPS) train steps of the PyTorch baseline on synthetic waveforms.

The model comes from one of our configs (ECAPA-TDNN, SimCLR); the batch has
the config's crop lengths (two views of `data.crops.frame_seconds`, one
reference crop of `data.crops.reference_seconds`, at 16 kHz) and random
dataset indices. With SSPS the queues are filled with random unit vectors
and random dataset indices and clustered once before any step (outside the
timing), so that every timed step really samples, replaces and writes.
"""

from __future__ import annotations

import statistics
import time

import ml_collections
import numpy as np
import torch

from ssps_jax.bench.torch_baseline.simclr import build_simclr
from ssps_jax.bench.torch_baseline.ssps import KMeansReprSSPS
from ssps_jax.bench.torch_baseline.train_step import SimCLRTrainStep, synchronize
from ssps_jax.ssps.lifecycle import sampling_config

SAMPLE_RATE = 16000


def default_dataset_size(config: ml_collections.ConfigDict, global_batch: int) -> int:
    """A synthetic train-set size: twice K (so k-means has rows to spare) and at least Q' and four batches.

    The per-step SSPS cost depends on B and Q', not on the train-set size,
    which only sizes the reference queue that k-means clusters.
    """
    s = config.ssps
    return max(2 * s.kmeans_clusters, s.pos_queue_size, 4 * global_batch)


def _fill_queues(ssps: KMeansReprSSPS, dataset_size: int, generator: torch.Generator) -> None:
    """Full queues: every row a random unit vector, reference rows a permutation of the dataset indices."""

    def unit_rows(shape):
        x = torch.randn(*shape, generator=generator)
        return torch.nn.functional.normalize(x, dim=1).to(ssps.device)

    ref_rows, pos_rows = ssps.ref_index.shape[0], ssps.pos_index.shape[0]
    ssps.ref_index.copy_(torch.randperm(dataset_size, generator=generator)[:ref_rows])
    ssps.ref_emb.copy_(unit_rows(ssps.ref_emb.shape))
    ssps.pos_index.copy_(torch.randperm(dataset_size, generator=generator)[:pos_rows])
    ssps.pos_emb.copy_(unit_rows(ssps.pos_emb.shape))


def _make_ssps(config, global_batch: int, dataset_size: int, model, device, seed: int) -> KMeansReprSSPS:
    s = config.ssps
    if s.pos_queue_size < global_batch:
        raise ValueError(f"config.ssps.pos_queue_size {s.pos_queue_size} is smaller than the batch {global_batch}")
    pos_dim = config.simclr.projector_output_dim if config.simclr.projector else model.encoder.encoder_dim
    return KMeansReprSSPS(
        dataset_size=dataset_size,
        global_batch=global_batch,
        ref_dim=model.encoder.encoder_dim,
        pos_dim=pos_dim,
        pos_queue_size=s.pos_queue_size,
        clusters=s.kmeans_clusters,
        iterations=s.kmeans_iterations,
        sampling=sampling_config(s),
        device=device,
        seed=seed,
    )


def _timed_step(step: SimCLRTrainStep, batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[float, float]:
    synchronize(device)
    started = time.perf_counter()
    loss = step(*batch)
    synchronize(device)
    seconds = time.perf_counter() - started
    return seconds, float(loss)


def run_benchmark(
    config: ml_collections.ConfigDict,
    global_batch: int,
    steps: int,
    warmup: int,
    compile: bool,
    ssps: bool,
    seed: int = 0,
    *,
    dataset_size: int | None = None,
) -> dict:
    """Times `steps` train steps after `warmup` on CUDA if available, else the CPU; returns the numbers.

    step_s_median is the median step time, compile_s the first step minus it
    (torch.compile's compilation, or first-call overheads in eager mode),
    ssps_s_median the median time of the SSPS part of a step (sampling,
    replacement, queue writes) measured inside it.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_simclr(config).to(device)
    generator = torch.Generator().manual_seed(seed)
    dataset_size = dataset_size or default_dataset_size(config, global_batch)

    queues, kmeans_s = None, None
    if ssps:
        queues = _make_ssps(config, global_batch, dataset_size, model, device, seed)
        _fill_queues(queues, dataset_size, generator)
        started = time.perf_counter()
        queues.cluster()
        synchronize(device)
        kmeans_s = time.perf_counter() - started

    dtype = config.model.dtype  # float32, or bfloat16 as torch.autocast
    step = SimCLRTrainStep(model, config.simclr.temperature, queues, config.optim.learning_rate, compile, dtype)
    view_samples = round(config.data.crops.frame_seconds * SAMPLE_RATE)
    reference_samples = round(config.data.crops.reference_seconds * SAMPLE_RATE)

    def batch():
        views = torch.randn(global_batch, 2, view_samples, generator=generator)
        reference = torch.randn(global_batch, reference_samples, generator=generator)
        indices = torch.randperm(dataset_size, generator=generator)[:global_batch]
        return views.to(device), reference.to(device), indices.to(device)

    times, ssps_times, coverage, losses = [], [], [], []
    for i in range(warmup + steps):
        try:
            seconds, loss = _timed_step(step, batch(), device)
        except Exception as error:
            if compile and i == 0:
                raise RuntimeError(f"torch.compile failed on this machine ({type(error).__name__}): {error}") from error
            raise
        times.append(seconds)
        ssps_times.append(step.ssps_seconds)
        coverage.append(step.coverage)
        losses.append(loss)

    timed = slice(warmup, None)
    step_s = statistics.median(times[timed])
    return {
        "implementation": "torch.compile" if compile else "torch",
        "step_s_median": step_s,
        "samples_per_s": global_batch / step_s,
        "compile_s": times[0] - step_s,
        "ssps_s_median": statistics.median(ssps_times[timed]) if ssps else None,
        "ssps_share": statistics.median(ssps_times[timed]) / step_s if ssps else None,
        "ssps_coverage": float(np.mean(coverage[timed])) if ssps else None,
        "kmeans_s": kmeans_s,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "global_batch": global_batch,
        "steps": steps,
        "warmup": warmup,
        "dataset_size": dataset_size if ssps else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
