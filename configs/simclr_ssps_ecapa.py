"""SimCLR-SSPS, ECAPA-TDNN C=1024 on VoxCeleb2: the paper's main setting (docs/method.md §5).

100 epochs of plain SimCLR (configs/simclr_ecapa.py), then SSPS-Clustering
("kmeans-repr") from epoch 100 to 120: K = 25 000 prototypes, M = 1 (the
nearest other cluster, "uni-1"), positive queue Q' = 25 000. The queues fill
during epoch 99. Training from scratch with this config runs the whole
schedule; to start from a finished simclr_ecapa run, copy its workdir and
train this config on the copy.
"""

from ssps_jax.config import base_config, paper_ecapa_tdnn, use_paper_ssps, use_voxceleb


def get_config():
    config = paper_ecapa_tdnn(use_voxceleb(base_config()))
    return use_paper_ssps(config)
