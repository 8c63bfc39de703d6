"""SimCLR, Fast ResNet-34 (sslsv `resnet34`: base width 16, self-attentive pooling) on VoxCeleb2.

sslsv's SSPS SimCLR configs (models/ssps/voxceleb2/simclr) use this encoder:
40 log-mels (Hamming), temperature 0.03, no projector, 100 epochs.
"""

from ssps_jax.config import base_config, use_voxceleb


def get_config():
    config = use_voxceleb(base_config())
    config.model.encoder = "resnet34"
    config.model.mel.n_mels = 40
    return config
