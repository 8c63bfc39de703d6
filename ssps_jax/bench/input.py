"""`ssps-jax bench-input`: examples/s of the grain input pipeline, per augmentation path and worker count.

The pipeline is the training one (`input_pipeline.train_dataset` with
`make_examples`: crops and augmentation, then `make_iterator` with the given
workers) on the config's prepared dataset -- the demo corpus by default,
written first if it is missing -- for each path of `data.augment.on`:
"host" (the host augments, batches of float32 waveforms) and "device" (the
host cuts crops and draws the augmentation, batches of int16 crops, noise
excerpts and RIRs; the train step does the arithmetic). For each worker
count the iterator is started, its first batch timed (worker start-up), a
few batches drained so that no batch made during start-up is counted, then
`batches` batches are timed: examples/s = batches x batch / seconds. With 0
workers the process's CPU time over those batches is counted too: host CPU
ms per example, the cost to one core whatever else loads the machine
(1000 / it = examples/s per host core).

Where an example's host CPU time goes (`example_costs`, in this process, per
path): reading its record (ArrayRecord's read, including its zstd
decompression, and TFDS's decoding), the map (crops, augmentation draws and
reading the noise and RIR excerpts, plus, on the host path, the arithmetic:
the FFT convolution and the noise scaling), and the rest of the in-process
pipeline's CPU ms per example: grain's own work and batching. And what the device path
leaves to the devices: `device_ms`, the jitted `device_augment.model_batch`
of one batch on this host's first device, median of a few calls.

Compare with the samples/s of `ssps-jax bench` on the devices (`--against
bench.json`): the input keeps up when it produces at least as many.

Storage: on the first `STORAGE_RECORDS` records, the size of the audio as
FLAC (`prepare --storage flac`) over its size as int16, and the cost per
example of reading a record and of decoding its audio to int16 with each
storage (`speaker_corpus.decode_audio`, what the pipeline's map calls; int16
needs no decoding). FLAC is encoded here from the records themselves, so the
figures do not need a second prepared dataset.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import ml_collections
import numpy as np

from data_pipelines import audio_io, input_pipeline, speaker_corpus

STORAGE_RECORDS = 200
COST_RECORDS = 200
PATHS = input_pipeline.AUGMENT_ON


def ensure_demo_corpus(config: ml_collections.ConfigDict) -> None:
    """Writes the demo corpus where the config expects it, if that is the demo corpus and it is missing."""
    from data_pipelines.demo_corpus import corpus

    csv = Path(config.data.train_csv)
    if not csv.is_file() and csv.name == corpus.TRAIN_CSV:
        print(f"writing the demo corpus to {config.data.base_dir} (ssps-jax prepare-demo) ...", flush=True)
        corpus.write_demo_corpus(config.data.base_dir, workers=os.cpu_count() or 1)


def measure(source, examples, batch_size: int, workers: int, batches: int, prefetch: int, seed: int) -> dict:
    """Examples/s of the pipeline read by `workers` processes (0: in this one, where its CPU time is counted too:
    host CPU ms per example, what one core pays whatever the machine's load)."""
    dataset = input_pipeline.train_dataset(source, global_batch_size=batch_size, seed=seed, examples=examples)
    started = time.perf_counter()
    iterator = input_pipeline.make_iterator(dataset, workers=workers, prefetch=prefetch)
    try:
        next(iterator)
        first = time.perf_counter() - started
        # Workers start together and each may have a batch ready by now: drain those before timing.
        for _ in range(2 * max(workers, 1)):
            next(iterator)
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(iterator)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        iterator.close()
    row = {
        "workers": workers,
        "first_batch_s": first,
        "seconds": seconds,
        "batches": batches,
        "examples_per_s": batches * batch_size / seconds,
    }
    if not workers:
        row["cpu_ms_per_example"] = 1000 * cpu / (batches * batch_size)
    return row


def _ms_per_call(fn, items: list) -> float:
    """CPU ms per call of this process (not wall time: the figure holds on a loaded machine)."""
    started = time.process_time()
    for item in items:
        fn(item)
    return 1000 * (time.process_time() - started) / len(items)


def storage_costs(source, records: int = STORAGE_RECORDS) -> dict:
    """FLAC / int16 size ratio, and ms per example to read a record and to decode its audio, per storage."""
    indices = range(min(records, len(source)))
    read_ms = _ms_per_call(lambda i: source[i], list(indices))
    pcm = [speaker_corpus.decode_audio(source[i]["audio"]) for i in indices]
    flac = [np.frombuffer(audio_io.encode_flac(x), np.uint8) for x in pcm]
    return {
        "records": len(pcm),
        "mean_seconds": float(np.mean([len(x) for x in pcm])) / audio_io.SAMPLE_RATE,
        "flac_size_ratio": sum(f.nbytes for f in flac) / sum(x.nbytes for x in pcm),
        "read_ms": read_ms,
        "decode_ms": {
            "int16": _ms_per_call(speaker_corpus.decode_audio, pcm),
            "flac": _ms_per_call(speaker_corpus.decode_audio, flac),
        },
    }


def example_costs(source, examples: dict, records: int = COST_RECORDS) -> dict:
    """CPU ms per example, in this process: reading a record, each path's map (`examples`: path -> TrainExamples)."""
    indices = list(range(min(records, len(source))))
    read = [source[i] for i in indices]
    out = {"records": len(indices), "read_ms": _ms_per_call(lambda i: source[i], indices)}
    for on, ex in examples.items():
        ex.random_map(read[0], np.random.default_rng(0))  # headers of the augmentation files, first imports
        out[f"{on}_map_ms"] = _ms_per_call(lambda i, ex=ex: ex.random_map(read[i], np.random.default_rng(i)), indices)
    return out


def device_ms(source, examples, batch_size: int, seed: int, calls: int = 5) -> tuple[float, str]:
    """(median ms of the device path's `model_batch` on one batch, on this host's first device; the device)."""
    import jax

    from ssps_jax import device_augment

    batch = input_pipeline.train_dataset(source, global_batch_size=batch_size, seed=seed, examples=examples)[0]
    device = jax.devices()[0]
    batch = jax.device_put(batch, device)
    fn = jax.jit(device_augment.model_batch)
    jax.block_until_ready(fn(batch))  # compile
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        jax.block_until_ready(fn(batch))
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times), device.device_kind


