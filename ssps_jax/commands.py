"""`ssps-jax train`, `evaluate`, `demo` (ssps_jax/demo.py), `bench` and `bench-input` (ssps_jax/bench/).

train and evaluate take absl flags, so configs are ml_collections config
files with command-line overrides:

  ssps-jax train --config configs/demo_simclr.py --workdir W --config.train.epochs=5
  ssps-jax evaluate --workdir W [--trials a.txt --trials b.txt] [--step N]
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines.errors import InputError


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
    from ssps_jax.evaluate import evaluate as _evaluate

    flags.DEFINE_string("workdir", None, "A training workdir.")
    flags.DEFINE_multi_string("trials", None, "Trial lists (default: the config's eval.trials).")
    flags.DEFINE_string("base_dir", None, "Folder the trial paths are relative to (default: the config's).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.mark_flag_as_required("workdir")
    _run(lambda: _evaluate(flags.FLAGS.workdir, flags.FLAGS.trials, flags.FLAGS.base_dir, flags.FLAGS.step), argv)


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
