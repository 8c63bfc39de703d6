"""Evaluation at VoxCeleb1-E's size: wall time per phase and peak host RSS (docs/benchmarks.md).

    python -m ssps_jax.bench.evaluation generate DIR   # 145,160 short test wavs, 579,818 trials, a train CSV
    python -m ssps_jax.bench.evaluation run DIR        # evaluate them: cosine + AS-Norm, EER/minDCF with CIs

`generate` writes VoxCeleb1-E's counts over short files (0.25-0.5 s of noise,
so that embedding them is quick on a CPU: the number of utterances and trials
is what host memory depends on), in VoxCeleb1's layout (1,251 speakers), half
the trials target, and `cohort` train files for AS-Norm. `run` builds a
randomly initialised model (configs/demo_simclr.py's ECAPA-TDNN C=128, D=128
unless --encoder-dim), evaluates through `make_trial_evaluator` exactly as training
and `ssps-jax evaluate` do, and prints the phases and the peak RSS of the
process (ru_maxrss, its own: it starts no children), beside what the former
evaluation, which kept every test file's int16 audio in memory, would hold.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import resource
import time
from pathlib import Path

import numpy as np

from data_pipelines import audio_io

VOX1_E_UTTERANCES = 145_160
VOX1_E_TRIALS = 579_818
VOX1_SPEAKERS = 1_251
VOX1_E_MEAN_SECONDS = 8.2  # VoxCeleb1: 352 h over 153,516 utterances


def generate(out: Path, utterances: int, trials: int, cohort: int, seed: int = 0, threads: int = 16) -> None:
    """Short noise wavs <speaker>/<session>/<utt>.wav, `list_test_all.txt` over them, and a train CSV."""
    rng = np.random.default_rng(seed)
    speaker = np.arange(utterances) % VOX1_SPEAKERS  # utterance i: speaker i % 1251, its (i // 1251)-th
    test = [f"id{10000 + s}/s{i // VOX1_SPEAKERS % 10}/{i:06d}.wav" for i, s in enumerate(speaker)]
    train = [f"train/id{i % 5994:05d}/{i:06d}.wav" for i in range(cohort)]
    files = [(out / "wav" / rel, 4000, 8001) for rel in test] + [(out / rel, 8000, 16001) for rel in train]

    def write(i):  # file i's own generator: the same corpus whatever the thread order
        path, low, high = files[i]
        r = np.random.default_rng([seed, i])
        audio_io.write_wav(path, 0.1 * r.standard_normal(r.integers(low, high)))

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # file writes: mostly waiting on the disk
        list(pool.map(write, range(len(files))))
    # Half target (another utterance of the enrolment's speaker), half non-target (any other utterance).
    # Every file enrols at least once (so all of them are evaluated), then random ones.
    enrol = np.r_[rng.permutation(utterances), rng.integers(0, utterances, trials - utterances)]
    per_speaker = (utterances - speaker[enrol] + VOX1_SPEAKERS - 1) // VOX1_SPEAKERS
    rank = enrol // VOX1_SPEAKERS
    partner = speaker[enrol] + VOX1_SPEAKERS * ((rank + rng.integers(1, per_speaker)) % per_speaker)
    other = (enrol + rng.integers(1, utterances, trials)) % utterances  # never the enrolment itself
    test_idx = np.where(rng.random(trials) < 0.5, partner, other)
    labels = (speaker[enrol] == speaker[test_idx]).astype(int)
    with (out / "list_test_all.txt").open("w") as f:
        f.writelines(f"{y} {test[e]} {test[t]}\n" for y, e, t in zip(labels, enrol, test_idx))
    (out / "train.csv").write_text("File,Speaker\n" + "".join(f"{rel},{rel.split('/')[1]}\n" for rel in train))


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run(data: Path, encoder_dim: int, batch_size: int, score_norm: str, bootstrap: int) -> dict:
    import jax

    from ssps_jax import config as config_lib
    from ssps_jax import sharding
    from ssps_jax.build import build_for_inference
    from ssps_jax.evaluation import verification

    config = config_lib.use_demo(config_lib.base_config())  # configs/demo_simclr.py's model
    config.model.encoder_dim = encoder_dim
    config.data.base_dir = str(data)
    config.data.train_csv = str(data / "train.csv")
    e = config.eval
    e.trials, e.base_dir = (str(data / "list_test_all.txt"),), str(data / "wav")
    e.batch_size, e.score_norm, e.bootstrap = batch_size, score_norm, bootstrap
    e.min_bucket_seconds = 0.25
    config_lib.validate_scoring(e)
    mesh = sharding.make_mesh()
    method, model, state = build_for_inference(config, mesh)  # randomly initialised, as `ssps-jax evaluate` builds
    variables = method.eval_variables(state)
    report = {"devices": f"{mesh.size} x {jax.devices()[0].device_kind}", "encoder_dim": encoder_dim}
    started = time.perf_counter()
    evaluator = verification.make_trial_evaluator(config, model, mesh)
    report["phases_s"] = {"parse lists, read headers": time.perf_counter() - started}
    report["rss_after_setup_gib"] = _rss_gib()
    results, scores = evaluator.evaluate(variables)
    report["phases_s"].update(evaluator.timings)
    started = time.perf_counter()
    evaluator.write(data / "eval_out", results, scores)
    report["phases_s"]["write metrics and scores"] = time.perf_counter() - started
    report["total_s"] = sum(report["phases_s"].values())
    report["peak_rss_gib"] = _rss_gib()
    samples = sum(evaluator.lengths)
    report["utterances"], report["trials"] = len(evaluator.files), sum(len(t.labels) for t in evaluator.lists)
    report["cohort"] = len(evaluator.cohort.files) if evaluator.cohort else 0
    report["old_path_audio_gib"] = 2 * samples / 2**30  # int16 audio the former trial evaluator kept
    report["old_path_audio_gib_real_vox1_e"] = 2 * VOX1_E_UTTERANCES * VOX1_E_MEAN_SECONDS * 16000 / 2**30
    report["results"] = results
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ssps_jax.bench.evaluation", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("generate", help="write the corpus")
    g.add_argument("out", type=Path)
    g.add_argument("--utterances", type=int, default=VOX1_E_UTTERANCES)
    g.add_argument("--trials", type=int, default=VOX1_E_TRIALS)
    g.add_argument("--cohort", type=int, default=20000, help="train files (eval.cohort_size's default)")
    r = sub.add_parser("run", help="evaluate it; prints JSON")
    r.add_argument("data", type=Path)
    r.add_argument("--encoder-dim", type=int, default=128)
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--score-norm", default="as-norm")
    r.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.what == "generate":
        started = time.perf_counter()
        generate(args.out, args.utterances, args.trials, args.cohort)
        print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")
    else:
        report = run(args.data, args.encoder_dim, args.batch_size, args.score_norm, args.bootstrap)
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
