"""`ssps-jax evaluate`: a checkpoint of a training workdir on trial lists."""

from __future__ import annotations

from pathlib import Path

import jax

from data_pipelines.errors import InputError
from ssps_jax.config_overrides import UsageError
from ssps_jax.observe import say


def evaluate(workdir: str, trials: list[str] | None = None, base_dir: str | None = None, step: int | None = None):
    """Evaluates a checkpoint of `workdir`; writes <workdir>/eval/step_<N>/; returns the results."""
    from ssps_jax import checkpoint, distributed, sharding
    from ssps_jax import config as config_lib
    from ssps_jax.build import build_for_inference
    from ssps_jax.evaluation.verification import make_verifier, summary_lines
    from ssps_jax.train import load_config

    distributed.initialize()

    config = load_config(workdir)
    with config.unlocked():
        # Workdirs trained before an eval key existed evaluate with its default.
        for key, default in config_lib.base_config().eval.items():
            if key not in config.eval:
                config.eval[key] = default
        if trials:
            config.eval.trials = tuple(trials)
        if base_dir:
            config.eval.base_dir = base_dir
    if not config.eval.trials:
        raise InputError("no trial list: pass --trials or set eval.trials in the config")
    config_lib.validate_scoring(config.eval)
    given = tuple(config.eval.trials)
    config = config_lib.resolve_paths(config)  # relative trial lists under data.base_dir, as in training
    for name, path in zip(given, config.eval.trials):
        if not Path(path).is_file():
            origin = f" ({name!r} relative to data.base_dir)" if path != name else ""
            raise UsageError(f"--trials: file not found: {path}{origin}")
    mesh = sharding.make_mesh()
    method, model, state = build_for_inference(config, mesh)
    ckpt = checkpoint.Checkpointer(Path(workdir) / "checkpoints")
    if step is None:
        # The newest readable one; damaged ones are skipped with a warning and left where they are.
        if (restored := ckpt.restore_newest(state, move_aside=False)) is None:
            raise InputError(f"no checkpoint in {workdir}/checkpoints")
        step, state, _ = restored
    else:
        if step not in ckpt.manager.all_steps():
            raise InputError(f"no checkpoint {step} in {workdir}/checkpoints")
        if why := ckpt.damage(step):
            raise InputError(f"checkpoint {step} in {workdir}/checkpoints cannot be read back: {why}")
        state, _ = ckpt.restore(step, state)
    ckpt.close()
    verifier = make_verifier(config, model, mesh)
    results, scores = verifier.evaluate(method.eval_variables(state))
    out = Path(workdir) / "eval" / f"step_{step}"
    if jax.process_index() == 0:
        verifier.write(out, results, scores, {"step": step})
    for line in summary_lines(results):
        say(line)
    say(f"metrics and scores in {out}")
    return results
