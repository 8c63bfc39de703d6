"""Learning-rate schedules (ssps_jax/optim.py) against their formulas, and the rescale from an epoch on."""

import numpy as np
import pytest

from data_pipelines.errors import ConfigError
from ssps_jax import config as config_lib
from ssps_jax.optim import learning_rate_schedule

STEPS_PER_EPOCH = 16


def _rates(optim, epochs=20):
    schedule = learning_rate_schedule(optim, STEPS_PER_EPOCH, epochs * STEPS_PER_EPOCH)
    return np.array([float(schedule(step)) for step in range(epochs * STEPS_PER_EPOCH)])


def test_step_schedule_is_sslsvs_and_rescales_from_an_epoch():
    optim = config_lib.base_config().optim
    step = np.arange(20 * STEPS_PER_EPOCH)
    sslsv = 1e-3 * 0.95 ** (step // (5 * STEPS_PER_EPOCH))  # x 0.95 every 5 epochs
    np.testing.assert_allclose(_rates(optim), sslsv, rtol=1e-6)

    optim.lr_scale_from_epoch, optim.lr_scale = 12, 0.1
    scaled = _rates(optim)
    np.testing.assert_allclose(scaled, np.where(step < 12 * STEPS_PER_EPOCH, 1, 0.1) * sslsv, rtol=1e-6)
    # From epoch 12 on, exactly the rates of the same schedule started at 1e-4 (what a continuation at
    # learning_rate 1e-4 computes), so such a run is reproduced bit for bit.
    plain = config_lib.base_config().optim
    plain.learning_rate = 1e-4
    np.testing.assert_array_equal(scaled[12 * STEPS_PER_EPOCH :], _rates(plain)[12 * STEPS_PER_EPOCH :])


@pytest.mark.parametrize("key, value", [("lr_scale", 0.0), ("lr_scale_from_epoch", -1)])
def test_bad_rescale_is_refused(demo_dir, key, value):
    config = config_lib.use_demo(config_lib.base_config(), str(demo_dir))
    config.optim[key] = value
    with pytest.raises(ConfigError, match=f"optim.{key}"):
        config_lib.validate(config, device_count=8)
