"""The PyTorch baseline of `ssps-jax bench`: SimCLR-SSPS with ECAPA-TDNN, written the way sslsv writes it.

The same model, loss, batch and SSPS algorithm as ours, in idiomatic
single-process PyTorch (what sslsv runs with DDP on one GPU), so that one
benchmark run on one machine gives ours / theirs ratios, and a test
(tests/test_torch_baseline.py) proves it computes the same function: from
our weights (`load_flax_variables`) and the same inputs, the losses agree.

  features.py    log-mel front end (docs/method.md §7): our NumPy window and filterbank, torch.stft
  ecapa_tdnn.py  ECAPA-TDNN with sslsv's module tree, so state_dict keys are sslsv's keys
  simclr.py      SimCLR model and NT-Xent, Flax -> torch weight loading
  ssps.py        SSPS kmeans-repr: queues, sslsv's KMeans, its per-anchor sampling loop
  train_step.py  one training step with Adam, SSPS time measured inside it
  benchmark.py   `run_benchmark`: synthetic waveforms of the config's crop lengths, median step times

Importing this package imports torch (install it with the `bench` extra).
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the PyTorch baseline needs torch: pip install 'ssps-jax[bench]' (CPU: pip install torch==2.13.0)"
    ) from error

from ssps_jax.bench.torch_baseline.benchmark import run_benchmark
from ssps_jax.bench.torch_baseline.ecapa_tdnn import ECAPATDNN, build_encoder
from ssps_jax.bench.torch_baseline.features import LogMel
from ssps_jax.bench.torch_baseline.simclr import SimCLR, build_simclr, flax_state_dict, load_flax_variables, nt_xent
from ssps_jax.bench.torch_baseline.ssps import KMeansReprSSPS, nearest_clusters, spherical_kmeans
from ssps_jax.bench.torch_baseline.train_step import SimCLRTrainStep

__all__ = [
    "ECAPATDNN",
    "KMeansReprSSPS",
    "LogMel",
    "SimCLR",
    "SimCLRTrainStep",
    "build_encoder",
    "build_simclr",
    "flax_state_dict",
    "load_flax_variables",
    "nearest_clusters",
    "nt_xent",
    "run_benchmark",
    "spherical_kmeans",
]
