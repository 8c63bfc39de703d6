"""MoCo, ECAPA-TDNN C=1024 on VoxCeleb2 (docs/method.md §6.5; sslsv's moco_e-ecapa/_moco).

The SSPS experiments' MoCo: no projector, temperature 0.03, a negative
queue of 65 536 keys per view, key network an EMA of the query network with
tau 0.999; 40 Hamming log-mels, 2 s crops with MUSAN + RIR augmentation,
Adam 1e-3 x 0.95 every 5 epochs, global batch 256, 100 epochs, evaluated on
VoxCeleb1-O. The queue is split over the devices (2 x 65 536 x 512 float32:
256 MiB in all).
"""

from ssps_jax.config import base_config, paper_ecapa_tdnn, use_method, use_voxceleb


def get_config():
    config = use_method(paper_ecapa_tdnn(use_voxceleb(base_config())), "moco")
    config.moco.projector = False
    config.moco.temperature = 0.03
    return config
