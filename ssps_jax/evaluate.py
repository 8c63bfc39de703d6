"""`ssps-jax evaluate`: a checkpoint of a training workdir on trial lists."""

from __future__ import annotations

from pathlib import Path

import jax

from data_pipelines.errors import InputError
from ssps_jax.observe import say


def evaluate(workdir: str, trials: list[str] | None = None, base_dir: str | None = None, step: int | None = None):
    """Evaluates a checkpoint of `workdir`; writes <workdir>/eval/step_<N>/; returns the results."""
    from ssps_jax import checkpoint, distributed, sharding
    from ssps_jax import config as config_lib
    from ssps_jax.build import build_for_inference
    from ssps_jax.evaluation.verification import make_verifier
    from ssps_jax.train import load_config

    distributed.initialize()

    config = load_config(workdir)
    with config.unlocked():
        if trials:
            config.eval.trials = tuple(trials)
        if base_dir:
            config.eval.base_dir = base_dir
    if not config.eval.trials:
        raise InputError("no trial list: pass --trials or set eval.trials in the config")
    config = config_lib.resolve_paths(config)  # relative trial lists under data.base_dir, as in training
    mesh = sharding.make_mesh()
    method, model, state = build_for_inference(config, mesh)
    ckpt = checkpoint.Checkpointer(Path(workdir) / "checkpoints")
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise InputError(f"no checkpoint in {workdir}/checkpoints")
    state, _ = ckpt.restore(step, state)
    ckpt.close()
    verifier = make_verifier(config, model, mesh)
    results, scores = verifier.evaluate(method.eval_variables(state))
    out = Path(workdir) / "eval" / f"step_{step}"
    if jax.process_index() == 0:
        verifier.write(out, results, scores, {"step": step})
    for name, r in results.items():
        say(f"{name}: EER {100 * r['eer']:.2f}%  minDCF {r['min_dcf']:.4f}  ({r['trials']} trials)")
    say(f"metrics and scores in {out}")
    return results
