"""`ssps-jax demo-methods`: every method's demo on the embedded corpus, without and with SSPS, in one table.

For each SSL method, `make demo`'s three stages (ssps_jax/demo.py) with the
method's demo config: the method alone for `ssps.start_epoch` epochs, then
that run continued to `train.epochs` with SSPS and, from the same
checkpoint, without it (the fair baseline). The supervised baseline is
trained once for as many epochs, with the train split's speaker labels: the
upper bound the others are read against. The table has EER and minDCF
(p_target 0.01) on the demo trials after the same number of epochs, the
relative change SSPS makes, and each method's wall time in this invocation
(every stage resumes, so a rerun only finishes what is missing);
<workdir>/demo_methods.json keeps the numbers.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from data_pipelines.demo_corpus import corpus
from ssps_jax import demo
from ssps_jax.config_overrides import UsageError, load_config_file
from ssps_jax.evaluation.verification import trial_list_name
from ssps_jax.observe import say

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def demos() -> dict[str, str]:
    """Each registered method's demo config (`Method.demo_config`), in registry order: SSPS enabled, so that
    demo.run trains it with and without, unless the method trains on labels."""
    from ssps_jax import methods  # imports JAX: not needed to read this module

    return {name: m.demo_config for name, m in methods.REGISTRY.items() if m.demo_config}


def run(data: str | Path, workdir: str | Path, names: list[str] | None = None) -> dict:
    """Runs (or resumes) each named method's demo (default: every one), then prints and returns the table."""
    from ssps_jax.train import train  # imports JAX: not needed to read this module

    configs = demos()
    names = list(configs) if names is None else names
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise UsageError(f"--methods: unknown {', '.join(unknown)}; one or more of {', '.join(configs)}")
    data, workdir = Path(data), Path(workdir)
    if not (data / corpus.TRAIN_CSV).is_file():
        say(f"writing the demo corpus to {data} ...")
        corpus.write_demo_corpus(data, workers=os.cpu_count() or 1)
    trials = trial_list_name(corpus.TRIALS)
    rows = {}
    for name in names:
        config = load_config_file(CONFIGS / configs[name])
        say(f"==== {name}: {CONFIGS / configs[name]}")
        started = time.perf_counter()
        if config.ssps.enabled:
            _, _, fair, ssps = demo.run(data, workdir / name, config)["runs"].values()
        else:  # trained on labels: one run, no SSPS
            config.data.train_csv = str(data / corpus.TRAIN_CSV)
            config.data.base_dir = str(data)
            config.eval.trials = (str(data / corpus.TRIALS),)
            config.eval.every_epochs = config.train.epochs
            train(config, workdir / name)
            fair, ssps = demo._row(workdir / name, trials, -1), None
        rows[name] = {
            "epochs": config.train.epochs,
            "without_ssps": fair,
            "with_ssps": ssps,
            "seconds": time.perf_counter() - started,
        }
    _print(rows, trials)
    (workdir / "demo_methods.json").write_text(json.dumps({"trials": corpus.TRIALS, "methods": rows}, indent=2) + "\n")
    say(f"numbers: {workdir / 'demo_methods.json'}")
    return rows


def _print(rows: dict, trials: str) -> None:
    say("")
    say(f"every method on {trials} (held-out speakers, cross-session targets), after the same epochs")
    say(f"  {'method':<12}{'epochs':>7}{'EER %':>9}{'minDCF':>8}{'+SSPS EER %':>13}{'minDCF':>8}{'SSPS':>9}{'wall':>9}")
    for name, r in rows.items():
        fair, ssps = r["without_ssps"], r["with_ssps"]
        if ssps is None:
            with_ssps, change = f"{'-':>13}{'-':>8}", f"{'-':>9}"
        else:
            relative = (fair["eer"] - ssps["eer"]) / fair["eer"] if fair["eer"] else math.nan
            with_ssps, change = f"{100 * ssps['eer']:>13.2f}{ssps['min_dcf']:>8.4f}", f"{-100 * relative:>+8.1f}%"
        say(
            f"  {name:<12}{r['epochs']:>7}{100 * fair['eer']:>9.2f}{fair['min_dcf']:>8.4f}{with_ssps}{change}"
            f"{r['seconds']:>8.0f}s"
        )
    say("  SSPS: relative EER change of the SSPS run against the fair baseline (negative: SSPS better); wall: this")
    say("  invocation's time for the method (all its stages), on this machine")
