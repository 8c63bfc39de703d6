"""SwAV, ECAPA-TDNN C=1024 on VoxCeleb2 (docs/method.md §6.6; sslsv's swav_e-ecapa/_swav).

sslsv's SwAV (3 000 prototypes, temperature 0.1, 3 Sinkhorn-Knopp
iterations with epsilon 0.05, a 3 840-row feature queue from epoch 15,
prototypes frozen in epoch 0) with the SSPS experiments' 2048-512 projector;
40 Hamming log-mels, 2 s crops with MUSAN + RIR augmentation, Adam 1e-3 x
0.95 every 5 epochs, global batch 256, 100 epochs, evaluated on VoxCeleb1-O.
"""

from ssps_jax.config import base_config, paper_ecapa_tdnn, use_method, use_voxceleb


def get_config():
    config = use_method(paper_ecapa_tdnn(use_voxceleb(base_config())), "swav")
    config.swav.projector_hidden_dim = 2048
    config.swav.projector_output_dim = 512
    return config
