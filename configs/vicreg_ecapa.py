"""VICReg, ECAPA-TDNN C=1024 on VoxCeleb2 (docs/method.md §6.3; sslsv's vicreg_e-ecapa/_vicreg).

sslsv's VICReg weights (invariance 1, variance 1, covariance 0.04) with the
SSPS experiments' 2048-512 projector, 40 Hamming log-mels, 2 s crops with
MUSAN + RIR augmentation, Adam 1e-3 x 0.95 every 5 epochs, global batch
256, 100 epochs, evaluated on VoxCeleb1-O.
"""

from ssps_jax.config import base_config, paper_ecapa_tdnn, use_method, use_voxceleb


def get_config():
    config = use_method(paper_ecapa_tdnn(use_voxceleb(base_config())), "vicreg")
    config.vicreg.projector_hidden_dim = 2048
    config.vicreg.projector_output_dim = 512
    return config
