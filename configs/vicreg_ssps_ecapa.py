"""VICReg-SSPS, ECAPA-TDNN C=1024 on VoxCeleb2 (docs/method.md §5, §6.3; sslsv's vicreg_e-ecapa/ssps_kmeans_25k_uni-1).

configs/vicreg_ecapa.py for 100 epochs, then SSPS-Clustering (kmeans-repr,
K = 25 000, M = 1, Q' = 25 000) to epoch 120; the queues fill during epoch
99, and the pseudo-positive replaces the second view's projector output.
"""

from ssps_jax.config import base_config, paper_ecapa_tdnn, use_method, use_paper_ssps, use_voxceleb


def get_config():
    config = use_method(paper_ecapa_tdnn(use_voxceleb(base_config())), "vicreg")
    config.vicreg.projector_hidden_dim = 2048
    config.vicreg.projector_output_dim = 512
    return use_paper_ssps(config)
