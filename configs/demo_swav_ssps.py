"""SwAV-SSPS on the embedded demo corpus, sized for 2 CPU cores (`ssps-jax demo-methods`).

configs/demo_ssps.py's setting (ECAPA-TDNN C = 128, batch 64, sslsv's step
learning-rate schedule, SSPS-Clustering from epoch 12 to 18) with SwAV: a
512-128 projector, 300 prototypes (sslsv's 3 000 are more than the corpus's
1 080 utterances), a 512-row feature queue from epoch 4, sslsv's Sinkhorn-Knopp
and temperature. `--config.ssps.enabled=False` trains plain SwAV.
"""

from ssps_jax.config import base_config, use_demo, use_demo_ssps, use_method


def get_config():
    config = use_method(use_demo(base_config()), "swav")
    config.swav.projector_hidden_dim = 512
    config.swav.projector_output_dim = 128
    config.swav.prototypes = 300
    config.swav.queue_size = 512
    config.swav.queue_start_epoch = 4
    return use_demo_ssps(config)
