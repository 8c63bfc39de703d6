"""DINO, ECAPA-TDNN C=1024 on VoxCeleb2: the paper's DINO baseline (configs/dino_ssps_ecapa.py without SSPS).

80 log-mels (Hann), 2 global 4 s + 4 local 2 s crops, batch 128, SGD 0.2
with weight decay 5e-5 (not on biases and norms), per-tensor gradient
clipping at 3.0, head 2048-2048-256 -> 65 536, 100 epochs; evaluation with
the teacher encoder.
"""

from ssps_jax.config import base_config, paper_ecapa_tdnn, use_method, use_voxceleb


def get_config():
    config = use_method(paper_ecapa_tdnn(use_voxceleb(base_config())), "dino")
    config.model.mel.n_mels = 80
    config.model.mel.window = "hann"
    config.train.global_batch_size = 128
    config.train.epochs = 100
    return config
