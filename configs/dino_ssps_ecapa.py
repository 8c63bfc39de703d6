"""DINO-SSPS, ECAPA-TDNN C=1024 on VoxCeleb2 (docs/method.md §5-§6; sslsv's dino_e-ecapa/ssps_kmeans_25k_uni-1).

80 log-mels with a Hann window, 2 global 4 s + 4 local 2 s crops, global
batch 128, SGD 0.2; 80 epochs of plain DINO, then SSPS-Clustering
(kmeans-repr, K = 25 000, M = 1, Q' = 25 000) to epoch 100. The
teacher-momentum and learning-rate schedules span all 100 epochs, as in
sslsv (whose plain run stops at epoch 80). The two 65 536-wide positive
queues hold 2 x 24 960 x 65 536 values: 12.2 GiB in float32, 1.5 GiB per
device on 8 devices (`--config.ssps.queue_dtype=bfloat16` halves that).
"""

from ssps_jax.config import base_config, paper_ecapa_tdnn, use_method, use_voxceleb


def get_config():
    config = use_method(paper_ecapa_tdnn(use_voxceleb(base_config())), "dino")
    config.model.mel.n_mels = 80
    config.model.mel.window = "hann"
    config.train.global_batch_size = 128
    config.train.epochs = 100
    config.ssps.enabled = True
    config.ssps.start_epoch = 80
    config.ssps.sampling = "kmeans-repr"
    config.ssps.kmeans_clusters = 25000
    config.ssps.inter_sampling_size = 1
    config.ssps.pos_queue_size = 25000
    return config
