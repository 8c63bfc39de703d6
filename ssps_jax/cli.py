"""The `ssps-jax` command.

ssps-jax prepare-demo OUT     write the embedded demo corpus (sslsv layout)
ssps-jax make-csv ROOT        list <ROOT>/<speaker>/<session>/<utt>.wav as a train CSV
ssps-jax prepare              build the TFDS ArrayRecords of a train CSV
ssps-jax bench-ssps           time k-means and SSPS sampling at a given size
ssps-jax bench                the SSPS train step: compile, step time, SSPS share, k-means, memory, MFU
ssps-jax bench-input          examples/s of the grain input pipeline per number of workers
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

# Commands configured with absl flags (ml_collections config files and overrides).
_ABSL_COMMANDS = ("train", "evaluate", "demo", "bench", "bench-input")


def _prepare_demo(args: argparse.Namespace) -> None:
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


def _make_csv(args: argparse.Namespace) -> None:
    root = Path(args.root).resolve()
    base = Path(args.base_dir).resolve() if args.base_dir else root.parent
    files = sorted(root.glob(f"*/*/*.{args.ext}"))
    if not files:
        raise SystemExit(f"error: no <speaker>/<session>/*.{args.ext} file under {root}")
    try:
        rel = [f.relative_to(base).as_posix() for f in files]
    except ValueError:
        raise SystemExit(f"error: {root} is not under the base folder {base}") from None
    with open(args.out, "w") as f:
        f.write("File,Speaker,Session\n")
        f.writelines(f"{r},{p.parent.parent.name},{p.parent.name}\n" for r, p in zip(rel, files))
    print(f"{len(files)} files of {len({p.parent.parent.name for p in files})} speakers -> {args.out}")


def _prepare(args: argparse.Namespace) -> None:
    from data_pipelines import speaker_corpus

    data_dir = args.data_dir or os.path.join(args.base_dir, "tfds")
    builder = speaker_corpus.prepare(
        args.csv, args.base_dir, data_dir, name=args.name, min_seconds=args.min_seconds, skip_bad=args.skip_bad
    )
    print(f"{builder.info.splits['train'].num_examples} utterances in {builder.data_path}")


def _bench_ssps(args: argparse.Namespace) -> None:
    from ssps_jax.bench import ssps

    ssps.main(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssps-jax", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _ABSL_COMMANDS:  # listed for --help; parsed by absl
        sub.add_parser(name, help=f"see `ssps-jax {name} --help`", add_help=False)

    p = sub.add_parser("prepare-demo", help="write the embedded multi-session demo corpus")
    p.add_argument("out", help="output folder (the corpus base folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply the number of speakers (default 60 + 20)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="synthesis processes")
    for name, kind in (
        ("train-speakers", int),
        ("test-speakers", int),
        ("sessions", int),
        ("utterances", int),
        ("min-seconds", float),
        ("max-seconds", float),
    ):
        p.add_argument(f"--{name}", type=kind, default=None, help="override the (scaled) default")
    p.set_defaults(fn=_prepare_demo)

    p = sub.add_parser("make-csv", help="write File,Speaker,Session for a <speaker>/<session>/<utt> tree")
    p.add_argument("root", help="e.g. data/voxceleb2")
    p.add_argument("--out", required=True)
    p.add_argument("--base-dir", help="paths are written relative to it (default: the parent of ROOT)")
    p.add_argument("--ext", default="wav")
    p.set_defaults(fn=_make_csv)

    p = sub.add_parser("prepare", help="build the TFDS ArrayRecord dataset of a train CSV")
    p.add_argument("--csv", required=True, help="File,Speaker[,Session] CSV")
    p.add_argument("--base-dir", required=True, help="folder the CSV paths are relative to")
    p.add_argument("--data-dir", help="TFDS data dir (default: BASE_DIR/tfds)")
    p.add_argument("--name", help="dataset config name (default: the CSV file name)")
    p.add_argument("--min-seconds", type=float, default=0.5, help="shorter files are bad input")
    p.add_argument("--skip-bad", action="store_true", help="prepare the good files, list the bad ones")
    p.set_defaults(fn=_prepare)

    p = sub.add_parser("bench-ssps", help="time one k-means run and SSPS sampling per step on the devices present")
    # Defaults: SPEC section 11's CPU comparison point with sslsv (N 100k, K 5k, B 256, Q' 25k).
    for name, default, what in (
        ("n", 100_000, "dataset size = reference queue rows"),
        ("k", 5_000, "clusters"),
        ("dim", 512, "embedding dimension"),
        ("batch", 256, "global batch"),
        ("queue", 25_000, "positive queue Q'"),
        ("iterations", 10, "k-means iterations"),
        ("neighbours", 1, "M: neighbour clusters"),
    ):
        p.add_argument(f"--{name}", type=int, default=default, help=f"{what} (default {default})")
    p.add_argument("--sampling", default="kmeans-repr", choices=("kmeans-repr", "kmeans", "knn"))
    p.add_argument("--queue-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=3, help="timed k-means runs (median)")
    p.add_argument("--steps", type=int, default=20, help="timed sampling steps (median)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(fn=_bench_ssps)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _ABSL_COMMANDS:
        from ssps_jax import commands

        getattr(commands, f"{argv[0].replace('-', '_')}_main")([f"ssps-jax {argv[0]}", *argv[1:]])
        return
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)  # backend probing is noise here
    from data_pipelines.errors import InputError

    try:
        args.fn(args)
    except InputError as e:  # bad input: a clear message, not a traceback
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
