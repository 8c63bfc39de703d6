"""Barlow Twins, ECAPA-TDNN C=1024 on VoxCeleb2 (docs/method.md §6.8).

sslsv's models/ssl/voxceleb2/barlowtwins/barlowtwins_proj-2048-BN-R-2048-BN-R-512_lambda-0.005 on the
SSPS papers' encoder.

sslsv's Barlow Twins (lambda 0.005, loss scale 0.025) with the 2048-512
projector of the SSPS experiments' siamese methods, 40 Hamming log-mels, 2 s
crops with MUSAN + RIR augmentation, Adam 1e-3 x 0.95 every 5 epochs, global
batch 256, 100 epochs, evaluated on VoxCeleb1-O.
"""

from ssps_jax.config import base_config, paper_ecapa_tdnn, use_method, use_voxceleb


def get_config():
    config = use_method(paper_ecapa_tdnn(use_voxceleb(base_config())), "barlow_twins")
    config.barlow_twins.projector_hidden_dim = 2048
    config.barlow_twins.projector_output_dim = 512
    return config
