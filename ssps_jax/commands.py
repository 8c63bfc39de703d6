"""What each `ssps-jax` command does, given the arguments ssps_jax/cli.py parsed.

One function per command, named after it. The library (and JAX with it) is
imported inside them, so that `--help` and usage errors stay instant.
Commands with a config (train, demo, bench, bench-input) receive it in
`args.config` already loaded, overridden and locked. A path given on the
command line that must exist is checked first, as a usage error (one line,
exit 2) instead of a failure deep in the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from data_pipelines.errors import InputError
from ssps_jax.config_overrides import UsageError


def _file(flag: str, path: str) -> None:
    from etils import epath  # local paths and gs:// alike

    if not epath.Path(path).is_file():
        raise UsageError(f"{flag}: file not found: {path}")


def _folder(flag: str, path: str) -> None:
    from etils import epath

    if not epath.Path(path).is_dir():
        raise UsageError(f"{flag}: folder not found: {path}")


def train(args: argparse.Namespace) -> None:
    from ssps_jax import distributed
    from ssps_jax import train as train_lib

    distributed.initialize()  # several processes (a pod, a GPU cluster): one mesh of all their devices
    train_lib.train(args.config, args.workdir)


def evaluate(args: argparse.Namespace) -> None:
    _folder("--workdir", args.workdir)  # --trials are checked once resolved under data.base_dir (evaluate.py)
    if args.base_dir:
        _folder("--base-dir", args.base_dir)
    from ssps_jax.evaluate import evaluate as evaluate_run  # joins the multi-process runtime itself

    evaluate_run(args.workdir, args.trials, args.base_dir, args.step)


def plot(args: argparse.Namespace) -> None:
    _folder("WORKDIR", args.workdir)
    from ssps_jax import plot as plot_lib

    written = plot_lib.plot(args.workdir)
    if not written:
        raise InputError(f"{args.workdir} has neither metrics.jsonl nor an evaluation's scores: nothing to plot")
    for path in written:
        print(f"wrote {path}")


def extract(args: argparse.Namespace) -> None:
    _folder("--workdir", args.workdir)
    if args.base_dir:
        _folder("--base-dir", args.base_dir)
    if args.part_files < 1:
        raise UsageError(f"--part-files must be >= 1, got {args.part_files}")
    from ssps_jax import distributed
    from ssps_jax import extract as extract_lib

    files = extract_lib.read_file_list(args.csv or args.list or args.trials, trials=bool(args.trials))
    distributed.initialize()
    extract_lib.extract(args.workdir, files, args.out, args.base_dir, args.step, args.part_files)


def score(args: argparse.Namespace) -> None:
    _folder("WORKDIR", args.workdir)
    for path in args.audio:
        _file("AUDIO", path)
    from ssps_jax.inference import Threshold, Verifier, stored_threshold

    verifier = Verifier.from_workdir(args.workdir, args.step, normalise=not args.no_norm)
    scores = verifier.scores(*args.audio)
    for kind, value in scores.items():
        print(f"{kind:<8}{value:.6f}")
    # The decision is on the most normalised score the workdir evaluates with (the last of eval.score_norm).
    kind = list(scores)[-1]
    if args.threshold is not None:
        threshold = Threshold(args.threshold, kind, "--threshold")
    else:
        threshold = stored_threshold(args.workdir, kind, verifier.step)
    if threshold is None:
        print(
            f"no decision: no --threshold, and no evaluation in {args.workdir}/eval stored an EER threshold "
            f"(ssps-jax evaluate --workdir {args.workdir} stores one)"
        )
        return
    relation = ">=" if scores[kind] >= threshold.value else "<"
    print(
        f"{threshold.decide(scores[kind])}: {kind} {scores[kind]:.6f} {relation} threshold {threshold.value:.6f} "
        f"({threshold.source})"
    )


def import_sslsv(args: argparse.Namespace) -> None:
    _file("MODEL.pt", args.checkpoint)
    from ssps_jax import sslsv_checkpoint

    sslsv_checkpoint.import_sslsv(args.checkpoint, args.config, args.workdir)


def export(args: argparse.Namespace) -> None:
    _folder("--workdir", args.workdir)
    out = args.out
    if args.format == "sslsv":
        from ssps_jax import sslsv_checkpoint

        sslsv_checkpoint.export_sslsv(args.workdir, out, args.step)
        return
    if args.max_seconds is not None and args.max_seconds <= 0:
        raise UsageError(f"--max-seconds must be > 0, got {args.max_seconds}")
    from ssps_jax import export as export_lib
    from ssps_jax.inference import TrainedModel

    trained = TrainedModel.from_workdir(args.workdir, args.step)
    export_lib.export(trained, out, args.format, args.max_seconds)


def demo(args: argparse.Namespace) -> None:
    from ssps_jax import demo as demo_lib

    demo_lib.run(args.data, args.workdir, args.config, oracle=args.oracle)


def demo_methods(args: argparse.Namespace) -> None:
    from ssps_jax import demo_methods as demo_methods_lib

    names = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    demo_methods_lib.run(args.data, args.workdir, names)


def bench(args: argparse.Namespace) -> None:
    from ssps_jax import distributed
    from ssps_jax.bench import train as bench_train

    distributed.initialize()
    bench_train.main(
        args.config,
        steps=args.steps,
        warmup=args.warmup,
        batch=args.batch,
        dtype=args.dtype,
        kmeans_n=args.kmeans_n,
        kmeans_k=args.kmeans_k,
        json_path=args.json,
        baseline=args.baseline,
        bytes_by_op=args.bytes_by_op,
    )


def bench_input(args: argparse.Namespace) -> None:
    if args.against:
        _file("--against", args.against)
    from ssps_jax.bench import input as bench_input_lib

    bench_input_lib.main(args.config, args.workers, args.batches, args.json, args.against, paths=args.augment_on)


def bench_run(args: argparse.Namespace) -> None:
    if args.against:
        _file("--against", args.against)
    for flag in ("speakers", "videos", "utterances", "workers", "log_every"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.test_speakers < 2 or args.videos < 2:
        raise UsageError("--test-speakers and --videos must be >= 2 (trials pair speakers across videos)")
    if args.epochs < 2:
        raise UsageError(f"--epochs must be >= 2 (a queue-fill epoch, then the SSPS epoch), got {args.epochs}")
    from ssps_jax.bench import real_run

    spec = real_run.CorpusSpec(
        speakers=args.speakers, videos=args.videos, utterances=args.utterances, test_speakers=args.test_speakers
    )
    settings = real_run.RunSettings(
        epochs=args.epochs, batch=args.batch, dtype=args.dtype, workers=args.workers, log_every=args.log_every
    )
    real_run.main(args.config, args.out, spec, settings, args.augment_on, args.against, args.json)


def bench_prepare(args: argparse.Namespace) -> None:
    from ssps_jax.bench import prepare as bench_prepare_lib

    bench_prepare_lib.main(args.out, args.files, args.seconds, args.format, args.workers, args.storage, args.json)


def compile_for_tpu(args: argparse.Namespace) -> None:
    from ssps_jax import aot

    aot.main(
        args.config,
        args.topology,
        batch=args.batch,
        dtype=args.dtype,
        programs=tuple(p for p in args.programs.split(",") if p),
        dataset_size=args.dataset_size,
        eval_seconds=args.eval_seconds,
        json_path=args.json,
        bytes_by_op=args.bytes_by_op,
    )


def bench_ssps(args: argparse.Namespace) -> None:
    from ssps_jax.bench import ssps

    ssps.main(args)


def prepare_demo(args: argparse.Namespace) -> None:
    from data_pipelines.demo_corpus import corpus

    spec = corpus.DemoCorpusSpec(seed=args.seed).scaled(args.scale)
    overrides = {
        k: v
        for k, v in {
            "train_speakers": args.train_speakers,
            "test_speakers": args.test_speakers,
            "sessions": args.sessions,
            "utterances": args.utterances,
            "min_seconds": args.min_seconds,
            "max_seconds": args.max_seconds,
            "channels": args.channels,
            "session_drift": args.session_drift,
        }.items()
        if v is not None
    }
    spec = dataclasses.replace(spec, **overrides)
    start = time.time()
    print(
        f"writing the demo corpus to {args.out}: {spec.train_speakers} train + {spec.test_speakers} test speakers, "
        f"{spec.sessions} sessions x {spec.utterances} utterances each, seed {spec.seed}",
        flush=True,
    )
    corpus.write_demo_corpus(args.out, spec, workers=args.workers)
    print(f"done in {time.time() - start:.0f} s: {args.out}/{corpus.TRAIN_CSV}, {corpus.TEST_CSV}, {corpus.TRIALS}")


def make_csv(args: argparse.Namespace) -> None:
    _folder("ROOT", args.root)
    if args.base_dir:
        _folder("--base-dir", args.base_dir)
    for trials in args.exclude_trials or ():
        _file("--exclude-trials", trials)
    root = Path(args.root).resolve()
    base = Path(args.base_dir).resolve() if args.base_dir else root.parent
    files = sorted(root.glob(f"*/*/*.{args.ext}"))
    if not files:
        raise InputError(f"no <speaker>/<session>/*.{args.ext} file under {root}")
    if args.exclude_trials:
        # sslsv's VoxCeleb1 training set: the dev speakers, i.e. all but those the trial lists test on.
        from data_pipelines.manifests import trial_speakers

        test_speakers = set().union(*(trial_speakers(t) for t in args.exclude_trials))
        kept = [p for p in files if p.parent.parent.name not in test_speakers]
        excluded = {p.parent.parent.name for p in files} - {p.parent.parent.name for p in kept}
        print(
            f"excluded {len(excluded)} speakers and {len(files) - len(kept)} files: those under {root} of the "
            f"{len(test_speakers)} speakers of {', '.join(args.exclude_trials)}"
        )
        if not kept:
            raise InputError(f"every speaker under {root} is in the trial lists: nothing left to train on")
        files = kept
    try:
        rel = [f.relative_to(base).as_posix() for f in files]
    except ValueError:
        raise UsageError(f"{root} is not under the base folder {base}") from None
    with open(args.out, "w") as f:
        f.write("File,Speaker,Session\n")
        f.writelines(f"{r},{p.parent.parent.name},{p.parent.name}\n" for r, p in zip(rel, files))
    print(f"{len(files)} files of {len({p.parent.parent.name for p in files})} speakers -> {args.out}")


def prepare(args: argparse.Namespace) -> None:
    _file("--csv", args.csv)
    _folder("--base-dir", args.base_dir)
    if args.workers < 1:
        raise UsageError(f"--workers: must be >= 1, got {args.workers}")
    from data_pipelines import speaker_corpus

    data_dir = args.data_dir or speaker_corpus.default_data_dir(args.base_dir)
    builder = speaker_corpus.prepare(
        args.csv,
        args.base_dir,
        data_dir,
        name=args.name,
        min_seconds=args.min_seconds,
        skip_bad=args.skip_bad,
        storage=args.storage,
        workers=args.workers,
    )
    print(f"{builder.info.splits['train'].num_examples} utterances in {builder.data_path}")
