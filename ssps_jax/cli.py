"""The `ssps-jax` command.

ssps-jax train           train (or resume) a run: --config FILE --workdir DIR [--config.KEY=VALUE ...]
ssps-jax evaluate        a checkpoint of a run on trial lists
ssps-jax plot            a run's training curves and last DET curves, as PNG
ssps-jax extract         embeddings of a list of recordings into one .npz (resumable)
ssps-jax score           the score of two recordings with a trained model
ssps-jax import-sslsv    a workdir from an sslsv (PyTorch) checkpoint
ssps-jax export          a trained model as ONNX, StableHLO or an sslsv checkpoint
ssps-jax demo            the CPU demo: SimCLR, then with and without SSPS, compared on the demo corpus
ssps-jax demo-methods    every method's demo (with and without SSPS) in one table with wall times
ssps-jax bench           the SSPS train step: compile, step time, SSPS share, k-means, memory, MFU
ssps-jax bench-input     examples/s of the grain input pipeline per number of workers
ssps-jax bench-prepare   files/s of `prepare` on a generated corpus, extrapolated to VoxCeleb2
ssps-jax bench-ssps      time k-means and SSPS sampling at a given size
ssps-jax bench-run       a real training run on a VoxCeleb-shaped synthetic corpus, per augmentation path
ssps-jax compile         compile every program of a run for a TPU slice, on this host: memory, roofline, collectives
ssps-jax prepare-demo    write the embedded demo corpus (sslsv layout)
ssps-jax make-csv        list <ROOT>/<speaker>/<session>/<utt>.wav as a train CSV
ssps-jax prepare         build the TFDS ArrayRecords of a train CSV

`ssps-jax COMMAND --help` lists the flags of a command. Every flag is argparse's, spelt
with dashes; configs are ml_collections files with `--config.KEY=VALUE` overrides
(ssps_jax/config_overrides.py). The commands themselves are in ssps_jax/commands.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterable

from data_pipelines.errors import ConfigError, InputError
from ssps_jax import commands, config_overrides
from ssps_jax.config_overrides import UsageError

# One line per section of base_config() in `train --help`; the list itself comes from base_config(),
# so a section missing here is still listed (with its keys). Each method's section is described by
# its Method.summary (ssps_jax/methods/).
_SECTIONS = {
    "seed": "random seed of the run: initialisation, data order, crops, augmentation",
    "method": "the method trained; its settings are the section of the same name",
    "model": "encoder (ecapa_tdnn or resnet34) and its sizes, log-mel features, compute dtype",
    "data": "train CSV and base folder, crops, augmentation, input workers",
    "train": "epochs, global batch size, logging and checkpoint intervals",
    "optim": "optimizer, learning-rate schedule, weight decay, gradient clipping",
    "ssps": "SSPS: on/off, start epoch, sampling variant, k-means and queue sizes",
    "eval": "trial lists, evaluation interval, embedding batch, S-Norm/AS-Norm cohort, confidence intervals",
}
_OVERRIDES = "--config.KEY=VALUE"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be made when help is printed (train's imports the library)."""

    def __init__(self, *args, epilog_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epilog_fn = epilog_fn

    def format_help(self) -> str:
        if self.epilog_fn:
            self.epilog = self.epilog_fn()
        return super().format_help()


def _config_sections() -> str:
    """train's epilog: the top-level keys of base_config(), one line each."""
    import ml_collections

    from ssps_jax import methods
    from ssps_jax.config import base_config  # imports JAX: only for this help

    config = base_config()
    sections = {**_SECTIONS, **{name: m.summary for name, m in methods.REGISTRY.items()}}
    order = ["seed", "method", *methods.REGISTRY, *_SECTIONS]
    names = sorted(config.keys(), key=lambda k: (order.index(k) if k in order else len(order), k))
    width = max(map(len, names))
    lines = []
    for name in names:
        value = config[name]
        if isinstance(value, ml_collections.ConfigDict):
            keys = list(value.keys())
            what = sections.get(name) or "keys: " + ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
        else:
            what = f"{sections.get(name, '')} (default {value!r})".lstrip()
        lines.append(f"  {name:<{width}}  {what}")
    return "\n".join(
        [
            "config sections (their keys and defaults: ssps_jax/config.py):",
            *lines,
            "",
            "example:",
            "  ssps-jax train --config configs/demo_ssps.py --workdir workdirs/x \\",
            "      --config.train.epochs=5 --config.ssps.enabled=false --config.model.dtype=bfloat16",
        ]
    )


def _with_config(p: argparse.ArgumentParser, default: str | None, what: str) -> None:
    """--config FILE and any number of --config.KEY=VALUE (main reads those from what argparse leaves).

    Called after the command's other flags: the usage line it writes lists them.
    """
    if default is None:
        p.add_argument("--config", required=True, metavar="FILE", help=what)
    else:
        p.add_argument("--config", default=default, metavar="FILE", help=f"{what} (default: %(default)s)")
    sections = "listed below" if p.epilog_fn else "listed by `ssps-jax train --help`"
    p.add_argument_group(
        "config overrides",
        f"{_OVERRIDES} (or {_OVERRIDES.replace('=', ' ')}), any number: set a key of the config,\n"
        f"e.g. --config.train.epochs=5; the sections are {sections}",
    )
    usage = p.format_usage().removeprefix("usage: ").rstrip()
    p.usage = f"{usage} [{_OVERRIDES} ...]"


class _Registered:
    """argparse choices read from a registry when first asked (a help text, or the flag given): the registries
    import JAX, which `--help` of the other commands and usage errors should not wait for."""

    def __init__(self, names: Callable[[], Iterable[str]]):
        self._names = names

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()


def _label_free_samplers() -> tuple[str, ...]:
    from ssps_jax.ssps import sampling

    return sampling.label_free()


def _comma_ints(text: str) -> list[int]:
    try:
        return [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _augment_paths(text: str) -> list[str]:
    paths = text.split(",")
    if bad := [p for p in paths if p not in ("host", "device")]:
        raise argparse.ArgumentTypeError(f"expected host and/or device, comma-separated, got {bad[0]!r}")
    return paths


def _augment_on(p: argparse.ArgumentParser, default: str, what: str) -> None:
    p.add_argument(
        "--augment-on",
        type=_augment_paths,
        default=default,
        metavar="WHERE,...",
        help=f"{what}: data.augment.on's values, host and/or device (default: %(default)s)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ssps-jax",
        description="Self-supervised speaker verification with SSPS, in JAX/Flax.",
        epilog="`ssps-jax COMMAND --help` lists the flags of a command.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", help="INFO logs of every library too (orbax, grain, TFDS, JAX)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn, help: str, **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kwargs,
        )
        p.set_defaults(fn=fn, command_parser=p)
        return p

    _add_runs(command)
    _add_model_use(command)
    _add_benchmarks(command)
    _add_compile(command)
    _add_data(command)
    return parser


def _add_runs(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("train", commands.train, "train (or resume) a run", epilog_fn=_config_sections)
    p.add_argument(
        "--workdir",
        required=True,
        metavar="DIR",
        help="run folder: checkpoints, logs, evaluations; resumed if it has a checkpoint",
    )
    _with_config(p, None, "experiment config file: configs/*.py, whose get_config() returns a ConfigDict")

    p = command("evaluate", commands.evaluate, "evaluate a checkpoint of a training workdir on trial lists")
    p.add_argument("--workdir", required=True, metavar="DIR", help="a training workdir")
    p.add_argument(
        "--trials",
        action="extend",
        nargs="+",
        metavar="FILE",
        help="trial lists, relative to data.base_dir unless they exist as given (default: the config's eval.trials)",
    )
    p.add_argument("--base-dir", metavar="DIR", help="folder the trial paths are relative to (default: the config's)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest readable one)")

    p = command(
        "plot",
        commands.plot,
        "training curves (metrics.jsonl) and the DET curves of the last evaluation of a workdir, as PNG in "
        "WORKDIR/plots/",
    )
    p.add_argument("workdir", metavar="WORKDIR", help="a training workdir (any run, finished or not)")

    p = command("demo", commands.demo, "the CPU demo: SimCLR, then continued with and without SSPS, compared")
    p.add_argument(
        "--oracle",
        action="store_true",
        help="also continue with oracle positives (same speaker, other session: the headroom of any sampling)",
    )
    p.add_argument(
        "--data",
        default="demo_data",
        metavar="DIR",
        help="demo corpus, written first if missing (default: %(default)s)",
    )
    p.add_argument(
        "--workdir",
        default="workdirs/demo_simclr",
        metavar="DIR",
        help="folder of the demo's runs (default: %(default)s)",
    )
    _with_config(p, "configs/demo_ssps.py", "config file, with SSPS enabled")

    p = command(
        "demo-methods", commands.demo_methods, "every method's demo, without and with SSPS, in one table (wall times)"
    )
    p.add_argument("--data", default="demo_data", metavar="DIR", help="demo corpus (default: %(default)s)")
    p.add_argument(
        "--workdir", default="workdirs/demo_methods", metavar="DIR", help="one folder per method (default: %(default)s)"
    )
    p.add_argument(
        "--methods",
        metavar="NAME,NAME,...",
        help="comma-separated method names, run in this order (default: every registered method with a demo config)",
    )


def _add_model_use(command: Callable[..., argparse.ArgumentParser]) -> None:
    """The commands that take a trained model out of its workdir (docs/usage.md: "Using a trained model")."""
    step = dict(type=int, help="checkpoint step (default: the newest readable one)")
    p = command("extract", commands.extract, "L2-normalised embeddings of a list of recordings, into one .npz")
    p.add_argument("--workdir", required=True, metavar="DIR", help="a training (or imported) workdir")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", metavar="FILE", help="a train/test CSV: its File column")
    source.add_argument("--list", metavar="FILE", help="a text file, one recording per line")
    source.add_argument("--trials", metavar="FILE", help="a VoxCeleb-format trial list: its enrol and test files")
    p.add_argument("--out", required=True, metavar="FILE", help=".npz with embeddings (N, D), ids (N,), step")
    p.add_argument(
        "--base-dir", metavar="DIR", help="folder relative paths are under (default: the config's eval folder)"
    )
    p.add_argument("--step", **step)
    p.add_argument(
        "--part-files",
        type=int,
        default=10000,
        metavar="N",
        help="files per resumable part (<out>.parts/; default: %(default)s)",
    )

    p = command(
        "score",
        commands.score,
        "score two recordings with a trained model: cosine (and S/AS-Norm), and same / different speaker",
    )
    p.add_argument("workdir", metavar="WORKDIR", help="a training (or imported) workdir")
    p.add_argument("audio", nargs=2, metavar="AUDIO", help="two recordings (any format prepare reads)")
    p.add_argument("--step", **step)
    p.add_argument("--no-norm", action="store_true", help="cosine only, even when eval.score_norm is set")
    p.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="say same / different speaker against T, on the last score printed (default: the EER threshold the "
        "workdir's evaluation of that checkpoint, or else its newest one, stored for that score)",
    )

    p = command("import-sslsv", commands.import_sslsv, "make a workdir from an sslsv (PyTorch) checkpoint")
    p.add_argument("checkpoint", metavar="MODEL.pt", help="sslsv's model_*.pt ({'model': state_dict, ...})")
    p.add_argument("--workdir", required=True, metavar="DIR", help="new workdir (must hold no checkpoint)")
    _with_config(p, None, "the config the sslsv model corresponds to: configs/*.py")

    p = command("export", commands.export, "write a trained model as ONNX, StableHLO or an sslsv checkpoint")
    p.add_argument("--workdir", required=True, metavar="DIR", help="a training (or imported) workdir")
    p.add_argument("--format", required=True, choices=("onnx", "stablehlo", "sslsv"), help="what to write")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    p.add_argument("--step", **step)
    p.add_argument(
        "--max-seconds",
        type=float,
        help="the exported program's fixed input length, in seconds (callers pad and pass lengths); "
        "default: 20 for onnx, any length for stablehlo",
    )


def _add_benchmarks(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command(
        "bench", commands.bench, "time the SSPS train step: compile, step time, SSPS share, k-means, memory, MFU"
    )
    p.add_argument("--steps", type=int, default=20, help="timed train steps, median (default: %(default)s)")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first, the first call among them (default: %(default)s)"
    )
    p.add_argument("--batch", type=int, help="global batch (default: the config's train.global_batch_size)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the config's model.dtype)")
    p.add_argument(
        "--kmeans-n", type=int, metavar="N", help="reference queue rows (default: paper scale or the largest that fits)"
    )
    p.add_argument("--kmeans-k", type=int, metavar="K", help="k-means clusters (default: the config's; 5000 on CPU)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    p.add_argument("--baseline", choices=("torch",), help="also run the PyTorch reference step and print the ratios")
    p.add_argument(
        "--bytes-by-op",
        type=int,
        default=0,
        metavar="N",
        help="also print where the SSPS step's bytes accessed go on this backend: by part of the model and "
        "pass, and the N ops that move the most (docs/performance.md)",
    )
    _with_config(p, "configs/simclr_ssps_ecapa.py", "config file; its model, batch, crops and ssps sizes are timed")

    p = command("bench-input", commands.bench_input, "examples/s of the grain input pipeline per number of workers")
    p.add_argument(
        "--workers",
        type=_comma_ints,
        default="0,1,2",
        metavar="N,N,...",
        help="grain worker process counts to measure (default: %(default)s)",
    )
    p.add_argument("--batches", type=int, default=20, help="timed batches per worker count (default: %(default)s)")
    _augment_on(p, "host,device", "augmentation paths to measure")
    p.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    p.add_argument(
        "--against", metavar="FILE", help="JSON of `ssps-jax bench`: say whether the input keeps up with its samples/s"
    )
    _with_config(p, "configs/demo_ssps.py", "config file: its data section and batch are read")

    p = command(
        "bench-run",
        commands.bench_run,
        "a real `ssps-jax train` run on a VoxCeleb-shaped synthetic corpus, per augmentation path: end-to-end "
        "samples/s against the devices' step, input wait, k-means, evaluation and checkpoint seconds",
    )
    p.add_argument("out", help="folder for the corpus (kept, reused), the prepared split and one workdir per path")
    for name, default, what in (
        ("speakers", 320, "train speakers"),
        ("videos", 4, "videos (sessions) per speaker"),
        ("utterances", 8, "utterances per video, 4-20 s, 7.8 s on average (VoxCeleb2's)"),
        ("test-speakers", 40, "speakers of the trial list"),
        ("epochs", 10, "epochs; SSPS starts in the last (its queues fill in the one before)"),
        ("workers", 8, "grain worker processes (data.workers)"),
        ("log-every", 10, "steps per logging window (train.log_every_steps)"),
    ):
        p.add_argument(f"--{name}", type=int, default=default, help=f"{what} (default: %(default)s)")
    p.add_argument("--batch", type=int, help="global batch (default: the config's train.global_batch_size)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="compute dtype (default: %(default)s)"
    )
    _augment_on(p, "device,host", "augmentation paths to train, in this order")
    p.add_argument("--against", metavar="FILE", help="JSON of `ssps-jax bench`: e2e samples/s against its step's")
    p.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    _with_config(p, "configs/simclr_ssps_ecapa.py", "config file: its method, model and batch are trained")

    p = command(
        "bench-prepare", commands.bench_prepare, "files/s of `prepare` on a generated corpus, per process count"
    )
    p.add_argument("out", help="folder for the generated corpus (kept, reused) and the prepared datasets")
    p.add_argument("--files", type=int, default=20_000, help="files to generate (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=1.0, help="mean duration of a file (default: %(default)s)")
    p.add_argument("--format", choices=("m4a", "wav"), default="m4a", help="file format (default: %(default)s)")
    p.add_argument(
        "--workers", type=_comma_ints, default="1,2", metavar="N,N,...", help="process counts (default: %(default)s)"
    )
    p.add_argument(
        "--storage",
        choices=("int16", "flac"),
        default="int16",
        help="how the records hold audio, as `prepare --storage` (default: %(default)s)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")

    p = command(
        "bench-ssps", commands.bench_ssps, "time one k-means run and SSPS sampling per step on the devices present"
    )
    # Defaults: docs/method.md §11's CPU comparison point with sslsv (N 100k, K 5k, B 256, Q' 25k).
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
    p.add_argument(
        "--sampling",
        choices=_Registered(_label_free_samplers),
        help="the sampler timed: an ssps.sampling that needs no labels (default: config.ssps.sampling's default)",
    )
    p.add_argument(
        "--queue-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="dtype of the queues, as config.ssps.queue_dtype (default: %(default)s)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed k-means runs, median (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed sampling steps, median (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")


def _add_compile(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command(
        "compile",
        commands.compile_for_tpu,
        "compile a run's programs for a TPU slice on this host (no TPU needed): per-device memory against HBM, "
        "FLOPs, roofline step time, collectives",
    )
    p.add_argument("--topology", required=True, help="TPU slice, e.g. v5e:4x4, v4:2x2x2, v5p:4x4x4, v6e:16x16")
    p.add_argument("--batch", type=int, help="global batch (default: the config's train.global_batch_size)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the config's model.dtype)")
    p.add_argument(
        "--programs",
        default="plain,ssps,cluster,embed",
        help="which of plain, ssps, cluster, embed (every evaluation bucket) to compile (default: %(default)s)",
    )
    p.add_argument(
        "--dataset-size", type=int, metavar="N", help="train utterances (default: the config's data.train_size)"
    )
    p.add_argument(
        "--eval-seconds",
        type=float,
        default=20.0,
        metavar="S",
        help="longest test utterance: the embedding buckets compiled go up to it (default: %(default)s)",
    )
    p.add_argument(
        "--bytes-by-op",
        type=int,
        default=0,
        metavar="N",
        help="also print where each program's bytes accessed go: by part of the model and pass, and the N ops "
        "that move the most (docs/performance.md)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    _with_config(p, None, "experiment config file: configs/*.py")


def _add_data(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("prepare-demo", commands.prepare_demo, "write the embedded multi-session demo corpus")
    p.add_argument("out", help="output folder (the corpus base folder)")
    p.add_argument(
        "--seed", type=int, default=0, help="the corpus's seed: the same seed writes the same files (default: 0)"
    )
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
    p.add_argument("--channels", default=None, help="default | mild (gentler recording conditions; a regime probe)")
    p.add_argument(
        "--session-drift", type=float, default=None, help="how far a voice moves between sessions (default 1.0)"
    )

    p = command("make-csv", commands.make_csv, "write File,Speaker,Session for a <speaker>/<session>/<utt> tree")
    p.add_argument("root", help="e.g. data/voxceleb2")
    p.add_argument("--out", required=True, metavar="FILE", help="the CSV to write")
    p.add_argument("--base-dir", metavar="DIR", help="paths are written relative to it (default: the parent of ROOT)")
    p.add_argument("--ext", default="wav", help="extension of the audio files listed, e.g. m4a (default: %(default)s)")
    p.add_argument(
        "--exclude-trials",
        action="extend",
        nargs="+",
        metavar="LIST",
        help="leave out the speakers of these VoxCeleb trial lists (repeatable), e.g. to train on VoxCeleb1 dev",
    )

    p = command("prepare", commands.prepare, "build the TFDS ArrayRecord dataset of a train CSV")
    p.add_argument("--csv", required=True, metavar="FILE", help="File,Speaker[,Session] CSV")
    p.add_argument("--base-dir", required=True, metavar="DIR", help="folder the CSV paths are relative to")
    p.add_argument("--data-dir", metavar="DIR", help="TFDS data dir (default: BASE_DIR/tfds)")
    p.add_argument("--name", help="dataset config name (default: the CSV file name)")
    p.add_argument("--min-seconds", type=float, default=0.5, help="shorter files are bad input")
    p.add_argument("--skip-bad", action="store_true", help="prepare the good files, list the bad ones")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes decoding the files (default: all cores, %(default)s)",
    )
    p.add_argument(
        "--storage",
        choices=("int16", "flac"),
        default="int16",
        help="records hold int16 PCM, or lossless FLAC (smaller, decoded when read) (default: %(default)s)",
    )


def _overrides(command: argparse.ArgumentParser, extras: list[str], takes_config: bool) -> list[tuple[str, str]]:
    """(key, value) of each --config.KEY=VALUE or --config.KEY VALUE in what argparse did not recognise."""
    overrides, rest = [], list(extras)
    while rest:
        arg = rest.pop(0)
        if not (takes_config and arg.startswith("--config.")):
            command.error(f"unrecognized arguments: {' '.join([arg, *rest])}")
        key, eq, value = arg.removeprefix("--config.").partition("=")
        if not eq:
            if not rest or rest[0].startswith("--"):
                command.error(f"argument {arg}: expected one argument")
            value = rest.pop(0)
        overrides.append((key, value))
    return overrides


def _setup_logging(verbose: bool) -> None:
    """Warnings only unless --verbose: orbax, grain and TFDS are chatty at INFO (through absl's logger,
    which propagates to the root one)."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)


def _lost_run_errors() -> tuple[type[Exception], ...]:
    """Errors that end a run with one line: a full disk, and ssps_jax.train.NonFiniteLossError if train was imported."""
    from ssps_jax.storage import StorageFullError

    train = sys.modules.get("ssps_jax.train")
    return (StorageFullError, *((train.NonFiniteLossError,) if train else ()))


def _preempted() -> tuple[type[Exception], ...]:
    """ssps_jax.preemption.Preempted if training was imported (the exit status says "run it again")."""
    preemption = sys.modules.get("ssps_jax.preemption")
    return (preemption.Preempted,) if preemption else ()


def main(argv: list[str] | None = None) -> None:
    args, extras = _parser().parse_known_args(argv)
    command = args.command_parser
    try:
        overrides = _overrides(command, extras, takes_config="config" in args)
        _setup_logging(args.verbose)
        if "config" in args:
            args.config = config_overrides.load(args.config, overrides)
        args.fn(args)
    except (UsageError, ConfigError) as e:  # a mistake on the command line or in the config: one line
        print(f"{command.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except InputError as e:  # bad input data: a clear message, not a traceback
        raise SystemExit(f"error: {e}") from e
    except _lost_run_errors() as e:
        raise SystemExit(f"error: {e}") from e
    except _preempted() as e:  # stopped for a preemption, its step saved: the run printed its line
        raise SystemExit(e.status) from None


if __name__ == "__main__":
    main()
