"""Experiment configuration: the defaults every config file starts from, and validation.

Config files in configs/ call `base_config()` and change what their
experiment changes. `validate()` runs before anything is built or compiled
and names the offending key (`config.model.channels: ...`).

Defaults are sslsv's (docs/method.md §8): Adam, lr 1e-3 x 0.95 every 5 epochs,
global batch 256, no weight decay, 2 s crops, SimCLR temperature 0.03
without projector (the SSPS paper's SimCLR config). Every registered method
has its own section (`config.simclr`, `config.dino`, ...), with its defaults
from its module; `config.method` picks the one trained. SSPS is off unless
`ssps.enabled`; its defaults are the paper's main setting (docs/method.md §5).

Relative paths in the data and eval sections (data.train_csv, data.tfds_dir,
the MUSAN / RIR folders, eval.trials, eval.base_dir) are relative to
data.base_dir, unless they exist as given (relative to the working
directory); data.base_dir itself is relative to the working directory. So
`--config.data.base_dir=/mnt/shared/data` moves a whole VoxCeleb layout (and
`--config.data.base_dir=DIR` a demo corpus), while configs whose paths already
include their base folder keep working. `resolve_paths` is that rule, applied once where the config is used
(validate, train, evaluate, bench-input).
"""

from __future__ import annotations

import copy

import ml_collections
from etils import epath

from data_pipelines import input_pipeline
from data_pipelines.errors import ConfigError, InputError
from ssps_jax import methods
from ssps_jax.evaluation.verification import NORMALISATIONS, score_norms
from ssps_jax.ssps.sampling import METHODS as SSPS_METHODS

__all__ = ["ConfigError", "base_config", "ineffective_settings", "resolve_paths", "use_method", "validate"]

