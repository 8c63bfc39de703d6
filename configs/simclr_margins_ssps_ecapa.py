"""SimCLR-SSPS with CurricularFace margins, ECAPA-TDNN C=1024 on VoxCeleb2 (docs/method.md §6.1).

After the authors' grid, sslsv's models/ssps/voxceleb2/simclr_margins_e-ecapa/ssps_curricularface_m-0.1:
SimCLR without projector, NT-Xent with CurricularFace's margin m = 0.1 at
scale 33.3 (temperature 0.03), SSPS-Clustering (kmeans-repr, K = 25 000,
M = 1) from epoch 100 to 120 with a positive queue of the whole of VoxCeleb2
(Q' = 1 092 009 rows, rounded down to 1 091 840, a multiple of the batch;
the queues fill during epoch 99). The grid continues a plain SimCLR
checkpoint of 100 epochs; this config trains the margin from epoch 0 (to
match the grid, train configs/simclr_ecapa.py first and continue a copy of
its workdir with `--config.simclr.loss=nt-xent-curricularface` and this
config's SSPS keys). Other margins: `--config.simclr.loss=nt-xent-cosface`
(-arcface, -sphereface, -magface, -adaface) and `simclr.margin`, the grid's
0.05, 0.1 and 0.2.
"""

from ssps_jax.config import base_config, paper_ecapa_tdnn, use_paper_ssps, use_voxceleb


def get_config():
    config = use_paper_ssps(paper_ecapa_tdnn(use_voxceleb(base_config())))
    config.simclr.loss = "nt-xent-curricularface"
    config.simclr.margin = 0.1
    config.ssps.pos_queue_size = 1_092_009  # the grid's: every VoxCeleb2 utterance
    return config
