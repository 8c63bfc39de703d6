# One command to run the tests, one to run the demo. Both create and fill the
# virtual environment .venv on first use (a machine with Python 3.11+ is enough: jax 0.10 needs it).
PYTHON ?= python3
TORCH ?= torch==2.13.0
# The ONNX export's converter, without its dependencies: they would downgrade orbax-checkpoint (see setup.py's EXPORT).
JAX2ONNX ?= jax2onnx==0.17.1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tests run JAX on the CPU with 8 simulated devices, so sharding is real.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu

.PHONY: test lint demo venv clean gpu-wheels gpu-run

# torch is installed first, pinned to the CPU build these machines carry (a bare
# "torch" would pull the newest CUDA build, several GB); the test extra's range accepts it.
# Then libtpu, for the JAX version installed (jax[tpu]==that version): the TPU tests and
# `ssps-jax compile` compile for TPU slices on this CPU host. Last, jax2onnx with --no-deps
# (setup.py says why; the test extra has what it needs): after it, no install re-checks its pins.
$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet "jax[tpu]==$$($(BIN)/python -c 'import jax; print(jax.__version__)')"
	$(BIN)/python -m pip install --quiet --no-deps "$(JAX2ONNX)"
	touch $(STAMP)

venv: $(STAMP)

# Two pytest workers (pytest-xdist), each test file whole on one (its module fixtures are built
# once): most of a test's time is XLA compiling, one thread, so 2 cores run 2 files at once.
PYTEST_ARGS ?= -n 2 --dist loadfile
test: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest tests $(PYTEST_ARGS)

# The embedded corpus (demo_data/), then the framework alone, continued with SSPS, without it
# (the fair baseline) and with oracle positives (the headroom of any positive sampling), in
# workdirs/demo_<DEMO>/; prints the comparison table. DEMO=simclr (default) or DEMO=dino.
# Rerunning resumes.
DEMO ?= simclr
DEMO_CONFIG := $(if $(filter dino,$(DEMO)),configs/demo_dino_ssps.py,configs/demo_ssps.py)
demo: $(STAMP)
	$(BIN)/ssps-jax demo --data demo_data --workdir workdirs/demo_$(DEMO) --config $(DEMO_CONFIG) --oracle

# The lent GPU machine (Python 3.12, JAX 0.11 for CUDA, flax, optax, orbax, no package registry) lacks
# these: `make gpu-wheels` here downloads them into .whl/ (ignored, ~12 MB; promise has no wheel, so it
# is built). There, with .whl carried, `make gpu-run` installs them into /tmp/site and runs
# `ssps-jax bench-run` (a real training run per augmentation path, ~6 min; docs/benchmarks.md).
GPU_WHEELS := grain==0.2.18 ml-collections==1.1.0 tensorflow-datasets==4.9.10 tensorflow-metadata immutabledict \
	array-record==0.8.6 soundfile==0.14.0 tensorboardX toml portpicker librosa==0.11.0 audioread soxr pooch \
	decorator cffi pycparser platformdirs importlib_resources dm-tree simple_parsing docstring-parser termcolor
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	$(PYTHON) -m pip wheel --quiet --no-deps promise -w .whl

# On the GPU machine (its own python3): RUN_ARGS are bench-run's flags, OUT where the log and JSON go.
RUN_DIR ?= /tmp/bench_run
RUN_ARGS ?=
gpu-run: SHELL := /bin/bash
gpu-run:
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
	nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
	mkdir -p "$${OUT:-results}"
	set -o pipefail; PYTHONPATH=/tmp/site:$$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false \
		python3 -m ssps_jax.cli bench-run $(RUN_DIR) --json "$${OUT:-results}/bench_run.json" $(RUN_ARGS) \
		2>&1 | tee "$${OUT:-results}/bench_run.log"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
