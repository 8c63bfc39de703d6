"""docs/data.md's "VoxCeleb from a manual download" commands, run as written on a miniature VoxCeleb.

The downloads are built as they unpack, under downloads/ of a folder that
stands for the repository's (its configs/ is the repository's): VoxCeleb1's `wav/` (16 kHz WAV),
VoxCeleb2 dev's `dev/aac/` (AAC in .m4a, encoded here with PyAV), the
trial lists `veri_test2.txt`, `list_test_all2.txt`, `list_test_hard2.txt`
(paths relative to VoxCeleb1's wav/), MUSAN's `musan/` and RIRS_NOISES'
`RIRS_NOISES/simulated_rirs/`. The doc's bash block is then run by bash in
that folder, with one change: `ssps-jax train` gets overrides appended that
shrink the paper's model and batch to 2 CPU steps (every other command runs
exactly as the doc prints it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from data_pipelines import audio_io

ROOT = Path(__file__).resolve().parents[1]
RATE = audio_io.SAMPLE_RATE

# Shrinks configs/simclr_ssps_ecapa.py to 2 steps of 8 on CPU, its SSPS and its AS-Norm top-k to the miniature's size.
TINY_TRAIN = [
    "--config.model.encoder_dim=32",
    "--config.model.ecapa_tdnn.channels=(32,32,96)",  # one SE-Res2Block of scale 2: half the compile time
    "--config.model.ecapa_tdnn.kernel_sizes=(5,3,1)",
    "--config.model.ecapa_tdnn.dilations=(1,2,1)",
    "--config.model.ecapa_tdnn.res2net_scale=2",
    "--config.model.ecapa_tdnn.attention_channels=16",
    "--config.model.ecapa_tdnn.se_channels=8",
    "--config.train.global_batch_size=8",
    "--config.train.stop_at_epoch=1",
    "--config.data.train_size=0",
    "--config.data.workers=0",
    "--config.eval.batch_size=8",
    "--config.ssps.kmeans_clusters=4",
    "--config.ssps.pos_queue_size=16",
    "--config.eval.cohort_top_k=8",
]


def _voice(rng: np.random.Generator, pitch: float, seconds: float) -> np.ndarray:
    """A harmonic tone at `pitch` with a little noise: distinct per speaker, decodable by anything."""
    t = np.arange(int(seconds * RATE)) / RATE
    wave = sum(np.sin(2 * np.pi * pitch * h * t + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 6))
    return (0.2 * wave / 2.3 + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def _speaker_tree(root: Path, prefix: int, speakers: int, sessions: int, utterances: int, write, ext: str, rng):
    files = []
    for s in range(speakers):
        pitch = 90 + 25 * s
        for v in range(sessions):
            for u in range(utterances):
                rel = f"id{prefix + s:05d}/session{v:02d}abc/{u + 1:05d}.{ext}"
                write(root / rel, _voice(rng, pitch * (1 + 0.02 * v), rng.uniform(2.0, 3.0)))
                files.append(rel)
    return files


def miniature_voxceleb_downloads(folder: Path) -> None:
    """The VoxCeleb, MUSAN and RIRS_NOISES archives of docs/data.md, unpacked in `folder`, in miniature."""
    rng = np.random.default_rng(0)
    _speaker_tree(folder / "dev" / "aac", 12, 4, 2, 2, audio_io.write_m4a, "m4a", rng)  # VoxCeleb2 dev: 16 files
    test = _speaker_tree(folder / "wav", 10270, 3, 2, 2, audio_io.write_wav, "wav", rng)  # VoxCeleb1: 12 files
    pairs = [(a, b) for i, a in enumerate(test) for b in test[i + 1 :] if a.split("/")[1] != b.split("/")[1]]
    for name, every in (("veri_test2.txt", 1), ("list_test_all2.txt", 1), ("list_test_hard2.txt", 2)):
        lines = [f"{int(a.split('/')[0] == b.split('/')[0])} {a} {b}\n" for a, b in pairs[::every]]
        (folder / name).write_text("".join(lines))
    for category, source in (("music", "fma"), ("noise", "free-sound"), ("speech", "librivox")):
        for i in range(2):
            noise = 0.1 * rng.standard_normal(RATE * 3).astype(np.float32)
            audio_io.write_wav(folder / "musan" / category / source / f"{category}-{source}-{i:04d}.wav", noise)
    for room_type in ("smallroom", "mediumroom"):
        rir = np.exp(-np.arange(1600) / 200.0) * rng.standard_normal(1600)
        path = folder / "RIRS_NOISES" / "simulated_rirs" / room_type / "Room001" / "Room001-00001.wav"
        audio_io.write_wav(path, (0.5 * rir / np.abs(rir).max()).astype(np.float32))


def readme_voxceleb_commands() -> str:
    """The bash block of docs/data.md's "VoxCeleb from a manual download" section."""
    readme = (ROOT / "docs" / "data.md").read_text()
    section = readme.split("## VoxCeleb from a manual download", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_readme_voxceleb_commands_run_end_to_end(tmp_path):
    miniature_voxceleb_downloads(tmp_path / "downloads")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    commands = readme_voxceleb_commands()
    assert "ssps-jax train" in commands and "ssps-jax evaluate" in commands

    # `ssps-jax` is the venv's; `train` gets the CPU-sized overrides.
    bin_dir = Path(sys.executable).parent
    script = (
        "set -euo pipefail\n"
        f'ssps-jax() {{ if [ "$1" = train ]; then command ssps-jax "$@" {" ".join(map(repr, TINY_TRAIN))}; '
        'else command ssps-jax "$@"; fi; }\n' + commands
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output

    data = tmp_path / "data"
    # make-csv listed the m4a of VoxCeleb2, prepare decoded every one of them.
    train_csv = (data / "voxceleb2_train.csv").read_text().splitlines()
    assert train_csv[0] == "File,Speaker,Session" and len(train_csv) == 17
    assert all(line.startswith("voxceleb2/") and ".m4a," in line for line in train_csv[1:])
    index = (data / "tfds" / "voxceleb2_train.index.csv").read_text().splitlines()
    assert len(index) == 17

    # evaluate wrote raw and AS-Norm metrics with confidence intervals for the three lists.
    (eval_dir,) = (tmp_path / "runs" / "simclr_ssps" / "eval").glob("step_*")
    results = json.loads((eval_dir / "metrics.json").read_text())["results"]
    assert set(results) == {"voxceleb1_test_O", "voxceleb1_test_E", "voxceleb1_test_H"}
    for name, r in results.items():
        assert r["trials"] == len((data / name).read_text().splitlines())
        for kind in ("cosine", "as-norm"):
            for metric in ("eer", "min_dcf_0.01", "min_dcf_0.05"):
                low, high = r[kind][f"{metric}_ci"]
                assert low <= r[kind][metric] <= high, (name, kind, metric)
    assert "Traceback" not in output
    # TFDS's download messages and progress bars stay out of the way.
    assert "Downloading and preparing" not in output and "dataset_info.json" not in output
    assert "Generating splits" not in output
