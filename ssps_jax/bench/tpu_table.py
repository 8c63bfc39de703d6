"""The table of docs/tpu.md: `ssps-jax compile` of the paper configs on the TPU slices users rent.

    python -m ssps_jax.bench.tpu_table [--out docs/tpu] [--only SUBSTRING]

Each row is one `ssps-jax compile` in a process of its own (a compile for a
256-chip slice holds a few GB of host memory; a failed row must not lose the
others), writing <out>/<row>.json; a row whose JSON exists is not compiled
again, so an interrupted run continues. The markdown table of every row done
is printed at the end. Compiles take minutes each on 2 cores: run it in the
background, never in the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# (row name, config file, topology, extra flags): the table, most wanted first.
ROWS = (
    ("simclr_ssps_bf16_v5e-16", "configs/simclr_ssps_ecapa.py", "v5e:4x4", ["--dtype", "bfloat16"]),
    ("dino_ssps_bf16_v4-16", "configs/dino_ssps_ecapa.py", "v4:2x2x2", ["--dtype", "bfloat16"]),
    ("dino_ssps_bf16_v5e-16", "configs/dino_ssps_ecapa.py", "v5e:4x4", ["--dtype", "bfloat16"]),
    ("simclr_ssps_f32_v5e-16", "configs/simclr_ssps_ecapa.py", "v5e:4x4", []),
    ("dino_ssps_f32_v5e-16", "configs/dino_ssps_ecapa.py", "v5e:4x4", []),
    ("simclr_ssps_bf16_v4-16", "configs/simclr_ssps_ecapa.py", "v4:2x2x2", ["--dtype", "bfloat16"]),
    ("simclr_ssps_bf16_v6e-16", "configs/simclr_ssps_ecapa.py", "v6e:4x4", ["--dtype", "bfloat16"]),
    ("dino_ssps_bf16_v6e-16", "configs/dino_ssps_ecapa.py", "v6e:4x4", ["--dtype", "bfloat16"]),
    ("simclr_ssps_bf16_v5p-128", "configs/simclr_ssps_ecapa.py", "v5p:4x4x4", ["--dtype", "bfloat16"]),
    ("dino_ssps_bf16_v5p-128", "configs/dino_ssps_ecapa.py", "v5p:4x4x4", ["--dtype", "bfloat16"]),
    ("simclr_ssps_bf16_v5e-256", "configs/simclr_ssps_ecapa.py", "v5e:16x16", ["--dtype", "bfloat16"]),
    ("dino_ssps_bf16_v5e-256", "configs/dino_ssps_ecapa.py", "v5e:16x16", ["--dtype", "bfloat16"]),
    ("simclr_ssps_knn_bf16_v5e-16", "configs/simclr_ssps_ecapa_knn.py", "v5e:4x4", ["--dtype", "bfloat16"]),
    ("simclr_resnet34_bf16_v5e-16", "configs/simclr_resnet34.py", "v5e:4x4", ["--dtype", "bfloat16"]),
)
# The step programs and the clustering; the embedding buckets are left to `ssps-jax compile` itself.
PROGRAMS = "plain,ssps,cluster"


def run_rows(out: Path, only: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, config, topology, flags in ROWS:
        target = out / f"{name}.json"
        if (only and only not in name) or target.exists():
            continue
        command = [sys.executable, "-m", "ssps_jax.cli", "compile", "--config", config, "--topology", topology]
        command += [*flags, "--programs", PROGRAMS, "--json", str(target)]
        print(f"== {name}: {' '.join(command[2:])}", flush=True)
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        print(result.stdout[-4000:], flush=True)
        if result.returncode:
            print(
                f"   failed ({result.returncode}) after {time.perf_counter() - started:.0f} s:", result.stderr[-2000:]
            )
            (out / f"{name}.failed.txt").write_text(result.stderr)


def markdown(out: Path) -> str:
    """One line per row done: fits, per-device HBM by part, FLOPs, roofline, samples/s, compile time."""
    gib = 2**30
    head = (
        "| run | slice | dtype | fits | HBM per device: params + opt / SSPS / batch / temp, peak of HBM | "
        "FLOPs per step per device | roofline step (ms) | samples/s | whole run at the roofline | "
        "compile on 2 cores (s) |"
    )
    lines = [head, "|" + " --- |" * 10]
    for name, _, topology, _ in ROWS:
        path, failed = out / f"{name}.json", out / f"{name}.failed.txt"
        if not path.exists():
            if failed.exists():  # a refused config says why in its last line
                why = (failed.read_text().strip().splitlines() or ["?"])[-1]
                lines.append(f"| {name.rsplit('_', 1)[0]} | {topology} | | **no**: {why} | | | | | | |")
            continue
        r = json.loads(path.read_text())
        step = next((p for p in r["programs"] if p["name"] == "SSPS step"), r["programs"][0])
        worst = max(r["programs"], key=lambda p: p["peak_bytes"])
        a = step["arguments"]
        parts = (
            f"{(a.get('parameters', 0) + a.get('optimizer', 0)) / gib:.2f} / {a.get('ssps', 0) / gib:.2f} / "
            f"{a.get('batch', 0) / gib:.2f} / {step['temp_bytes'] / gib:.2f}, "
            f"{worst['peak_bytes'] / gib:.2f} of {r['hbm_bytes'] / gib:.0f} GiB"
        )
        fits = all(p["fits"] for p in r["programs"])
        run_hours = r.get("run_roofline_seconds")
        lines.append(
            f"| {name.rsplit('_', 1)[0]} | {topology} ({r['devices']} devices) | {r['config']['dtype']} | "
            f"{'yes' if fits else '**no**'} | {parts} | {step['flops']:.3g} | "
            f"{1e3 * step['roofline_seconds']:.1f} | {r['config']['global_batch'] / step['roofline_seconds']:,.0f} | "
            f"{'-' if run_hours is None else f'{run_hours / 3600:.2f} h'} | "
            f"{sum(p['compile_seconds'] for p in r['programs']):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/tpu", help="folder of the rows' JSON (default: %(default)s)")
    parser.add_argument("--only", help="only the rows whose name contains this")
    parser.add_argument("--table-only", action="store_true", help="print the table of the rows done, compile nothing")
    args = parser.parse_args()
    if not args.table_only:
        run_rows(Path(args.out), args.only)
    print(markdown(Path(args.out)))


if __name__ == "__main__":
    main()