ENCODERS = ("ecapa_tdnn", "resnet34")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("step", "cosine", "warmup_cosine", "constant")
DTYPES = ("float32", "bfloat16")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = "simclr"
    for name, method in methods.REGISTRY.items():
        c[name] = method.default_config()
    c.model = {
        "encoder": "ecapa_tdnn",
        "encoder_dim": 512,
        "dtype": "float32",  # compute dtype; parameters stay float32
        "mel": {"n_mels": 40, "window": "hamming", "n_fft": 512, "win_length": 400, "hop_length": 160},
        "ecapa_tdnn": {
            "channels": (512, 512, 512, 512, 1536),
            "kernel_sizes": (5, 3, 3, 3, 1),
            "dilations": (1, 2, 3, 4, 1),
            "attention_channels": 128,
            "res2net_scale": 8,
            "se_channels": 128,
            "global_context": True,
        },
        "resnet34": {"base_dim": 16, "layers": (3, 4, 6, 3)},
    }
    c.data = input_pipeline.default_config()
    c.train = {
        "epochs": 100,  # the length schedules are laid out for
        "stop_at_epoch": 0,  # stop (and evaluate) after this epoch; 0: train.epochs (sslsv's stop_at_epoch)
        "global_batch_size": 256,
        "log_every_steps": 50,
        "checkpoint_every_steps": 1000,  # and at every epoch end
        "keep_checkpoints": 3,
        "async_checkpoints": True,
        # Warn (once) when the loop waits for input more than this share of a logging window (0: never).
        "input_wait_warning": 0.1,
    }
    c.optim = {
        "optimizer": "adam",
        "learning_rate": 1e-3,
        "schedule": "step",  # sslsv's default: x decay_rate every decay_every_epochs
        "decay_rate": 0.95,
        "decay_every_epochs": 5,
        "min_learning_rate": 1e-5,  # cosine schedules
        # From this epoch on, the schedule as if it had started from learning_rate x lr_scale (0: never):
        # e.g. a gentler rate once SSPS starts (docs/demo_findings.md). The fair baseline needs the same.
        "lr_scale_from_epoch": 0,
        "lr_scale": 1.0,
        "warmup_epochs": 10,  # warmup_cosine
        "weight_decay": 0.0,  # L2 added to the gradient, like torch's Adam/SGD weight_decay
        "momentum": 0.9,  # sgd
        "clip_grad_norm": 0.0,  # 0: off
        "clip_grad_per_param": 0.0,  # DINO: each tensor's gradient norm <= this; 0: off
        "decay_biases_and_norms": True,  # False: weight decay on weights (ndim > 1) only
    }
    c.ssps = {
        "enabled": False,
        "start_epoch": 100,  # queues fill from start_epoch - 1, clustering and sampling from start_epoch
        # kmeans-repr (SSPS-Clustering) | kmeans (centroid) | knn (SSPS-NN) | oracle: a diagnostic, not a
        # method -- the anchor's own speaker from another session, by the index file's labels (the headroom)
        "sampling": "kmeans-repr",
        # oracle only: the share of anchors given a right positive; the others get a row of another speaker,
        # uniformly (what the pseudo-labelling's mistakes cost: docs/demo_findings.md)
        "oracle_purity": 1.0,
        "pos_queue_size": 25000,  # Q' capacity, rounded down to a multiple of the global batch
        "kmeans_clusters": 25000,  # K
        "kmeans_iterations": 10,
        "inter_sampling_size": 1,  # M: neighbour clusters to draw from (0: the anchor's own cluster)
        "inter_sampling_prob": "uniform",  # or "exp": lambda exp(-lambda rank)
        "inter_sampling_lambda": 0.7,
        "intra_sampling_size": 1,  # knn: draw among the top-M queue rows
        "intra_sampling_prob": "uniform",  # or "exp" (knn only)
        "intra_sampling_lambda": 0.7,
        "queue_dtype": "float32",  # or "bfloat16": half the queue memory
        "kmeans_chunk_elements": 1 << 26,  # bounds the E-step's rows x K similarity block
    }
    c.eval = {
        "trials": (),  # VoxCeleb-format trial lists; names are their file names
        "base_dir": "",  # their paths are relative to it; "" means data.base_dir
        "every_epochs": 1,  # 0: only when asked (ssps-jax evaluate)
        "at_start": False,  # also evaluate the untrained encoder
        "batch_size": 32,  # utterances per embedding batch, rounded up to the device count
        "bucket_ratio": 1.25,  # padded lengths grow geometrically by this factor
        "min_bucket_seconds": 2.0,
        # Score normalisation reported beside the raw cosine (ssps_jax/evaluation/verification.py):
        # "" (none), "s-norm", "as-norm" or both, comma-separated ("s-norm,as-norm").
        "score_norm": "",
        # The cohort: this many data.train_csv utterances drawn with eval.seed (all of them if fewer).
        # sslsv uses every train utterance: for VoxCeleb2, 1.09 M crops (1,200 h of audio) to embed at each
        # evaluation and 4.5 GB of float64 embeddings at D = 512; 20,000 cover ~96% of its 5,994 speakers.
        "cohort_size": 20000,
        "cohort_seconds": 4.0,  # one crop per cohort utterance at a random start (sslsv's frame_length 64000); 0: whole
        "cohort_top_k": 300,  # AS-Norm: highest cohort scores per utterance (sslsv's score_norm_cohort_size)
        "bootstrap": 1000,  # resamples of the trials for the confidence intervals of EER and minDCF
        "confidence": 0.95,  # their level
        "seed": 0,  # cohort draw, crops and bootstrap: not the training seed, so runs compare on one cohort
    }
    return c


def use_voxceleb(config: ml_collections.ConfigDict, data_dir: str = "data") -> ml_collections.ConfigDict:
    """Train on VoxCeleb2, evaluate on VoxCeleb1-O, in the layout of docs/data.md "VoxCeleb from a manual download".

    The CSV and trial list are named relative to data.base_dir (`resolve_paths`), so overriding
    `--config.data.base_dir` moves them with it.
    """
    config.data.train_csv = "voxceleb2_train.csv"
    config.data.base_dir = data_dir
    config.data.train_size = 1_092_009  # VoxCeleb2 dev utterances
    config.data.workers = 8
    config.train.epochs = 100
    config.train.global_batch_size = 256
    config.eval.trials = ("voxceleb1_test_O",)
    config.eval.every_epochs = 5
    config.eval.batch_size = 64
    config.eval.score_norm = "as-norm"
    return config


