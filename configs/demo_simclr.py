"""SimCLR on the embedded demo corpus, sized for 2 CPU cores.

A narrow ECAPA-TDNN (C = 128) on 40 log-mels, 2 s crops, global batch 64,
12 epochs with a cosine learning rate.
"""

from ssps_jax.config import base_config, use_demo


def get_config():
    config = use_demo(base_config())
    config.train.epochs = 12
    config.train.log_every_steps = 5
    config.train.checkpoint_every_steps = 100
    config.optim.schedule = "cosine"
    config.eval.every_epochs = 4
    config.eval.at_start = True
    return config
