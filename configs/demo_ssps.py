"""SimCLR-SSPS on the embedded demo corpus, sized for 2 CPU cores (`make demo`).

The demo's SimCLR (ECAPA-TDNN C = 128, batch 64) for `ssps.start_epoch`
epochs, then SSPS-Clustering. The learning-rate schedule is sslsv's step
schedule, which does not depend on the total number of epochs, so that a
run can be continued with SSPS or without it (the fair baseline,
`--config.ssps.enabled=False`) from the same checkpoint.
"""

from ssps_jax.config import base_config, use_demo, use_demo_ssps


def get_config():
    config = use_demo(base_config())
    return use_demo_ssps(config)
