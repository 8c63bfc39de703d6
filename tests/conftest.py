"""Shared fixtures: a small demo corpus, written once per test session."""

import os

# Before anything imports JAX: run on the CPU with 8 simulated devices, so that
# sharded code is exercised for real even when pytest is called directly.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest
from gcs import gcs_bucket  # noqa: F401  (a fixture: gs://bucket on a GCS emulator)

from data_pipelines import speaker_corpus
from data_pipelines.demo_corpus import corpus

# Big enough for the statistics the tests compute, small enough to write in seconds.
SMALL_CORPUS = corpus.DemoCorpusSpec(
    seed=7,
    train_speakers=16,
    test_speakers=4,
    sessions=3,
    utterances=5,
    min_seconds=2.0,
    max_seconds=4.5,
    background_files=2,
    background_seconds=3.0,
    rirs_per_room=1,
)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A small demo corpus in sslsv layout (read-only for tests)."""
    return corpus.write_demo_corpus(tmp_path_factory.mktemp("demo"), SMALL_CORPUS)


@pytest.fixture(scope="session")
def demo_source(demo_dir, tmp_path_factory):
    """The train split of `demo_dir` as a prepared TFDS ArrayRecord source."""
    builder = speaker_corpus.prepare(demo_dir / corpus.TRAIN_CSV, demo_dir, tmp_path_factory.mktemp("tfds"))
    return builder.as_data_source(split="train")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache for the whole test run, and fast compiles: the tests build the same programs many
    times, in this process, in the other xdist workers and in the subprocesses they start (the CLI, killed
    training drivers, the two-process runs), which inherit both through the environment. A size limit turns on
    JAX's file lock, so that processes sharing the folder never read an entry being written."""
    import jax

    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's base folder is inside the run's (pytest-N/popen-gwK): share the run's.
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla_cache"
    path.mkdir(exist_ok=True)
    settings = {
        "jax_compilation_cache_dir": str(path),
        "jax_persistent_cache_min_compile_time_secs": 0.5,
        "jax_compilation_cache_max_size": 64 << 30,  # never reached: set for the lock
        # JAX's switch for tests: XLA:CPU's LLVM at -O0 without its expensive passes. The tests' programs are tiny,
        # so compiling is most of their time: 30% less CPU for tests/test_vicreg.py (52 s against 74 s of user
        # time), numerics within every tolerance; the programs users run are untouched.
        "jax_disable_most_optimizations": True,
    }
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)


def tiny_config(demo_dir):
    """A SimCLR config small enough to compile and train in seconds on the CPU.

    Its ECAPA-TDNN has one SE-Res2Block of Res2Net scale 2 (the paper's: three of scale 8): compiling is most
    of a test's time, and a method's logic does not depend on the encoder's depth; half the compile time of
    three blocks of scale 8 (9 s against 19 s for a SimCLR step on 8 CPU devices). The tests of the encoder
    itself (test_models, test_torch_baseline) build several blocks of larger scales."""
    from ssps_jax.config import base_config

    c = base_config()
    c.model.mel.n_mels = 16
    c.model.encoder_dim = 16
    e = c.model.ecapa_tdnn
    e.channels, e.kernel_sizes, e.dilations, e.res2net_scale = (16, 16, 48), (5, 3, 1), (1, 2, 1), 2
    c.model.ecapa_tdnn.attention_channels = 8
    c.model.ecapa_tdnn.se_channels = 8
    c.data.train_csv = str(demo_dir / corpus.TRAIN_CSV)
    c.data.base_dir = str(demo_dir)
    c.data.crops.frame_seconds = 0.5
    c.data.workers = 0
    # The tiny kernels (hundreds of elements) have their update split over the devices, as the paper model's
    # large ones are (update_sharding.py): every training test runs that path.
    c.optim.split_update_min_size = 64
    c.train.epochs = 2
    c.train.global_batch_size = 16
    c.train.log_every_steps = 1
    c.train.checkpoint_every_steps = 8
    c.train.async_checkpoints = False
    c.eval.trials = (str(demo_dir / corpus.TRIALS),)
    c.eval.every_epochs = 0
    c.eval.batch_size = 16
    c.eval.min_bucket_seconds = 1.0
    c.eval.bucket_ratio = 2.0
    return c


def tiny_dino_config(demo_dir):
    """tiny_config as DINO: a small head, 1 s global and 0.5 s local crops, sslsv's DINO optimisation."""
    c = tiny_config(demo_dir)
    c.method = "dino"
    c.dino.head_hidden_dim = 32
    c.dino.head_bottleneck_dim = 8
    c.dino.head_output_dim = 64
    c.data.crops.mode = "dino"
    c.data.crops.global_seconds = 1.0
    c.data.crops.local_seconds = 0.5
    c.data.crops.reference_seconds = 1.0
    c.optim.optimizer = "sgd"
    c.optim.learning_rate = 0.2
    c.optim.weight_decay = 5e-5
    c.optim.decay_biases_and_norms = False
    c.optim.clip_grad_per_param = 3.0
    return c
