"""DINO-SSPS on the embedded demo corpus, sized for 2 CPU cores (`make demo DEMO=dino`).

The demo's ECAPA-TDNN (C = 128) with sslsv's DINO recipe (multi-crop,
SGD 0.2, per-tensor clipping, EMA teacher, centring), a narrower head
(512-512-128 -> 4096 instead of 2048-2048-256 -> 65 536), shorter crops
(2 x 3 s global, 4 x 1.5 s local, 3 s reference) and batch 64, to fit 2 CPU
cores: DINO for `ssps.start_epoch` epochs, then SSPS-Clustering. Schedules span
`train.epochs`, so the same checkpoint continues with SSPS or without it
(`--config.ssps.enabled=False`, the fair baseline).
"""

from ssps_jax.config import base_config, use_demo, use_method


def get_config():
    config = use_method(use_demo(base_config()), "dino")
    config.dino.head_hidden_dim = 512
    config.dino.head_bottleneck_dim = 128
    config.dino.head_output_dim = 4096
    config.data.crops.global_seconds = 3.0
    config.data.crops.local_seconds = 1.5
    config.data.crops.reference_seconds = 3.0
    config.train.epochs = 12
    config.train.log_every_steps = 8
    config.train.checkpoint_every_steps = 1000
    config.eval.every_epochs = 2
    config.ssps.enabled = True
    config.ssps.start_epoch = 8
    config.ssps.sampling = "kmeans-repr"
    config.ssps.kmeans_clusters = 180
    config.ssps.inter_sampling_size = 1
    config.ssps.pos_queue_size = 1024
    return config
