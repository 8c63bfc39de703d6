"""Oracle sampling (the headroom diagnostic): same speaker, other session, uniform over every shard;
anchors without such a row left alone; 8 devices == 1; refused on a corpus without labels."""

import jax
import numpy as np
import pytest
from method_checks import tiny_method_config
from scipy import stats
from test_ssps_sampling import CAPACITY, DIM, G, N, _sampler, _state

from data_pipelines.errors import ConfigError
from ssps_jax import config as config_lib
from ssps_jax import sharding
from ssps_jax.build import build
from ssps_jax.ssps import sampling

ORACLE = sampling.SamplingConfig("oracle")


def _labelled(mesh, pos_index, speaker, session):
    state = _state(mesh, pos_index)
    labels = {"speaker": np.asarray(speaker, np.int32), "session": np.asarray(session, np.int32)}
    return state.replace(**{k: jax.device_put(v, getattr(state, k).sharding) for k, v in labels.items()})


def _labels(rng):
    """20 speakers of 3 sessions each over the N indices; a few indices unlabelled."""
    speaker = rng.integers(0, 20, N)
    session = speaker * 3 + rng.integers(0, 3, N)
    speaker[:4] = session[:4] = -1
    return speaker, session


def _candidates(pos_index, speaker, session, anchor):
    """Queue rows an anchor may draw, by the definition (NumPy)."""
    if speaker[anchor] < 0:
        return np.array([], int)
    rows = np.arange(CAPACITY)
    ok = (pos_index >= 0) & (speaker[pos_index] == speaker[anchor]) & (session[pos_index] != session[anchor])
    return rows[ok]


def test_oracle_draws_only_same_speaker_other_session_and_leaves_the_others():
    rng = np.random.default_rng(0)
    speaker, session = _labels(rng)
    pos_index = rng.choice(N, CAPACITY, replace=False)
    pos_index[:5] = -1  # empty rows are never drawn
    state = _labelled(sharding.make_mesh(), pos_index, speaker, session)
    run = _sampler(sharding.make_mesh(), ORACLE)
    anchors = np.concatenate([[0, 1], rng.choice(np.arange(4, N), G - 2, replace=False)]).astype(np.int32)
    y = np.zeros((G, DIM), np.float32)
    candidates = [_candidates(pos_index, speaker, session, a) for a in anchors]
    has = np.array([len(c) > 0 for c in candidates])
    assert has.any() and not has.all()  # both kinds of anchor present
    for seed in range(10):
        row, index, mask = map(np.asarray, run(state, anchors, y, jax.random.PRNGKey(seed)))
        np.testing.assert_array_equal(mask, has)
        for b in np.flatnonzero(mask):
            assert row[b] in candidates[b]
        np.testing.assert_array_equal(index[mask], pos_index[row[mask]])
        assert np.all(index[~mask] == -1)


def test_oracle_is_uniform_over_candidates_on_all_shards():
    rng = np.random.default_rng(1)
    speaker = np.full(N, 1, np.int32)
    session = np.arange(N, dtype=np.int32)  # every index its own session
    speaker[100:] = 0
    rows = rng.choice(CAPACITY, 11, replace=False)  # speaker 0's rows, spread over devices
    pos_index = rng.choice(100, CAPACITY, replace=False)
    pos_index[rows] = 100 + np.arange(11)
    assert len({(r % G) // 2 for r in rows}) >= 5
    state = _labelled(sharding.make_mesh(), pos_index, speaker, session)
    run = _sampler(sharding.make_mesh(), ORACLE)
    anchors = np.arange(150, 150 + G, dtype=np.int32)  # speaker 0, sessions not in the queue
    y = np.zeros((G, DIM), np.float32)
    draws = np.concatenate([np.asarray(run(state, anchors, y, jax.random.PRNGKey(s))[0]) for s in range(200)])
    assert set(draws) == set(rows)
    counts = np.array([np.sum(draws == r) for r in rows])
    assert stats.chisquare(counts).pvalue > 1e-3  # 3200 draws over 11 rows


def test_oracle_on_8_devices_equals_1():
    rng = np.random.default_rng(2)
    speaker, session = _labels(rng)
    pos_index = rng.choice(N, CAPACITY, replace=False)
    anchors = rng.choice(N, G, replace=False).astype(np.int32)
    y = np.zeros((G, DIM), np.float32)
    results = {}
    for devices in (8, 1):
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), (sharding.DATA,))
        state = _labelled(mesh, pos_index, speaker, session)
        results[devices] = [np.asarray(x) for x in _sampler(mesh, ORACLE)(state, anchors, y, jax.random.PRNGKey(3))]
    for a, b in zip(results[8], results[1]):
        np.testing.assert_array_equal(a, b)


def test_oracle_is_refused_without_labels(demo_dir):
    config = tiny_method_config(demo_dir, "simclr")
    config.ssps.enabled = True
    config.ssps.start_epoch = 1
    config.ssps.sampling = "oracle"
    config.ssps.pos_queue_size = config.train.global_batch_size
    config_lib.validate(config, device_count=8)  # the kmeans keys are not oracle's
    mesh = sharding.make_mesh()
    with pytest.raises(ConfigError, match=r"config\.ssps\.sampling: oracle needs .* no Speaker / Session"):
        build(config, mesh, 64)
    speaker = np.arange(64, dtype=np.int32) % 16
    with pytest.raises(ConfigError, match=r"config\.ssps\.sampling: oracle .* lists no Session for any"):
        build(config, mesh, 64, labels=(speaker, np.full(64, -1, np.int32)))


def test_oracle_purity_gives_right_rows_at_its_rate_and_other_speakers_otherwise():
    """oracle_purity p: each anchor draws a right row with probability p, else a row of another speaker."""
    rng = np.random.default_rng(4)
    speaker, session = _labels(rng)
    pos_index = rng.choice(N, CAPACITY, replace=False)
    state = _labelled(sharding.make_mesh(), pos_index, speaker, session)
    anchors = rng.choice(np.arange(4, N), G, replace=False).astype(np.int32)
    y = np.zeros((G, DIM), np.float32)
    for purity in (0.0, 0.3):
        run = _sampler(sharding.make_mesh(), sampling.SamplingConfig("oracle", oracle_purity=purity))
        right = drawn = 0
        for seed in range(40):
            row, _, mask = map(np.asarray, run(state, anchors, y, jax.random.PRNGKey(seed)))
            for b in np.flatnonzero(mask):
                chosen = pos_index[row[b]]
                is_right = row[b] in _candidates(pos_index, speaker, session, anchors[b])
                assert is_right or (speaker[chosen] >= 0 and speaker[chosen] != speaker[anchors[b]])
                right += is_right
                drawn += 1
        assert drawn > 0.9 * 40 * G
        assert stats.binomtest(right, drawn, purity).pvalue > 1e-3, (purity, right, drawn)


@pytest.mark.parametrize(
    "sampling_name, purity, message",
    [("oracle", 1.5, r"oracle_purity: must be in \[0, 1\], got 1.5"), ("kmeans-repr", 0.5, "only oracle sampling")],
)
def test_bad_oracle_purity_is_refused(demo_dir, sampling_name, purity, message):
    config = tiny_method_config(demo_dir, "simclr")
    config.ssps.enabled = True
    config.ssps.sampling = sampling_name
    config.ssps.oracle_purity = purity
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(config, device_count=8)
