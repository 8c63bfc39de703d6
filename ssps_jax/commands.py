"""`ssps-jax train`, `evaluate`, `demo` (ssps_jax/demo.py), `bench` and `bench-input` (ssps_jax/bench/).

train and evaluate take absl flags, so configs are ml_collections config
files with command-line overrides:

  ssps-jax train --config configs/demo_simclr.py --workdir W --config.train.epochs=5
  ssps-jax evaluate --workdir W [--trials a.txt --trials b.txt] [--step N]
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines.errors import InputError
from ssps_jax.observe import say


def _run(fn, argv: list[str]) -> None:
    """absl's app.run, with bad input and lost runs reported as one message."""
    from ssps_jax.train import NonFiniteLossError

    def main(_):
        if not any(a.startswith(("--verbosity", "-v")) for a in argv):
            logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
        try:
            fn()
        except (InputError, NonFiniteLossError) as e:
            sys.exit(f"error: {e}")

    app.run(main, argv=argv)


def train_main(argv: list[str]) -> None:
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run folder: checkpoints, logs, evaluations. Resumes if it has a checkpoint.")
    flags.mark_flags_as_required(["config", "workdir"])

    def run():
        from ssps_jax import distributed
        from ssps_jax.train import train

        distributed.initialize()
        train(flags.FLAGS.config, flags.FLAGS.workdir)

    _run(run, argv)


def evaluate_main(argv: list[str]) -> None:
    flags.DEFINE_string("workdir", None, "A training workdir.")
    flags.DEFINE_multi_string("trials", None, "Trial lists (default: the config's eval.trials).")
    flags.DEFINE_string("base_dir", None, "Folder the trial paths are relative to (default: the config's).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.mark_flag_as_required("workdir")
    _run(lambda: evaluate(flags.FLAGS.workdir, flags.FLAGS.trials, flags.FLAGS.base_dir, flags.FLAGS.step), argv)


def evaluate(workdir: str, trials: list[str] | None = None, base_dir: str | None = None, step: int | None = None):
    """Evaluates a checkpoint of `workdir`; writes <workdir>/eval/step_<N>/; returns the results."""
    from ssps_jax import checkpoint, distributed, methods, sharding
    from ssps_jax.train import load_config, make_verifier, variables
    from ssps_jax.train_state import init_train_state

    distributed.initialize()

    config = load_config(workdir)
    with config.unlocked():
        if trials:
            config.eval.trials = tuple(trials)
        if base_dir:
            config.eval.base_dir = base_dir
    if not config.eval.trials:
        raise InputError("no trial list: pass --trials or set eval.trials in the config")
    mesh = sharding.make_mesh()
    model = methods.build_model(config)
    # An optimizer with the training one's state structure (its schedule does not matter here).
    tx, _ = methods.build_optimizer(config, steps_per_epoch=1, total_steps=max(1, config.train.epochs))
    state = init_train_state(
        model, tx, config.seed, methods.example_input(config), mesh, methods.teacher_outputs(config)
    )
    ckpt = checkpoint.Checkpointer(Path(workdir) / "checkpoints")
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise InputError(f"no checkpoint in {workdir}/checkpoints")
    state, _ = ckpt.restore(step, state)
    ckpt.close()
    verifier = make_verifier(config, model, mesh)
    results, scores = verifier.evaluate(variables(state))
    out = Path(workdir) / "eval" / f"step_{step}"
    if jax.process_index() == 0:
        verifier.write(out, results, scores, {"step": step})
    for name, r in results.items():
        say(f"{name}: EER {100 * r['eer']:.2f}%  minDCF {r['min_dcf']:.4f}  ({r['trials']} trials)")
    say(f"metrics and scores in {out}")
    return results


def demo_main(argv: list[str]) -> None:
    flags.DEFINE_string("data", "demo_data", "Where the demo corpus is (written first if missing).")
    flags.DEFINE_string("workdir", "workdirs/demo_simclr", "Folder of the demo's runs.")
    config_flags.DEFINE_config_file("config", "configs/demo_ssps.py", "Config file (with SSPS).", lock_config=True)

    def run():
        from ssps_jax import demo

        demo.run(flags.FLAGS.data, flags.FLAGS.workdir, flags.FLAGS.config)

    _run(run, argv)


def bench_main(argv: list[str]) -> None:
    config_flags.DEFINE_config_file(
        "config",
        "configs/simclr_ssps_ecapa.py",
        "Config file; its model, batch, crops and ssps sizes are timed.",
        lock_config=True,
    )
    flags.DEFINE_integer("steps", 20, "Timed train steps (median).")
    flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first call is always one of them).")
    flags.DEFINE_integer("batch", None, "Global batch (default: the config's train.global_batch_size).")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the config's model.dtype).")
    flags.DEFINE_integer("kmeans_n", None, "Reference queue rows N (default: paper scale or the largest that fits).")
    flags.DEFINE_integer("kmeans_k", None, "k-means clusters K (default: the config's; 5000 on CPU).")
    flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
    flags.DEFINE_enum("baseline", None, ["torch"], "Also run the PyTorch reference step and print the ratios.")

    def run():
        from ssps_jax import distributed
        from ssps_jax.bench import train as bench

        distributed.initialize()  # several processes (a pod, a GPU cluster): one mesh of all their devices
        f = flags.FLAGS
        bench.main(
            f.config,
            steps=f.steps,
            warmup=f.warmup,
            batch=f.batch,
            dtype=f.dtype,
            kmeans_n=f.kmeans_n,
            kmeans_k=f.kmeans_k,
            json_path=f.json,
            baseline=f.baseline,
        )

    _run(run, argv)


def bench_input_main(argv: list[str]) -> None:
    config_flags.DEFINE_config_file(
        "config", "configs/demo_ssps.py", "Config file: its data section and batch are read.", lock_config=True
    )
    flags.DEFINE_list("workers", ["0", "1", "2"], "Grain worker process counts to measure: --workers=0,1,2.")
    flags.DEFINE_integer("batches", 20, "Timed batches per worker count.")
    flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
    flags.DEFINE_string("against", None, "JSON of `ssps-jax bench`: say whether the input keeps up with its samples/s.")

    def run():
        from ssps_jax.bench import input as bench

        f = flags.FLAGS
        bench.main(f.config, [int(w) for w in f.workers], f.batches, f.json, f.against)

    _run(run, argv)
