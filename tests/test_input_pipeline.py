"""The grain pipeline: seeded order, epochs, per-process sharding, exact restore."""

import dataclasses
import multiprocessing
import os
import signal

import numpy as np
import pytest

from data_pipelines import input_pipeline
from data_pipelines.errors import InputError

GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def examples(demo_dir):
    config = input_pipeline.default_config()
    config.train_csv = str(demo_dir / "demo_train.csv")
    config.base_dir = str(demo_dir)
    config.crops.frame_seconds = 0.5  # small crops: these tests are about order, not content
    config.crops.reference_seconds = 1.0
    return input_pipeline.make_examples(config)


def _dataset(source, examples, seed=0, process_index=0, process_count=1):
    return input_pipeline.train_dataset(
        source,
        global_batch_size=GLOBAL_BATCH,
        seed=seed,
        examples=examples,
        process_index=process_index,
        process_count=process_count,
    )


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_batches_hold_the_ssl_example(demo_source, examples):
    batch = _dataset(demo_source, examples)[0]
    assert batch["views"].shape == (GLOBAL_BATCH, 2, 8000)
    assert batch["reference"].shape == (GLOBAL_BATCH, 16000)
    assert batch["index"].dtype == np.int32
    assert len(set(batch["index"].tolist())) == GLOBAL_BATCH


def test_order_is_deterministic_from_the_seed(demo_source, examples):
    steps = len(demo_source) // GLOBAL_BATCH
    a = [_dataset(demo_source, examples, seed=1)[i] for i in (0, 1, steps + 3)]
    b = [_dataset(demo_source, examples, seed=1)[i] for i in (0, 1, steps + 3)]
    _assert_same_batches(a, b)
    c = _dataset(demo_source, examples, seed=2)[0]
    assert not np.array_equal(a[0]["index"], c["index"])


def test_each_epoch_is_a_new_permutation_of_whole_steps(demo_source, examples):
    n = len(demo_source)
    steps = input_pipeline.steps_per_epoch(n, GLOBAL_BATCH)
    ds = _dataset(demo_source, examples, seed=3)
    epochs = [np.concatenate([ds[e * steps + s]["index"] for s in range(steps)]) for e in range(2)]
    for order in epochs:
        assert len(order) == steps * GLOBAL_BATCH
        assert len(set(order.tolist())) == len(order)  # no record twice in an epoch
        assert set(order.tolist()) <= set(range(n))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled
    # A record seen in both epochs gets new crops (augmentation is seeded per position).
    pos0, pos1 = next((i, int(np.flatnonzero(epochs[1] == r)[0])) for i, r in enumerate(epochs[0]) if r in epochs[1])
    first = ds[pos0 // GLOBAL_BATCH]["views"][pos0 % GLOBAL_BATCH]
    again = ds[steps + pos1 // GLOBAL_BATCH]["views"][pos1 % GLOBAL_BATCH]
    assert not np.array_equal(first, again)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_tile_the_global_batch(demo_source, examples, process_count):
    """P processes together see exactly the single-process global batches, each record once per epoch."""
    steps = input_pipeline.steps_per_epoch(len(demo_source), GLOBAL_BATCH)
    single = _dataset(demo_source, examples, seed=5)
    shards = [_dataset(demo_source, examples, 5, p, process_count) for p in range(process_count)]
    seen = []
    for step in (0, 1, steps - 1, steps, steps + 1):  # across the epoch boundary
        parts = [shard[step] for shard in shards]
        for part in parts:
            assert part["index"].shape == (GLOBAL_BATCH // process_count,)
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        _assert_same_batches([merged], [single[step]])
    for step in range(steps):
        seen.extend(np.concatenate([shard[step]["index"] for shard in shards]).tolist())
    assert len(seen) == len(set(seen)) == steps * GLOBAL_BATCH


@pytest.mark.parametrize("workers, on", [(0, "host"), (2, "host"), (0, "device")])
def test_restored_iterator_continues_exactly(demo_source, examples, workers, on):
    """Also with augmentation on the accelerator: its random draws are the host's, made in the same map."""
    steps = input_pipeline.steps_per_epoch(len(demo_source), GLOBAL_BATCH)
    examples = dataclasses.replace(examples, on=on)
    ds = _dataset(demo_source, examples, seed=7)
    it = input_pipeline.make_iterator(ds, workers=workers)
    _take(it, steps - 2)  # stop mid-epoch, two steps before its end
    for worker in multiprocessing.active_children():  # a preemption notice to every process: workers go on
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGINT)
    state = it.get_state()
    expected = _take(it, 4)  # crosses into the next epoch
    it.close()
    resumed = input_pipeline.make_iterator(ds, workers=workers)
    resumed.set_state(state)
    got = _take(resumed, 4)
    resumed.close()
    _assert_same_batches(got, expected)
    _assert_same_batches(expected, [ds[i] for i in range(steps - 2, steps + 2)])


def test_invalid_batching_is_reported(demo_source, examples):
    with pytest.raises(InputError, match="global_batch_size 10 is not divisible by the 4"):
        input_pipeline.train_dataset(demo_source, global_batch_size=10, seed=0, examples=examples, process_count=4)
    with pytest.raises(InputError, match="larger than the dataset"):
        input_pipeline.train_dataset(demo_source, global_batch_size=4096, seed=0, examples=examples)


def test_missing_config_fields_are_named():
    config = input_pipeline.default_config()
    with pytest.raises(InputError, match=r"data\.train_csv"):
        input_pipeline.load_source(config)


def test_flac_records_give_the_same_batches_as_int16(demo_dir, demo_source, examples, tmp_path):
    from data_pipelines import speaker_corpus

    flac = speaker_corpus.prepare(
        demo_dir / "demo_train.csv", demo_dir, tmp_path / "flac", storage="flac", workers=1
    ).as_data_source(split="train")
    assert flac[0]["audio"].dtype == np.uint8  # stored as FLAC, decoded in the map
    steps = input_pipeline.steps_per_epoch(len(demo_source), GLOBAL_BATCH)
    positions = (0, steps - 1, steps)
    _assert_same_batches(
        [_dataset(flac, examples, seed=9)[i] for i in positions],
        [_dataset(demo_source, examples, seed=9)[i] for i in positions],
    )


def test_bench_input_measures_flac_against_int16(demo_source):
    from data_pipelines import audio_io
    from ssps_jax.bench import input as bench_input

    costs = bench_input.storage_costs(demo_source, records=5)
    pcm = [demo_source[i]["audio"] for i in range(5)]
    flac_bytes = sum(len(audio_io.encode_flac(x)) for x in pcm)
    assert costs["records"] == 5
    assert costs["flac_size_ratio"] == pytest.approx(flac_bytes / sum(x.nbytes for x in pcm))
    assert 0 < costs["flac_size_ratio"] < 1  # lossless, and smaller on the demo's voices
    assert costs["mean_seconds"] == pytest.approx(np.mean([len(x) for x in pcm]) / 16000)
    assert set(costs["decode_ms"]) == {"int16", "flac"}
    table = bench_input.table(
        {
            "cpus": 2,
            "train_csv": "x.csv",
            "records": 5,
            "batch": 8,
            "crops": {"mode": "simclr", "reference_seconds": 4.0},
            "augment": "off",
            "device_samples_per_s": None,
            "rows": [],
            "storage": costs,
        }
    )
    assert f"| flac | {costs['flac_size_ratio']:.2f} |" in table
