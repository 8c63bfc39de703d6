"""The training input pipeline: TFDS ArrayRecords -> grain -> per-process batches.

Order of operations, and why:

  source (N records)
  .shuffle()                 a new permutation every epoch, from the seed
  [: S * G]                  S = N // G steps per epoch: the epoch's remainder is
                             dropped, so every epoch has the same whole steps
                             (SSPS queue positions depend on the step in epoch)
  .random_map(examples)      crops + augmentation; grain seeds each record's
                             generator from (seed, position), so a record's
                             views do not depend on workers, hosts or resumes
  .batch(G / P)              sub-batches of consecutive records
  [p :: P]                   process p takes sub-batch p of every global batch:
                             global batch b is records [b G, (b+1) G) of the
                             epoch's permutation on any number of processes
  .repeat(num_epochs)        epoch e reads positions e S G ... (new shuffle)

Records stored as FLAC (`data.storage = "flac"`) are decoded to the same
int16 samples inside the map, in the grain workers.

Where the waveform arithmetic runs is `data.augment.on`:

  "host"    the map augments each view (data_pipelines/augment.py, NumPy / SciPy)
            and the batch holds float32 waveforms;
  "device"  the map only cuts the crops and draws the augmentation (the same
            draws from the same generator: `Augmenter.draw`), and the batch holds
            int16 crops, the drawn RIRs and noise excerpts (int16) and SNRs; the
            train step turns them into the same float32 waveforms on the
            accelerator (ssps_jax/device_augment.py), sharded with the batch.
            Fewer host cycles per example, and no float32 copies between processes.

G is the global batch, P the number of JAX processes. The iterator's state
(grain's own, `get_state`/`set_state`, checkpointable with orbax) is a
position in this sequence, so a restored run sees exactly the batches it
would have seen.
"""

from __future__ import annotations

import dataclasses
import signal

import grain
import ml_collections
import numpy as np
from absl import flags
from etils import epath

from data_pipelines import augment as augment_lib
from data_pipelines import crops as crops_lib
from data_pipelines import paths, speaker_corpus
from data_pipelines.errors import InputError


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of an experiment config, with sslsv's defaults."""
    return ml_collections.ConfigDict(
        {
            "train_csv": ml_collections.config_dict.placeholder(str),
            "base_dir": ml_collections.config_dict.placeholder(str),  # CSV paths are relative to it
            "tfds_dir": "",  # prepared ArrayRecords; "" means <base_dir>/tfds
            # Utterances in the train split, for sizing the SSPS queues where the data is not at hand
            # (`ssps-jax compile`); 0: unknown. Training always counts the prepared split.
            "train_size": 0,
            "min_seconds": 0.5,  # shorter files are bad input
            "skip_bad": False,
            "storage": "int16",  # how prepared records hold audio: "int16" PCM, or "flac" (smaller, decoded on read)
            "prepare_workers": 0,  # processes decoding the corpus when it is prepared; 0: all cores
            "crops": dataclasses.asdict(crops_lib.CropConfig()),
            "augment": {
                "enabled": True,
                "noise_dir": "",  # "" means <base_dir>/musan_split
                "rir_dir": "",  # "" means <base_dir>/simulated_rirs
                "strategy": "both",
                "aug_prob": 1.0,
                "snr_speech": (13.0, 20.0),
                "snr_music": (5.0, 15.0),
                "snr_noise": (0.0, 15.0),
                "count_speech": (1, 1),
                "count_music": (1, 1),
                "count_noise": (1, 1),
                # Where the crops are augmented and converted to float32 (module docstring): "host" | "device".
                "on": "host",
                # "device" only: RIRs travel cut to their first rir_seconds (longer ones are warned about once).
                "rir_seconds": 1.0,
            },
            "workers": 2,  # grain worker processes; 0 reads in the main process
            "prefetch": 4,  # batches buffered per worker
        }
    )


AUGMENT_ON = ("host", "device")


def _to_float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / augment_lib.PCM_SCALE


