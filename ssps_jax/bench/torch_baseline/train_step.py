"""One SimCLR(-SSPS) training step in PyTorch: what sslsv's Trainer and _BaseSiameseMethod do per batch.

Order of work (ours, ssps_jax/train_step.py simclr_step; sslsv's in brackets):
  1. y^ = L2-normalised encoder output of the reference crop, encoder in eval
     mode under no_grad [sslsv computes it after the two training-mode
     forwards, so its eval-mode BatchNorm already sees this step's running
     statistics; we use the statistics from before the step, like ours];
  2. SSPS sampling [sslsv: after the forwards; the result does not depend on it];
  3. both views through the model in train mode;
  4. view 2's embeddings replaced by the sampled positive-queue rows;
  5. NT-Xent, backward, Adam step;
  6. the batch written into the queues [sslsv: before backward; nothing
     reads the queues in between].
SSPS time = sampling + replacement + queue writes, measured inside the step
with time.perf_counter, synchronised on CUDA so it counts device work.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ssps_jax.bench.torch_baseline.simclr import SimCLR, nt_xent
from ssps_jax.bench.torch_baseline.ssps import KMeansReprSSPS


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SimCLRTrainStep:
    """`step(views (B, 2, n), reference (B, n_ref), indices (B,)) -> loss` with Adam, updating model and queues.

    compile=True runs the model's forward through torch.compile (the
    training forward of both views, and the eval-mode encoder for y^).
    dtype="bfloat16" runs both forwards under torch.autocast(bfloat16), PyTorch's
    own mixed precision (float32 parameters, bfloat16 convolutions and matmuls),
    the counterpart of our `model.dtype = "bfloat16"`; the loss is taken in float32.
    """

    def __init__(
        self,
        model: SimCLR,
        temperature: float,
        ssps: KMeansReprSSPS | None = None,
        learning_rate: float = 1e-3,
        compile: bool = False,
        dtype: str = "float32",
    ):
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        self.model = model
        self.temperature = temperature
        self.ssps = ssps
        self.optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        self.forward = torch.compile(model, dynamic=False) if compile else model
        self.embed = torch.compile(model.encoder, dynamic=False) if compile else model.encoder
        self.device = next(model.parameters()).device
        self.bfloat16 = dtype == "bfloat16"
        self.step = 0
        self.ssps_seconds = 0.0  # of the last step
        self.coverage = 0.0  # share of the last step's anchors that got a pseudo-positive

    def _reference_embeddings(self, reference: torch.Tensor) -> torch.Tensor:
        self.model.encoder.eval()
        with torch.no_grad(), self._autocast():
            y_ref = F.normalize(self.embed(reference).float(), p=2, dim=-1)
        self.model.encoder.train()
        return y_ref

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bfloat16)

    def _timed_ssps(self, fn, *args):
        synchronize(self.device)
        started = time.perf_counter()
        out = fn(*args)
        synchronize(self.device)
        self.ssps_seconds += time.perf_counter() - started
        return out

    def __call__(self, views: torch.Tensor, reference: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        self.model.train()
        self.ssps_seconds = 0.0
        if self.ssps is not None:
            y_ref = self._reference_embeddings(reference)
            rows = self._timed_ssps(self.ssps.sample, indices)
            self.coverage = float((rows >= 0).float().mean())

        with self._autocast():
            z1, z2 = self.forward(views)
        z1, z2 = z1.float(), z2.float()
        z2_used = z2 if self.ssps is None else self._timed_ssps(self.ssps.replace, z2, rows)
        loss = nt_xent(z1, z2_used, self.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

        if self.ssps is not None:
            step_in_epoch = self.step % self.ssps.steps_per_epoch
            self._timed_ssps(self.ssps.enqueue, step_in_epoch, indices, y_ref, z2)
        self.step += 1
        return loss.detach()
