"""BYOL-SSPS, ECAPA-TDNN C=1024 on VoxCeleb2 (docs/method.md §5, §6.7).

configs/byol_ecapa.py for 100 epochs, then SSPS-Clustering (kmeans-repr,
K = 25 000, M = 1, Q' = 25 000) to epoch 120, as the SSPS papers run their
other frameworks; the queues fill during epoch 99, and the pseudo-positive
replaces both target projections (sslsv's BYOL has no SSPS: this follows its
MoCo, the other framework whose positive branch is a momentum network's).
"""

from ssps_jax.config import base_config, paper_ecapa_tdnn, use_method, use_paper_ssps, use_voxceleb


def get_config():
    config = use_method(paper_ecapa_tdnn(use_voxceleb(base_config())), "byol")
    config.byol.projector_hidden_dim = 2048
    config.byol.projector_output_dim = 512
    return use_paper_ssps(config)
