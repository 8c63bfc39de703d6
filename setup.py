"""ssps-jax: self-supervised speaker verification with SSPS, in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup

# ssps_jax/export.py's needs: onnx, onnx-ir and onnxruntime are what jax2onnx converts with and the ONNX
# export runs in; flatbuffers is jax.export's serialization (StableHLO). jax2onnx itself is not listed:
# every release from 0.13 on pins orbax-checkpoint < 0.11.37, which would downgrade this project's
# orbax-checkpoint 0.12, and jax2onnx never imports orbax (nor equinox, dm-pix, huggingface-hub, netron,
# which it also requires for plugins and tools we do not use). `make venv` installs it with --no-deps:
#   pip install --no-deps "jax2onnx==0.17.1"
EXPORT = ["onnx>=1.20.1", "onnx-ir>=0.2.1", "onnxruntime>=1.24.1", "flatbuffers>=24.3"]
# Viewing a run: TensorBoard's web server, for the tensorboard/ folder of a workdir (training writes the event files
# with tensorboardX, so it runs without it). Its own extra: a TPU or GPU worker that only trains needs no web server;
# the test extra includes it (README's tour ends with `tensorboard --logdir`, and its test runs that line).
VIZ = ["tensorboard>=2.16"]

setup(
    name="ssps-jax",
    version="0.1.0",
    description="JAX/Flax training system for self-supervised speaker verification with "
    "Self-Supervised Positive Sampling (SSPS)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ssps_jax", "ssps_jax.*", "data_pipelines", "data_pipelines.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.7",
        "importlib_resources",  # tensorflow-datasets imports it without declaring it
        "array-record>=0.7",
        "grain>=0.2.10",
        "librosa>=0.10.2",
        "soundfile>=0.12",
        "av>=14",  # PyAV: decodes m4a/AAC and whatever FFmpeg reads (FFmpeg is bundled in its wheels)
        "soxr>=0.5",
        "ml-collections>=1.0",
        "matplotlib>=3.8",  # the demo's DET plot, `ssps-jax plot`
        "absl-py>=2.1",
        "numpy>=1.26",
        "scipy>=1.12",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        # gs:// workdirs and data: etils.epath opens them through fsspec with gcsfs (TensorFlow is not installed).
        "gcsfs>=2024.2",
    ],
    extras_require={
        # torch: the PyTorch baseline's equivalence tests (tests/test_torch_baseline.py).
        # EXPORT: tests/test_export.py checks both exports against JAX.
        # gcp-storage-emulator: the GCS JSON API on 127.0.0.1 for the gs:// tests (tests/gcs.py).
        # VIZ: README's tour (tests/test_readme_tour.py) runs its `tensorboard` line.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "scikit-learn>=1.4",
            "ruff>=0.6",
            "torch>=2.3",
            "gcp-storage-emulator>=2024.8.3",
            *EXPORT,
            *VIZ,
        ],
        # libtpu: training on TPU VMs, and `ssps-jax compile` for TPU slices on any host. Installing it
        # pins jax to the libtpu release it pairs with (make test installs jax[tpu]==the installed jax).
        "tpu": ["jax[tpu]>=0.10"],
        "cuda": ["jax[cuda12]>=0.10"],
        "cuda13": ["jax[cuda13]>=0.10"],
        "bench": ["torch>=2.3"],
        "export": EXPORT,  # plus jax2onnx, installed without its dependencies (above)
        "viz": VIZ,
    },
    entry_points={"console_scripts": ["ssps-jax=ssps_jax.cli:main"]},
)
