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
from ssps_jax import methods, models, optim
from ssps_jax.evaluation import verification
from ssps_jax.ssps import lifecycle

__all__ = ["ConfigError", "base_config", "ineffective_settings", "resolve_paths", "use_method", "validate"]


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = "simclr"
    for name, method in methods.REGISTRY.items():
        c[name] = method.default_config()
    c.model = models.default_config()
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
    c.optim = optim.default_config()
    c.ssps = lifecycle.default_config()
    c.eval = verification.default_config()
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


# SSPS schedules: the epochs of the method alone, then SSPS-Clustering (kmeans-repr, M = 1) to the end. Each is
# data (dotted keys) applied by `use_ssps`.
PAPER_SSPS = {  # the papers': 100 epochs of the method, then 20 with SSPS (K = Q' = 25,000)
    "train.epochs": 120,
    "ssps.start_epoch": 100,
    "ssps.kmeans_clusters": 25000,
    "ssps.pos_queue_size": 25000,
}
DEMO_SSPS = {  # the CPU demo's: 12 epochs of the method, then 6 with SSPS (K 180, Q' 1024)
    "train.epochs": 18,
    "train.log_every_steps": 8,
    "train.checkpoint_every_steps": 1000,
    "optim.schedule": "step",
    "eval.every_epochs": 2,
    "ssps.start_epoch": 12,
    "ssps.kmeans_clusters": 180,
    "ssps.pos_queue_size": 1024,
}


def use_ssps(config: ml_collections.ConfigDict, schedule: dict) -> ml_collections.ConfigDict:
    """SSPS-Clustering (kmeans-repr, M = 1) on `schedule` (PAPER_SSPS, DEMO_SSPS: dotted keys and values)."""
    preset = {"ssps.enabled": True, "ssps.sampling": "kmeans-repr", "ssps.inter_sampling_size": 1, **schedule}
    config.update_from_flattened_dict(preset)
    return config


def use_paper_ssps(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return use_ssps(config, PAPER_SSPS)


def use_demo_ssps(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return use_ssps(config, DEMO_SSPS)


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
    models.validate(config.model, _fail)
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
    optim.validate(config.optim, _fail)

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

    lifecycle.validate(config, method, _fail)

    for i, (trials, path) in enumerate(zip(config.eval.trials, resolved.eval.trials)):
        if data_on_disk and not epath.Path(path).is_file():
            _fail(f"eval.trials[{i}]", _not_found("file", trials, path))
    verification.validate(config.eval, _fail)


def validate_scoring(e: ml_collections.ConfigDict) -> None:
    """The score normalisation and confidence-interval keys of `config.eval` (also run by `ssps-jax evaluate`)."""
    verification.validate_scoring(e, _fail)


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