@dataclasses.dataclass(frozen=True)
class TrainExamples(grain.transforms.RandomMap):
    """Record -> {views..., reference, index}: docs/method.md §2 for one utterance (module docstring for `on`)."""

    crops: crops_lib.CropConfig
    augmenter: augment_lib.Augmenter | None
    on: str = "host"

    def __post_init__(self):
        if self.on not in AUGMENT_ON:
            raise InputError(f"data.augment.on must be one of {AUGMENT_ON}, got {self.on!r}")

    def _view(self, crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        view = _to_float(crop)
        return view if self.augmenter is None else self.augmenter(view, rng)

    def _pack(self, name: str, crops: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        out = {name: crops}
        if self.augmenter is not None:
            draws = [self.augmenter.draw(crops.shape[1], rng) for _ in crops]
            out.update({f"{name}_{key}": x for key, x in self.augmenter.pack(draws, crops.shape[1]).items()})
        return out

    def random_map(self, record, rng: np.random.Generator):
        # FLAC records are decoded here, in the grain workers: the same int16 samples as int16 storage.
        # Crops are cut from the int16 samples; only what the example carries is converted.
        audio = speaker_corpus.decode_audio(record["audio"])
        if self.on == "host":
            out = crops_lib.make_views(audio, self.crops, rng, augment=self._view)
            if "reference" in out:
                out["reference"] = _to_float(out["reference"])
        else:
            out = crops_lib.make_views(audio, self.crops, rng, pack=self._pack)
        out["index"] = np.int32(record["index"])
        return out


def steps_per_epoch(num_records: int, global_batch_size: int) -> int:
    return num_records // global_batch_size


def train_dataset(
    source,
    *,
    global_batch_size: int,
    seed: int,
    examples: grain.transforms.RandomMap,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
) -> grain.MapDataset:
    """Per-process batches of `global_batch_size // process_count` examples."""
    if global_batch_size % process_count:
        raise InputError(f"global_batch_size {global_batch_size} is not divisible by the {process_count} JAX processes")
    steps = steps_per_epoch(len(source), global_batch_size)
    if steps < 1:
        raise InputError(f"global_batch_size {global_batch_size} is larger than the dataset ({len(source)} records)")
    ds = grain.MapDataset.source(source).seed(seed).shuffle()
    ds = ds[: steps * global_batch_size]
    ds = ds.random_map(examples)
    ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
    ds = ds[process_index::process_count]
    return ds.repeat(num_epochs)


def batch_shapes(data: ml_collections.ConfigDict, global_batch_size: int) -> dict[str, tuple[tuple, np.dtype]]:
    """(shape, dtype) of every array of a global batch, without reading any data (ahead-of-time compilation)."""
    crops = crops_lib.CropConfig(**data.crops)
    on_device = data.augment.on == "device"
    audio = np.dtype(np.int16 if on_device else np.float32)
    augment = augment_config(data.augment) if data.augment.enabled and on_device else None
    shapes = {}
    for name, count, samples in crops_lib.view_groups(crops):
        shapes[name] = ((global_batch_size, count, samples), audio)
        for key, x in (augment.packed(count, samples) if augment else {}).items():
            shapes[f"{name}_{key}"] = ((global_batch_size, *x.shape), x.dtype)
    if reference := crops_lib.reference_samples(crops):
        shapes["reference"] = ((global_batch_size, reference), audio)
    shapes["index"] = ((global_batch_size,), np.dtype(np.int32))
    return dict(sorted(shapes.items()))


def make_iterator(dataset: grain.MapDataset, workers: int = 0, prefetch: int = 4) -> grain.DatasetIterator:
    """An iterator over `dataset`, read by `workers` processes (0: in this one)."""
    if not flags.FLAGS.is_parsed():
        # grain reads absl flags; outside an absl app nobody has parsed them.
        flags.FLAGS.mark_as_parsed()
    it_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0 if workers else 2, prefetch_buffer_size=0))
    if workers:
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch),
            worker_init_fn=_ignore_stop_signals,
        )
    return iter(it_ds)


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
    """Input workers outlive a preemption notice: it reaches every process of the host (systemd on a TPU VM,
    slurmstepd), and training still needs batches to reach the step all processes stop at and save it
    (ssps_jax/preemption.py). Grain stops its workers itself when the iterator closes."""
    del worker_index, worker_count
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def _tuple_ranges(aug: ml_collections.ConfigDict, prefix: str, cast) -> tuple:
    return tuple(tuple(cast(v) for v in aug[f"{prefix}_{c}"]) for c in augment_lib.CATEGORIES)


def augment_config(aug: ml_collections.ConfigDict) -> augment_lib.AugmentConfig:
    """The augmentation settings of the `data.augment` config section."""
    return augment_lib.AugmentConfig(
        strategy=aug.strategy,
        aug_prob=aug.aug_prob,
        snr=_tuple_ranges(aug, "snr", float),
        count=_tuple_ranges(aug, "count", int),
        rir_seconds=aug.rir_seconds,
    )


def make_examples(data: ml_collections.ConfigDict) -> TrainExamples:
    """The per-record transform described by the `data` config section."""
    crops = crops_lib.CropConfig(**data.crops)
    augmenter = None
    aug = data.augment
    if aug.enabled:
        base = epath.Path(data.base_dir)
        augmenter = augment_lib.Augmenter(
            augment_config(aug),
            noise_dir=aug.noise_dir or base / "musan_split",
            rir_dir=aug.rir_dir or base / "simulated_rirs",
        )
    return TrainExamples(crops, augmenter, aug.on)


def tfds_dir(data: ml_collections.ConfigDict) -> epath.Path:
    """Where the train split's ArrayRecords are: data.tfds_dir, by default <data.base_dir>/tfds."""
    return epath.Path(data.tfds_dir or speaker_corpus.default_data_dir(data.base_dir))


def train_labels(data: ml_collections.ConfigDict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Speaker and session ids of the train split's dataset indices (-1: unknown), for diagnostics only."""
    name = speaker_corpus.config_name(data.train_csv)
    return speaker_corpus.read_labels(speaker_corpus.index_path(tfds_dir(data), name), size)


def load_source(data: ml_collections.ConfigDict):
    """The prepared `train` split (built on first use, resumed if interrupted) as a random-access source.

    A dataset TFDS did not finish writing is not prepared (it is built, or its build continued);
    one whose shard files are missing is refused with an error naming its folder. One in a gs://
    data dir is read from a copy on this host (speaker_corpus.local_copy: ArrayRecord reads local files).
    """
    for key in ("train_csv", "base_dir"):
        if not data.get(key):
            raise InputError(f"config field data.{key} is required")
    builder = speaker_corpus.prepare(
        data.train_csv,
        data.base_dir,
        tfds_dir(data),
        min_seconds=data.min_seconds,
        skip_bad=data.skip_bad,
        storage=data.storage,
        workers=data.prepare_workers or None,
    )
    speaker_corpus.check_complete(builder)
    if paths.is_remote(builder.data_path):
        builder = speaker_corpus.local_copy(builder)
    return builder.as_data_source(split="train")
