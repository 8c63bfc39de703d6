"""SimCLR-SSPS variant SSPS-NN ("knn"): the nearest reference-queue row (M = 1) of Q' = 1 000 000 rows.

As sslsv's ssps_knn_uni-1: the reference queue is aligned with Q' (same
capacity and indices) and the anchor's own rows are excluded.
"""

from ssps_jax.config import base_config, paper_ecapa_tdnn, use_voxceleb


def get_config():
    config = paper_ecapa_tdnn(use_voxceleb(base_config()))
    config.train.epochs = 110
    config.ssps.enabled = True
    config.ssps.start_epoch = 100
    config.ssps.sampling = "knn"
    config.ssps.intra_sampling_size = 1
    config.ssps.pos_queue_size = 1_000_000
    return config
