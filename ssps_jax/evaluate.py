"""`ssps-jax evaluate`: a checkpoint of a training workdir on trial lists."""

from __future__ import annotations

import jax
from etils import epath

from data_pipelines.errors import InputError
from ssps_jax.config_overrides import UsageError
from ssps_jax.observe import say


def evaluate(workdir: str, trials: list[str] | None = None, base_dir: str | None = None, step: int | None = None):
    """Evaluates a checkpoint of `workdir`; writes <workdir>/eval/step_<N>/; returns the results."""
    from ssps_jax import distributed
    from ssps_jax.evaluation.verification import make_trial_evaluator, summary_lines
    from ssps_jax.inference import TrainedModel, inference_config
    from ssps_jax.train import load_config

    distributed.initialize()

    config = inference_config(workdir, trials, base_dir)  # relative trial lists under data.base_dir, as in training
    if not config.eval.trials:
        raise InputError("no trial list: pass --trials or set eval.trials in the config")
    given = trials or load_config(workdir).eval.trials  # as written, to say what a missing path was relative to
    for name, path in zip(given, config.eval.trials):
        if not epath.Path(path).is_file():
            origin = f" ({name!r} relative to data.base_dir)" if path != name else ""
            raise UsageError(f"--trials: file not found: {path}{origin}")
    trained = TrainedModel.from_workdir(workdir, step, config=config)
    evaluator = make_trial_evaluator(config, trained.model, trained.mesh)
    results, scores = evaluator.evaluate(trained.variables)
    out = epath.Path(workdir) / "eval" / f"step_{trained.step}"
    if jax.process_index() == 0:
        evaluator.write(out, results, scores, {"step": trained.step})
    for line in summary_lines(results):
        say(line)
    say(f"metrics and scores in {out}")
    return results