def run(
    config: ml_collections.ConfigDict,
    workers: list[int] = (0, 1, 2),
    batches: int = 20,
    device_samples_per_s: float | None = None,
    paths: list[str] = PATHS,
) -> dict:
    """Measures every path and worker count; returns the figures."""
    from ssps_jax.config import resolve_paths

    config = resolve_paths(config)  # relative data paths under data.base_dir, as in training
    source = input_pipeline.load_source(config.data)
    batch_size = config.train.global_batch_size
    examples = {}
    for on in paths:
        with config.unlocked():
            config.data.augment.on = on
        examples[on] = input_pipeline.make_examples(config.data)
    rows = [
        {"on": on, **measure(source, examples[on], batch_size, w, batches, config.data.prefetch, config.seed)}
        for on in paths
        for w in workers
    ]
    result = {
        "cpus": os.cpu_count(),
        "load": os.getloadavg()[0],
        "train_csv": str(config.data.train_csv),
        "records": len(source),
        "batch": batch_size,
        "crops": config.data.crops.to_dict(),
        "augment": config.data.augment.strategy if config.data.augment.enabled else "off",
        "device_samples_per_s": device_samples_per_s,
        "rows": rows,
        "costs": example_costs(source, examples),
        "storage": storage_costs(source),
    }
    if "device" in examples:
        result["device_ms"], result["device_kind"] = device_ms(source, examples["device"], batch_size, config.seed)
    return result


