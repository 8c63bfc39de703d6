"""Shared fixtures: a small demo corpus, written once per test session."""

import os

# Before anything imports JAX: run on the CPU with 8 simulated devices, so that
# sharded code is exercised for real even when pytest is called directly.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

from data_pipelines import speaker_corpus
from data_pipelines.demo_corpus import corpus

# Big enough for the statistics the tests compute, small enough to write in seconds.
SMALL_SPEC = corpus.DemoCorpusSpec(
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
    return corpus.write_demo_corpus(tmp_path_factory.mktemp("demo"), SMALL_SPEC)


@pytest.fixture(scope="session")
def demo_source(demo_dir, tmp_path_factory):
    """The train split of `demo_dir` as a prepared TFDS ArrayRecord source."""
    builder = speaker_corpus.prepare(demo_dir / corpus.TRAIN_CSV, demo_dir, tmp_path_factory.mktemp("tfds"))
    return builder.as_data_source(split="train")