def paper_ecapa_tdnn(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The papers' encoder: ECAPA-TDNN C=1024 (22.5 M parameters) on 40 Hamming log-mels (sslsv defaults)."""
    config.model.encoder = "ecapa_tdnn"
    config.model.ecapa_tdnn.channels = (1024, 1024, 1024, 1024, 3072)
    config.model.mel.n_mels = 40
    config.model.mel.window = "hamming"
    return config


def use_method(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Trains method `name` with what it needs outside its section, as sslsv trains it (its `Method.preset`)."""
    config.method = name
    methods.get(name).preset(config)
    return config


def use_paper_ssps(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The papers' SSPS schedule: 100 epochs of the method, then 20 with SSPS-Clustering (K = Q' = 25,000, M = 1)."""
    config.train.epochs = 120
    config.ssps.enabled = True
    config.ssps.start_epoch = 100
    config.ssps.sampling = "kmeans-repr"
    config.ssps.kmeans_clusters = 25000
    config.ssps.inter_sampling_size = 1
    config.ssps.pos_queue_size = 25000
    return config


def use_demo_ssps(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CPU demo's SSPS schedule: 12 epochs of the method, then 6 with SSPS (K 180, Q' 1024, M 1)."""
    config.train.epochs = 18
    config.train.log_every_steps = 8
    config.train.checkpoint_every_steps = 1000
    config.optim.schedule = "step"
    config.eval.every_epochs = 2
    config.ssps.enabled = True
    config.ssps.start_epoch = 12
    config.ssps.sampling = "kmeans-repr"
    config.ssps.kmeans_clusters = 180
    config.ssps.inter_sampling_size = 1
    config.ssps.pos_queue_size = 1024
    return config


def use_demo(config: ml_collections.ConfigDict, data_dir: str = "demo_data") -> ml_collections.ConfigDict:
    """The CPU demo's setting: ECAPA-TDNN C=128 on the embedded corpus (`ssps-jax prepare-demo`), batch 64.

    The CSV and trial list are named relative to data.base_dir (`resolve_paths`), as in `use_voxceleb`:
    `--config.data.base_dir=DIR` trains on a corpus that `ssps-jax prepare-demo DIR` wrote.
    """
    config.model.encoder = "ecapa_tdnn"
    config.model.encoder_dim = 128
    config.model.ecapa_tdnn.channels = (128, 128, 128, 128, 384)
    config.model.ecapa_tdnn.attention_channels = 64
    config.model.ecapa_tdnn.se_channels = 32
    config.data.train_csv = "demo_train.csv"
    config.data.base_dir = data_dir
    config.data.train_size = 1080  # the default corpus: 60 speakers x 3 sessions x 6 utterances
    config.data.workers = 1
    config.train.global_batch_size = 64
    config.eval.trials = ("demo_trials.txt",)
    config.eval.batch_size = 32
    config.eval.bucket_ratio = 1.5
    config.eval.min_bucket_seconds = 3.0
    return config


def _resolve(path: str | None, base_dir: str | None) -> str | None:
    if not path or not base_dir or epath.Path(path).is_absolute() or epath.Path(path).exists():
        return path
    return str(epath.Path(base_dir) / path)


def resolve_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose relative data / eval paths are resolved against data.base_dir.

    The one rule (module docstring): a relative path that exists as given is kept, any other is
    taken as relative to data.base_dir; "" (the base_dir default) and absolute paths are kept.
    Apply it once, to the config as written: a missing path resolved twice would be joined twice.
    """
    resolved = copy.deepcopy(config)
    d, e = resolved.data, resolved.eval
    base = d.base_dir
    d.train_csv = _resolve(d.train_csv, base)
    d.tfds_dir = _resolve(d.tfds_dir, base)
    d.augment.noise_dir = _resolve(d.augment.noise_dir, base)
    d.augment.rir_dir = _resolve(d.augment.rir_dir, base)
    e.base_dir = _resolve(e.base_dir, base)
    e.trials = tuple(_resolve(t, base) for t in e.trials)
    return resolved


def _not_found(what: str, given: str, resolved: str) -> str:
    """The error of a missing path: the path looked for, and where it came from when resolution changed it."""
    origin = f" ({given!r} relative to data.base_dir)" if resolved != given else ""
    return f"{what} not found: {resolved}{origin}"


def _fail(key: str, message: str):
    raise ConfigError(f"config.{key}: {message}")


def _check_choice(config, key, choices):
    value = config[key.split(".")[0]]
    for part in key.split(".")[1:]:
        value = value[part]
    if value not in choices:
        _fail(key, f"must be one of {choices}, got {value!r}")


def validate(config: ml_collections.ConfigDict, device_count: int | None = None, data_on_disk: bool = True) -> None:
    """Raises ConfigError naming the first invalid key; touches no accelerator.

    `data_on_disk=False` (ahead-of-time compilation on a host without the
    corpus) leaves out the checks that files and folders exist.
    """
    _check_choice(config, "method", tuple(methods.REGISTRY))
    method = methods.get(config.method)
    _check_choice(config, "model.encoder", ENCODERS)
    _check_choice(config, "model.dtype", DTYPES)
    _check_choice(config, "model.mel.window", ("hamming", "hann"))
    _check_choice(config, "optim.optimizer", OPTIMIZERS)
    _check_choice(config, "optim.schedule", SCHEDULES)

    m = config.model
    if m.mel.win_length > m.mel.n_fft:
        _fail("model.mel.win_length", f"{m.mel.win_length} exceeds n_fft {m.mel.n_fft}")
    for key in ("n_mels", "hop_length"):
        if m.mel[key] <= 0:
            _fail(f"model.mel.{key}", f"must be > 0, got {m.mel[key]}")
    if m.encoder == "ecapa_tdnn":
        e = m.ecapa_tdnn
        n = len(e.channels)
        if n < 3:
            _fail("model.ecapa_tdnn.channels", f"needs at least 3 entries, got {tuple(e.channels)}")
        for key in ("kernel_sizes", "dilations"):
            if len(e[key]) != n:
                _fail(f"model.ecapa_tdnn.{key}", f"needs {n} entries (one per channel entry), got {tuple(e[key])}")
        for i, c in enumerate(e.channels[1:-1], start=1):
            if c % e.res2net_scale:
                _fail(
                    "model.ecapa_tdnn.channels", f"entry {i} ({c}) is not divisible by res2net_scale {e.res2net_scale}"
                )
    else:
        r = m.resnet34
        if len(r.layers) != 4 or r.base_dim < 8:
            _fail("model.resnet34", f"needs 4 layer counts and base_dim >= 8, got {tuple(r.layers)}, {r.base_dim}")

    method.validate(config, _fail)
    t = config.train
    for key in ("epochs", "global_batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if t[key] < 1:
            _fail(f"train.{key}", f"must be >= 1, got {t[key]}")
    if not 0 <= t.input_wait_warning < 1:  # also NaN
        _fail("train.input_wait_warning", f"must be in [0, 1), got {t.input_wait_warning}")
    if not 0 <= t.stop_at_epoch <= t.epochs:
        _fail("train.stop_at_epoch", f"must be in [0, train.epochs = {t.epochs}], got {t.stop_at_epoch}")
    if device_count and t.global_batch_size % device_count:
        _fail("train.global_batch_size", f"{t.global_batch_size} is not divisible by the {device_count} devices")
    o = config.optim
    if o.learning_rate <= 0:
        _fail("optim.learning_rate", f"must be > 0, got {o.learning_rate}")
    if not o.lr_scale > 0:  # also NaN
        _fail("optim.lr_scale", f"must be > 0, got {o.lr_scale}")
    for key in (
        "weight_decay",
        "clip_grad_norm",
        "clip_grad_per_param",
        "min_learning_rate",
        "warmup_epochs",
        "lr_scale_from_epoch",
    ):
        if o[key] < 0:
            _fail(f"optim.{key}", f"must be >= 0, got {o[key]}")

    d = config.data
    for key in ("train_csv", "base_dir"):
        if not d[key]:
            _fail(f"data.{key}", "is required")
    resolved = resolve_paths(config)  # the paths train and evaluate use
    if data_on_disk and not epath.Path(d.base_dir).is_dir():
        _fail("data.base_dir", f"folder not found: {d.base_dir}")
    if data_on_disk and not epath.Path(resolved.data.train_csv).is_file():
        _fail("data.train_csv", _not_found("file", d.train_csv, resolved.data.train_csv))
    if d.train_size < 0 or 0 < d.train_size < t.global_batch_size:
        _fail("data.train_size", f"must be 0 (unknown) or at least one global batch, got {d.train_size}")
    _check_choice(config, "data.augment.on", input_pipeline.AUGMENT_ON)
    if d.crops.mode != method.crop_mode:
        _fail("data.crops.mode", f"{config.method} needs {method.crop_mode!r} crops, got {d.crops.mode!r}")
    try:  # builds the crop and augmentation settings, and lists the noise / RIR folders
        if data_on_disk:
            input_pipeline.make_examples(resolved.data)
        else:
            input_pipeline.batch_shapes(d, 1)
    except (InputError, TypeError) as e:
        _fail("data", str(e))

    _validate_ssps(config)

    for i, (trials, path) in enumerate(zip(config.eval.trials, resolved.eval.trials)):
        if data_on_disk and not epath.Path(path).is_file():
            _fail(f"eval.trials[{i}]", _not_found("file", trials, path))
    if config.eval.bucket_ratio <= 1:
        _fail("eval.bucket_ratio", f"must be > 1, got {config.eval.bucket_ratio}")
    if config.eval.batch_size < 1:
        _fail("eval.batch_size", f"must be >= 1, got {config.eval.batch_size}")
    validate_scoring(config.eval)


def validate_scoring(e: ml_collections.ConfigDict) -> None:
    """The score normalisation and confidence-interval keys of `config.eval` (also run by `ssps-jax evaluate`)."""
    norms = score_norms(e.score_norm)
    if unknown := [n for n in norms if n not in NORMALISATIONS]:
        _fail("eval.score_norm", f"unknown normalisation {unknown[0]!r}: use {', '.join(NORMALISATIONS)} or ''")
    if norms and e.cohort_size < 2:
        _fail("eval.cohort_size", f"must be >= 2 for {e.score_norm}, got {e.cohort_size}")
    if "as-norm" in norms and not 1 < e.cohort_top_k <= e.cohort_size:
        _fail(
            "eval.cohort_top_k", f"must be in [2, eval.cohort_size = {e.cohort_size}] for AS-Norm, got {e.cohort_top_k}"
        )
    if e.cohort_seconds < 0:
        _fail("eval.cohort_seconds", f"must be >= 0, got {e.cohort_seconds}")
    if e.bootstrap < 1:
        _fail("eval.bootstrap", f"must be >= 1, got {e.bootstrap}")
    if not 0 < e.confidence < 1:
        _fail("eval.confidence", f"must be in (0, 1), got {e.confidence}")


def _validate_ssps(config: ml_collections.ConfigDict) -> None:
    s = config.ssps
    if not s.enabled:
        return
    _check_choice(config, "ssps.sampling", SSPS_METHODS)
    _check_choice(config, "ssps.inter_sampling_prob", ("uniform", "exp"))
    _check_choice(config, "ssps.intra_sampling_prob", ("uniform", "exp"))
    _check_choice(config, "ssps.queue_dtype", DTYPES)
    if s.start_epoch < 1:
        _fail("ssps.start_epoch", f"must be >= 1 (queues fill during epoch start_epoch - 1), got {s.start_epoch}")
    if s.pos_queue_size < config.train.global_batch_size:
        _fail("ssps.pos_queue_size", f"{s.pos_queue_size} is smaller than one global batch")
    if config.data.crops.reference_seconds <= 0:
        _fail("data.crops.reference_seconds", "SSPS needs the clean reference crop (> 0 s)")
    if s.sampling in ("kmeans-repr", "kmeans"):
        if s.kmeans_clusters < 1 or s.kmeans_iterations < 0 or s.inter_sampling_size < 0:
            _fail("ssps", "kmeans_clusters >= 1, kmeans_iterations >= 0 and inter_sampling_size >= 0 are needed")
        if s.inter_sampling_size >= s.kmeans_clusters:
            _fail("ssps.inter_sampling_size", f"{s.inter_sampling_size} must be < kmeans_clusters {s.kmeans_clusters}")
        if s.intra_sampling_prob != "uniform":
            # sslsv ranks kmeans-repr candidates in queue order, which carries no meaning.
            _fail("ssps.intra_sampling_prob", "only 'uniform' is supported for the clustering variants")
    elif s.sampling == "knn" and s.intra_sampling_size < 1:
        _fail("ssps.intra_sampling_size", f"must be >= 1, got {s.intra_sampling_size}")
    if not 0 <= s.oracle_purity <= 1:  # also NaN
        _fail("ssps.oracle_purity", f"must be in [0, 1], got {s.oracle_purity}")
    if s.oracle_purity != 1 and s.sampling != "oracle":
        _fail("ssps.oracle_purity", f"only oracle sampling has a purity to set (ssps.sampling is {s.sampling!r})")


def ineffective_settings(config: ml_collections.ConfigDict) -> list[str]:
    """One line per setting of a valid `config` that cannot take effect in its run (train warns with them).

    What a schedule starts after the last epoch (SSPS, optim.lr_scale, the end of a warmup), evaluation
    settings without a trial list, and another method's section set away from its defaults. The schedules are
    checked against train.epochs, not train.stop_at_epoch: a run stopped early is meant to be continued.
    Keys that a switched-off feature or another variant would read (ssps.* with ssps.enabled False, the
    k-means keys under knn) are not reported: keeping them is how a config is switched.
    """
    lines = []
    epochs = config.train.epochs
    s, o, e = config.ssps, config.optim, config.eval
    if s.enabled and s.start_epoch >= epochs:
        lines.append(
            f"config.ssps.start_epoch: SSPS would sample from epoch {s.start_epoch + 1}, after the last epoch "
            f"(train.epochs = {epochs}): this run trains without it"
        )
    if o.lr_scale != 1 and not 0 < o.lr_scale_from_epoch < epochs:
        lines.append(
            f"config.optim.lr_scale: {o.lr_scale:g} never applies: optim.lr_scale_from_epoch is "
            f"{o.lr_scale_from_epoch} (0 means never; it must be below train.epochs = {epochs})"
        )
    if o.schedule == "warmup_cosine" and o.warmup_epochs >= epochs:
        lines.append(
            f"config.optim.warmup_epochs: {o.warmup_epochs:g} >= train.epochs = {epochs}: the learning rate "
            "never reaches optim.learning_rate"
        )
    if not e.trials:
        for key in ("at_start", "score_norm"):
            if e[key]:
                lines.append(f"config.eval.{key}: set, but eval.trials is empty: nothing is evaluated")
    default = base_config()
    for name in methods.REGISTRY:
        section, base = config[name], default[name]
        changed = [k for k in section if k in base and _differs(section[k], base[k])]
        if name != config.method and changed:
            lines.append(f"config.{name}.{changed[0]}: set, but config.method is {config.method!r}: not read")
    return lines


def _differs(a, b) -> bool:
    if isinstance(a, ml_collections.ConfigDict) or isinstance(b, ml_collections.ConfigDict):
        return a.to_dict() != b.to_dict()
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return tuple(a) != tuple(b)
    return a != b
