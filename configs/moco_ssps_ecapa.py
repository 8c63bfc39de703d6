"""MoCo-SSPS, ECAPA-TDNN C=1024 on VoxCeleb2 (docs/method.md §5, §6.5; sslsv's moco_e-ecapa/ssps_kmeans_25k_uni-1).

configs/moco_ecapa.py for 100 epochs, then SSPS-Clustering (kmeans-repr,
K = 25 000, M = 1, Q' = 25 000) to epoch 120: both keys of a covered anchor
are replaced by the pair in the positive queue (which holds 2 x 24 832 x 512
values).
"""

from ssps_jax.config import base_config, paper_ecapa_tdnn, use_method, use_paper_ssps, use_voxceleb


def get_config():
    config = use_method(paper_ecapa_tdnn(use_voxceleb(base_config())), "moco")
    config.moco.projector = False
    config.moco.temperature = 0.03
    return use_paper_ssps(config)
