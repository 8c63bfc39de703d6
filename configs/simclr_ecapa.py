"""SimCLR, ECAPA-TDNN C=1024 on VoxCeleb2 (the SSPS paper's SimCLR baseline; docs/method.md §6-§8).

40 log-mels with a Hamming window (sslsv's defaults; 22.5 M encoder
parameters), 2 s crops with MUSAN + RIR augmentation, temperature 0.03 and
no projector, Adam 1e-3 x 0.95 every 5 epochs, global batch 256, 100 epochs,
evaluated on VoxCeleb1-O. Paths follow the layout of docs/data.md "VoxCeleb from a
manual download"; override them with --config.data.base_dir=... etc.
"""

from ssps_jax.config import base_config, paper_ecapa_tdnn, use_voxceleb


def get_config():
    return paper_ecapa_tdnn(use_voxceleb(base_config()))
