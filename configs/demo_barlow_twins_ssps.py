"""Barlow Twins-SSPS on the embedded demo corpus, sized for 2 CPU cores (`ssps-jax demo-methods`).

configs/demo_ssps.py's setting (ECAPA-TDNN C = 128, batch 64, sslsv's step
learning-rate schedule, SSPS-Clustering from epoch 12 to 18) with Barlow
Twins and a 512-128 projector. `--config.ssps.enabled=False` trains plain
Barlow Twins.
"""

from ssps_jax.config import base_config, use_demo, use_demo_ssps, use_method


def get_config():
    config = use_method(use_demo(base_config()), "barlow_twins")
    config.barlow_twins.projector_hidden_dim = 512
    config.barlow_twins.projector_output_dim = 128
    return use_demo_ssps(config)
