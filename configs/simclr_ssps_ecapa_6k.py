"""SimCLR-SSPS variant: K = 6 000 prototypes, M = 0 (draw within the anchor's own cluster), Q' = 6 000."""

from ssps_jax.config import base_config, paper_ecapa_tdnn, use_voxceleb


def get_config():
    config = paper_ecapa_tdnn(use_voxceleb(base_config()))
    config.train.epochs = 110
    config.ssps.enabled = True
    config.ssps.start_epoch = 100
    config.ssps.sampling = "kmeans-repr"
    config.ssps.kmeans_clusters = 6000
    config.ssps.inter_sampling_size = 0
    config.ssps.pos_queue_size = 6000
    return config
