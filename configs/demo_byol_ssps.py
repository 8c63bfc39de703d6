"""BYOL-SSPS on the embedded demo corpus, sized for 2 CPU cores (`ssps-jax demo-methods`).

configs/demo_ssps.py's setting (ECAPA-TDNN C = 128, batch 64, sslsv's step
learning-rate schedule, SSPS-Clustering from epoch 12 to 18) with BYOL: a
512-128 projector, a 512-wide predictor, the target network's tau from
0.996 to 1 over the 18 epochs. `--config.ssps.enabled=False` trains plain BYOL.
"""

from ssps_jax.config import base_config, use_demo, use_demo_ssps, use_method


def get_config():
    config = use_method(use_demo(base_config()), "byol")
    config.byol.projector_hidden_dim = 512
    config.byol.projector_output_dim = 128
    config.byol.predictor_hidden_dim = 512
    return use_demo_ssps(config)
