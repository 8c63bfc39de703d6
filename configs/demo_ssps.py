"""SimCLR-SSPS on the embedded demo corpus, sized for 2 CPU cores (`make demo`).

The demo's SimCLR (ECAPA-TDNN C = 128, batch 64) for `ssps.start_epoch`
epochs, then SSPS-Clustering. The learning-rate schedule is sslsv's step
schedule, which does not depend on the total number of epochs, so that a
run can be continued with SSPS or without it (the fair baseline,
`--config.ssps.enabled=False`) from the same checkpoint.
"""

from ssps_jax.config import base_config, use_demo


def get_config():
    config = use_demo(base_config())
    config.train.epochs = 18
    config.train.log_every_steps = 8
    config.train.checkpoint_every_steps = 1000
    config.optim.schedule = "step"
    config.eval.every_epochs = 2
    config.ssps.enabled = True
    config.ssps.start_epoch = 12
    config.ssps.sampling = "kmeans-repr"
    config.ssps.kmeans_clusters = 180
    config.ssps.inter_sampling_size = 1
    config.ssps.pos_queue_size = 1024
    return config
