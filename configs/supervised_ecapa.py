"""Supervised AAM-softmax, ECAPA-TDNN C=1024 on VoxCeleb2: the upper bound of the SSL tables (docs/method.md §6.4).

sslsv's supervised baseline (models/ssl/voxceleb2/supervised/
supervised_enc-ECAPATDNN-1024_loss-AAM_s-30_m-0.2): the 5 994 speakers of
VoxCeleb2 dev, AAM-softmax with margin 0.2 and scale 30, one 2 s crop per
utterance with MUSAN + RIR augmentation, Adam 1e-3 x 0.95 every 5 epochs,
global batch 256, 100 epochs, evaluated on VoxCeleb1-O like every other
method. The speaker labels come from the train split's index file.
"""

from ssps_jax.config import base_config, paper_ecapa_tdnn, use_method, use_voxceleb


def get_config():
    config = use_method(paper_ecapa_tdnn(use_voxceleb(base_config())), "supervised")
    config.supervised.classes = 5994
    return config
