"""SimCLR on the embedded demo corpus, sized for 2 CPU cores (`make demo`).

A narrow ECAPA-TDNN (C = 128) on 40 log-mels, 2 s crops, global batch 64.
"""

from ssps_jax.config import base_config


def get_config():
    config = base_config()
    config.model.encoder = "ecapa_tdnn"
    config.model.encoder_dim = 128
    config.model.ecapa_tdnn.channels = (128, 128, 128, 128, 384)
    config.model.ecapa_tdnn.attention_channels = 64
    config.model.ecapa_tdnn.se_channels = 32
    config.data.train_csv = "demo_data/demo_train.csv"
    config.data.base_dir = "demo_data"
    config.data.workers = 1
    config.train.epochs = 12
    config.train.global_batch_size = 64
    config.train.log_every_steps = 5
    config.train.checkpoint_every_steps = 100
    config.optim.schedule = "cosine"
    config.eval.trials = ("demo_data/demo_trials.txt",)
    config.eval.every_epochs = 4
    config.eval.at_start = True
    config.eval.batch_size = 32
    config.eval.bucket_ratio = 1.5
    config.eval.min_bucket_seconds = 3.0
    return config
