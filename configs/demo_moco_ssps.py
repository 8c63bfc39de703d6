"""MoCo-SSPS on the embedded demo corpus, sized for 2 CPU cores (`ssps-jax demo-methods`).

configs/demo_ssps.py's setting (ECAPA-TDNN C = 128, batch 64, sslsv's step
learning-rate schedule, SSPS-Clustering from epoch 12 to 18) with the SSPS
experiments' MoCo (no projector, temperature 0.03, tau 0.999) and a negative
queue of 1 024 keys per view (a little under one epoch of the 1 080-utterance
corpus). `--config.ssps.enabled=False` trains plain MoCo.
"""

from ssps_jax.config import base_config, use_demo, use_demo_ssps, use_method


def get_config():
    config = use_method(use_demo(base_config()), "moco")
    config.moco.projector = False
    config.moco.temperature = 0.03
    config.moco.queue_size = 1024
    return use_demo_ssps(config)
