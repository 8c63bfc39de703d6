"""Barlow Twins-SSPS, ECAPA-TDNN C=1024 on VoxCeleb2 (docs/method.md §5, §6.8).

configs/barlow_twins_ecapa.py for 100 epochs, then SSPS-Clustering
(kmeans-repr, K = 25 000, M = 1, Q' = 25 000) to epoch 120; the queues fill
during epoch 99, and the pseudo-positive replaces the second view's projector
output, as in sslsv's siamese methods.
"""

from ssps_jax.config import base_config, paper_ecapa_tdnn, use_method, use_paper_ssps, use_voxceleb


def get_config():
    config = use_method(paper_ecapa_tdnn(use_voxceleb(base_config())), "barlow_twins")
    config.barlow_twins.projector_hidden_dim = 2048
    config.barlow_twins.projector_output_dim = 512
    return use_paper_ssps(config)