def table(result: dict) -> str:
    """One row per path and worker count, then where an example's host time goes, as markdown."""
    crops = result["crops"]
    head = (
        f"input pipeline: {result['train_csv']} ({result['records']} records), batch {result['batch']}, "
        f"{crops['mode']} crops + {crops['reference_seconds']} s reference, augmentation {result['augment']}, "
        f"{result['cpus']} CPUs, load {result.get('load', float('nan')):.1f}"
    )
    device = result["device_samples_per_s"]
    columns = ["augment on", "workers", "examples/s", "per worker", "host CPU ms/example", "first batch (s)", "batches"]
    if device:
        head += f"; devices take {device:.1f} samples/s"
        columns.append("keeps up")
    lines = [head, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in result["rows"]:
        rate = r["examples_per_s"]
        cells = [
            r.get("on", "host"),
            str(r["workers"]),
            f"{rate:.1f}",
            f"{rate / max(r['workers'], 1):.1f}",
            f"{r['cpu_ms_per_example']:.3f}" if "cpu_ms_per_example" in r else "",
            f"{r['first_batch_s']:.1f}",
            str(r["batches"]),
        ]
        if device:
            cells.append("yes" if rate >= device else f"no ({rate / device:.0%})")
        lines.append("| " + " | ".join(cells) + " |")
    if costs := result.get("costs"):
        lines += ["", _costs_table(result, costs)]
    if "storage" not in result:
        return "\n".join(lines)
    st = result["storage"]
    lines += [
        "",
        f"storage: first {st['records']} records (mean {st['mean_seconds']:.1f} s), "
        f"reading a record {st['read_ms']:.3f} ms/example",
        "",
        "| storage | size vs int16 | decode (ms/example) |",
        "| --- | --- | --- |",
        f"| int16 | 1.00 | {st['decode_ms']['int16']:.3f} |",
        f"| flac | {st['flac_size_ratio']:.2f} | {st['decode_ms']['flac']:.3f} |",
    ]
    return "\n".join(lines)


def _costs_table(result: dict, costs: dict) -> str:
    """CPU ms per example on one host core, per path: record read, map, the rest (grain and batching)."""
    in_process = {r.get("on", "host"): r for r in result["rows"] if "cpu_ms_per_example" in r}
    paths = [on for on in PATHS if f"{on}_map_ms" in costs]
    read = " | ".join(f"{costs['read_ms']:.3f}" for _ in paths)
    lines = [
        f"host CPU ms per example, in process (first {costs['records']} records):",
        "",
        "| | " + " | ".join(f"augment on {on}" for on in paths) + " |",
        "| --- |" + " --- |" * len(paths),
        f"| read the record (ArrayRecord + zstd, TFDS decoding) | {read} |",
        "| map: crops, draws, noise / RIR reads (host: + FFT reverb, noise scaling) | "
        + " | ".join(f"{costs[f'{on}_map_ms']:.3f}" for on in paths)
        + " |",
    ]
    if all(on in in_process for on in paths):
        total = {on: in_process[on]["cpu_ms_per_example"] for on in paths}
        rest = [f"{total[on] - costs['read_ms'] - costs[f'{on}_map_ms']:.3f}" for on in paths]
        lines.append("| the rest: grain, batching (the total - the above) | " + " | ".join(rest) + " |")
        totals = " | ".join(f"**{total[on]:.3f}** ({1000 / total[on]:.0f} examples/s per core)" for on in paths)
        lines.append(f"| **total**: the pipeline in process, 0 workers | {totals} |")
    if "device_ms" in result:
        lines += [
            "",
            f"device path, on the devices: the augmentation of one batch of {result['batch']} takes "
            f"{result['device_ms']:.1f} ms on {result['device_kind']} "
            f"({result['device_ms'] / result['batch']:.3f} ms/example)",
        ]
    return "\n".join(lines)


def main(
    config: ml_collections.ConfigDict,
    workers: list[int],
    batches: int,
    json_path: str | None,
    against: str | None,
    paths: list[str] = PATHS,
) -> dict:
    """`ssps-jax bench-input`: runs, prints the table, writes the JSON."""
    ensure_demo_corpus(config)
    device = json.loads(Path(against).read_text())["samples_per_s"] if against else None
    result = run(config, workers, batches, device, paths)
    print(table(result), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written to {json_path}")
    return result
