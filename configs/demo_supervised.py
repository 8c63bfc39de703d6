"""Supervised AAM-softmax on the embedded demo corpus, sized for 2 CPU cores (`ssps-jax demo-methods`).

The demo's ECAPA-TDNN (C = 128, batch 64, sslsv's step learning-rate
schedule) trained on the 60 train speakers' labels for 18 epochs, as many as
the SSL demos train in all: the upper bound their EERs are read against.
"""

from ssps_jax.config import base_config, use_demo, use_method


def get_config():
    config = use_method(use_demo(base_config()), "supervised")
    config.supervised.classes = 60  # the default demo corpus's train speakers
    config.train.epochs = 18
    config.train.log_every_steps = 8
    config.train.checkpoint_every_steps = 1000
    config.optim.schedule = "step"
    config.eval.every_epochs = 2
    return config
