"""README's "The 2-minute tour", run by bash exactly as printed, in a fresh folder.

The folder stands for the repository's (its configs/ is the repository's) and the environment is a
user's: the venv's `bin` on the PATH, no JAX_PLATFORMS or XLA_FLAGS (one CPU device; libtpu installed,
no TPU). One change: the block's last line, `tensorboard --logdir ...`, serves until stopped, so bash
records its arguments and the test starts the real TensorBoard with them (on a free port), waits until it
serves the run's scalars and stops it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def readme_tour() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The 2-minute tour", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _serve_tensorboard(bin_dir: Path, args: list[str], cwd: Path, env: dict) -> dict:
    """The scalar tags TensorBoard serves with `args` (the README's), once it has read the run."""
    port = _free_port()
    server = subprocess.Popen(
        [str(bin_dir / "tensorboard"), *args, "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://localhost:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    tags = json.loads(r.read())
                if any("train/loss" in run for run in tags.values()):
                    return tags
            except OSError:
                pass
            assert server.poll() is None, server.stderr.read()
            time.sleep(1)
        raise AssertionError("TensorBoard did not serve the run's scalars within 120 s")
    finally:
        server.terminate()
        server.wait(30)


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _print_timings(trace: str, started: float, cpu: float) -> None:
    """Wall seconds of each `ssps-jax` command of the block (from bash's trace), and the CPU seconds of all."""
    marks = [(float(m.group(1)), m.group(2)) for m in re.finditer(r"^\+ ([\d.]+) (.*)$", trace, re.M)]
    marks.append((time.time(), "end"))
    print(f"\nthe tour: {marks[-1][0] - started:.0f} s wall, {cpu:.0f} s CPU (user + sys, all processes)")
    for (t, command), (t_next, _) in itertools.pairwise(marks):
        print(f"  {t_next - t:6.1f} s  {command[:90]}")


def test_readme_tour_runs_as_printed(tmp_path):
    commands = readme_tour()
    for command in ("prepare-demo", "train", "evaluate", "extract", "score", "export", "plot"):
        assert f"ssps-jax {command} " in commands
    assert commands.rstrip().splitlines()[-1].startswith("tensorboard --logdir ")
    (tmp_path / "configs").symlink_to(ROOT / "configs")

    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    # `set -x` with the time in its prefix: when each command started, for the figures printed below.
    script = (
        "set -euo pipefail\nexport PS4='+ ${EPOCHREALTIME} '\n"
        "tensorboard() { printf '%s\\n' \"$@\" > tensorboard.args; }\nset -x\n" + commands
    )
    started, cpu = time.time(), _children_cpu_seconds()
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    _print_timings(done.stderr, started, _children_cpu_seconds() - cpu)
    output = done.stdout + "\n".join(line for line in done.stderr.splitlines() if not line.startswith("+ "))

    # Nothing but the commands' own lines: no traceback, libtpu noise, leaked memory or warning.
    for noise in ("Traceback", "unexpected worker hostname", "E0000", "leaked shared_memory", "warning:"):
        assert noise not in output, (noise, output)

    workdir = tmp_path / "workdirs" / "tour"
    # train: a progress line with real figures, then the summary.
    (progress,) = [line for line in done.stdout.splitlines() if line.startswith("step 4/4 ")]
    samples_per_s = float(re.search(r"\| ([\d.]+) samples/s", progress).group(1))
    assert samples_per_s > 0
    assert (
        "trained steps 1-4 of 4 in " in done.stdout and f"tensorboard --logdir {Path('workdirs/tour')}" in done.stdout
    )
    # evaluate: metrics with intervals and the EER threshold that score then used.
    metrics = json.loads((workdir / "eval" / "step_4" / "metrics.json").read_text())["results"]["demo_trials"]
    low, high = metrics["cosine"]["eer_ci"]
    assert low <= metrics["cosine"]["eer"] <= high
    threshold = metrics["cosine"]["eer_threshold"]
    (decision,) = [line for line in done.stdout.splitlines() if line.startswith(("same: ", "different: "))]
    assert decision.endswith(
        f"threshold {threshold:.6f} (the EER threshold of demo_trials at step 4, from "
        f"{Path('workdirs/tour/eval/step_4/metrics.json')})"
    )
    # extract: one L2-normalised embedding per test recording.
    test_rows = (tmp_path / "tour_data" / "demo_test.csv").read_text().splitlines()[1:]
    embeddings = np.load(workdir / "test.npz")["embeddings"]
    assert embeddings.shape[0] == len(test_rows)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    # export and plot: their files, named in their output.
    for path in ("encoder.stablehlo", "encoder.stablehlo.json", "plots/training.png", "plots/det_step_4.png"):
        assert (workdir / path).is_file(), path
        assert str(Path("workdirs/tour") / path) in done.stdout, path

    # tensorboard: the README's arguments serve the run's training scalars from this venv.
    args = (tmp_path / "tensorboard.args").read_text().split()
    tags = _serve_tensorboard(bin_dir, args, tmp_path, env)
    assert any({"train/loss", "train/samples_per_s"} <= set(run) for run in tags.values()), tags
