"""The PyTorch baseline (ssps_jax/bench/torch_baseline) computes the same function as our JAX step.

Our side is the production step: `make_train_step` (simclr_step with SSPS)
on a one-device mesh with optax.adam(1e-3). Both start from our Flax
initialisation, copied into torch with `load_flax_variables`, and see the
same waveforms and dataset indices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch  # the test extra requires it: the baseline's equivalence is part of the suite
from conftest import tiny_config

from ssps_jax import sharding
from ssps_jax.bench.torch_baseline import (
    KMeansReprSSPS,
    LogMel,
    SimCLRTrainStep,
    build_simclr,
    flax_state_dict,
    load_flax_variables,
    nearest_clusters,
    run_benchmark,
    spherical_kmeans,
)
from ssps_jax.features import LogMelConfig, log_mel
from ssps_jax.methods import simclr
from ssps_jax.ssps import kmeans as jax_kmeans
from ssps_jax.ssps.lifecycle import SSPS
from ssps_jax.ssps.sampling import SamplingConfig
from ssps_jax.ssps.state import SSPSState
from ssps_jax.train_state import init_train_state, partition_specs
from ssps_jax.train_step import make_train_step

B = 8  # global batch
N = 40  # dataset size: reference queue of 40 rows, 5 steps per epoch
POS_ROWS = 16  # positive queue: 2 blocks of B
K = 8
VIEW_SAMPLES, REFERENCE_SAMPLES = 8000, 12000  # 0.5 s views (51 frames), 0.75 s reference crop
FRAMES = 1 + VIEW_SAMPLES // 160
LR = 1e-3

# The hand-built clustering: anchors 0-5 sit in clusters 0-5, anchors 6 and 7 in none;
# every cluster's single neighbour is c + 3 (mod K); the positive queue holds exactly one
# row of each of the clusters 3-7 (dataset index 8 + c) and rows of unassigned indices.
ANCHOR_CLUSTER = {a: a for a in range(6)}
NEIGHBOUR = [(c + 3) % K for c in range(K)]
QUEUED_CLUSTERS = (3, 4, 5, 6, 7)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    c = tiny_config(tmp_path_factory.mktemp("unused"))  # paths are never read
    c.train.global_batch_size = B
    # Smaller still, to compile fast, yet with every module kind: a widening SE-Res2Net
    # block (with its shortcut convolution), a second one, MFA over both.
    e = c.model.ecapa_tdnn
    e.channels, e.kernel_sizes, e.dilations, e.res2net_scale = (8, 16, 16, 48), (5, 3, 3, 1), (1, 2, 3, 1), 4
    return c


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {
        "views": rng.normal(size=(B, 2, VIEW_SAMPLES)).astype(np.float32),
        "reference": rng.normal(size=(B, REFERENCE_SAMPLES)).astype(np.float32),
        "index": rng.permutation(B).astype(np.int32),  # anchors 0..7 in a shuffled order
    }


def _positive_queue():
    rng = np.random.default_rng(1)
    index = rng.permutation(np.arange(8, 8 + POS_ROWS)).astype(np.int32)
    emb = rng.normal(size=(POS_ROWS, 16)).astype(np.float32)
    return index, emb / np.linalg.norm(emb, axis=1, keepdims=True)


def _assignment():
    assignment = np.full(N, -1, np.int32)
    for anchor, cluster in ANCHOR_CLUSTER.items():
        assignment[anchor] = cluster
    for cluster in QUEUED_CLUSTERS:
        assignment[8 + cluster] = cluster
    return assignment


def _expected_rows(anchors, pos_index):
    """The positive-queue row each anchor must get, from the construction alone (-1: none)."""
    rows = []
    for a in anchors:
        target = NEIGHBOUR[ANCHOR_CLUSTER[a]] if a in ANCHOR_CLUSTER else None
        rows.append(int(np.flatnonzero(pos_index == 8 + target)[0]) if target in QUEUED_CLUSTERS else -1)
    return np.array(rows)


def _jax_queues(clustered: bool) -> SSPSState:
    pos_index, pos_emb = _positive_queue()
    return SSPSState(
        ref_index=jnp.full((N // B, B), -1, jnp.int32),
        ref_emb=jnp.zeros((N // B, B, 16)),
        pos_index=jnp.asarray(pos_index.reshape(POS_ROWS // B, B)),
        pos_emb=jnp.asarray(pos_emb.reshape(1, POS_ROWS // B, B, 16)),
        assignment=jnp.asarray(_assignment()),
        centroids=jnp.zeros((K, 16)),
        neighbours=jnp.asarray(np.array(NEIGHBOUR, np.int32)[:, None]),
        clustered_epoch=jnp.array(1 if clustered else -1, jnp.int32),
        speaker=jnp.full((N,), -1, jnp.int32),
        session=jnp.full((N,), -1, jnp.int32),
    )


def _torch_queues(device="cpu") -> KMeansReprSSPS:
    queues = KMeansReprSSPS(
        dataset_size=N,
        global_batch=B,
        ref_dim=16,
        pos_dim=16,
        pos_queue_size=POS_ROWS,
        clusters=K,
        iterations=10,
        sampling=SamplingConfig(inter_size=1),
        device=device,
    )
    pos_index, pos_emb = _positive_queue()
    queues.pos_index.copy_(torch.from_numpy(pos_index))
    queues.pos_emb.copy_(torch.from_numpy(pos_emb))
    queues.assignment.copy_(torch.from_numpy(_assignment()))
    queues.neighbours = [[n] for n in NEIGHBOUR]
    return queues


@pytest.fixture(scope="module")
def ours(config, batch):
    """Our step from our initial state: {'initial', 'plain', 'ssps'} -> (state after the step, metrics)."""
    model = simclr.METHOD.build_model(config, bn_axis_name=sharding.DATA)
    tx = optax.adam(LR)
    mesh = sharding.make_mesh(jax.devices()[:1])
    example = jax.ShapeDtypeStruct((2, 2, VIEW_SAMPLES), jnp.float32)
    initial = jax.device_get(init_train_state(model, tx, 0, example, mesh))
    ssps = SSPS(SamplingConfig(inter_size=1), start_epoch=1, steps_per_epoch=N // B)
    # Step N // B: first step of epoch 1 (SSPS on), writing queue block 0.
    states = {
        name: initial.replace(step=jnp.array(N // B, jnp.int32), ssps=_jax_queues(clustered))
        for name, clustered in (("plain", False), ("ssps", True))
    }
    settings = simclr.SimCLRSettings(config.simclr.temperature)
    step = make_train_step(simclr.METHOD, model, tx, mesh, settings, partition_specs(states["ssps"]), ssps)
    results = {"initial": initial}
    for name, state in states.items():  # one program: without a clustering for the epoch, nothing is replaced
        state = jax.device_put(state, sharding.replicated(mesh))
        after, metrics = step(state, sharding.global_batch(batch, mesh), jax.random.PRNGKey(0))
        results[name] = (jax.device_get(after), jax.device_get(metrics))
    return results


def _torch_step(config, initial, batch, queues=None):
    torch.manual_seed(0)
    model = build_simclr(config)
    load_flax_variables(model, {"params": initial.params, "batch_stats": initial.batch_stats})
    step = SimCLRTrainStep(model, config.simclr.temperature, queues, LR)
    loss = step(*(torch.from_numpy(batch[k]) for k in ("views", "reference")), torch.from_numpy(batch["index"]).long())
    return model, float(loss)


def _relative(a, b):
    return abs(a - b) / abs(b)


def test_state_dict_keys_are_the_sslsv_names_of_our_variables(config, ours):
    initial = ours["initial"]
    theirs = {k: tuple(v.shape) for k, v in build_simclr(config).state_dict().items()}
    mine = {
        k: v.shape for k, v in flax_state_dict({"params": initial.params, "batch_stats": initial.batch_stats}).items()
    }
    assert {k for k in theirs if not k.endswith("num_batches_tracked")} == set(mine)
    assert all(theirs[k] == mine[k] for k in mine)
    assert mine["encoder.blocks.0.conv.conv.weight"] == (8, 16, 5)  # (out, in, kernel): transposed from Flax
    assert mine["encoder.blocks.1.shortcut.conv.weight"] == (16, 8, 1)
    with pytest.raises(KeyError, match="missing"):
        load_flax_variables(build_simclr(config), {"params": initial.params})  # no running statistics


def test_log_mel_matches_ours():
    mel = LogMelConfig(n_mels=24, window="hann")
    wave = np.random.default_rng(2).normal(size=(3, 5000)).astype(np.float32)
    expected, _ = log_mel(jnp.asarray(wave), mel)
    got = LogMel(mel)(torch.from_numpy(wave)).numpy().transpose(0, 2, 1)
    assert got.shape == expected.shape == (3, 1 + 5000 // 160, 24)
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-4)


def test_simclr_step_matches_ours(config, ours, batch):
    initial, (after, metrics) = ours["initial"], ours["plain"]
    assert float(metrics["ssps/coverage"]) == 0  # no clustering for this epoch: a plain SimCLR step
    model, loss = _torch_step(config, initial, batch)
    assert _relative(loss, float(metrics["loss"])) < 1e-4

    # Gradients are far more sensitive than the loss: the two log-mel front ends differ by float32
    # rounding (~1e-5), which this tiny model at temperature 0.03 turns into gradient differences
    # of up to ~1e-2 of the largest gradient entry. A wrong term or layer changes them by far more.
    grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
    grad_norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    assert _relative(grad_norm, float(metrics["grad_norm"])) < 3e-3

    # One Adam step from the same gradients: each parameter moves by about lr * sign(gradient),
    # so compare where the gradient is clearly above that noise (its sign is then certain).
    before = flax_state_dict({"params": initial.params})
    expected = flax_state_dict({"params": after.params})
    got = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    largest = max(np.abs(g).max() for g in grads.values())
    compared = total = 0
    for key, g in grads.items():
        moved, expected_move = got[key] - before[key], expected[key] - before[key]
        assert np.abs(moved).max() <= LR * (1 + 1e-3)  # Adam's first step is at most lr
        clear = np.abs(g) > 0.05 * largest
        np.testing.assert_allclose(moved[clear], expected_move[clear], atol=1e-6)
        compared, total = compared + clear.sum(), total + g.size
    assert compared > 0.1 * total

    # BatchNorm running statistics after two training-mode views: the means agree; PyTorch puts
    # the unbiased batch variance (n / (n - 1)) in running_var where Flax puts the biased one.
    stats = flax_state_dict({"batch_stats": after.batch_stats})
    for key, value in stats.items():
        if key.endswith("running_mean"):
            np.testing.assert_allclose(got[key], value, atol=1e-5)
        else:
            n = B if key.startswith("encoder.asp_bn") else B * FRAMES
            start = 0.81  # running_var starts at 1 and decays by 0.9 per view
            np.testing.assert_allclose(got[key] - start, (value - start) * n / (n - 1), rtol=1e-4, atol=1e-6)


def test_ssps_step_picks_the_same_rows_and_matches_ours(config, ours, batch):
    initial, (after, metrics) = ours["initial"], ours["ssps"]
    queues = _torch_queues()
    pos_index, pos_emb = _positive_queue()
    rows = queues.sample(torch.from_numpy(batch["index"]).long()).numpy()
    expected_rows = _expected_rows(batch["index"], pos_index)
    np.testing.assert_array_equal(rows, expected_rows)
    assert 0 < np.sum(expected_rows >= 0) < B  # some anchors replaced, some keep their positive

    queues = _torch_queues()
    _, loss = _torch_step(config, initial, batch, queues)
    assert float(metrics["ssps/coverage"]) == np.mean(expected_rows >= 0)
    assert _relative(loss, float(metrics["loss"])) < 1e-4
    # ... and the loss did change: the replaced positives are not the plain ones.
    assert _relative(loss, float(ours["plain"][1]["loss"])) > 1e-3

    # Both wrote the batch at block 0 of each queue: indices, y^, and view 2's *own* embeddings.
    theirs_ref = queues.ref_emb.numpy().reshape(after.ssps.ref_emb.shape)
    np.testing.assert_array_equal(queues.ref_index.numpy().reshape(after.ssps.ref_index.shape), after.ssps.ref_index)
    np.testing.assert_allclose(theirs_ref, after.ssps.ref_emb, atol=1e-5)
    np.testing.assert_array_equal(queues.pos_index.numpy().reshape(-1)[:B], batch["index"])
    scale = np.abs(after.ssps.pos_emb).max()
    np.testing.assert_allclose(queues.pos_emb.numpy(), after.ssps.pos_emb[0].reshape(POS_ROWS, 16), atol=1e-4 * scale)
    np.testing.assert_array_equal(queues.pos_emb.numpy()[B:], pos_emb[B:])  # block 1 untouched


def test_eval_embeddings_match_ours_with_trained_running_statistics(config, ours, batch):
    after, _ = ours["ssps"]
    variables = {"params": after.params, "batch_stats": after.batch_stats}
    model = build_simclr(config)
    load_flax_variables(model, variables)
    model.eval()
    with torch.no_grad():
        got = model.encoder(torch.from_numpy(batch["reference"])).numpy()
    flax_model = simclr.METHOD.build_model(config)
    embed = jax.jit(lambda v, wave: flax_model.apply(v, wave, method=type(flax_model).embed))
    expected = np.asarray(embed(variables, jnp.asarray(batch["reference"])))
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
    # The running statistics matter: the initial ones give other embeddings.
    load_flax_variables(model, {"params": after.params, "batch_stats": ours["initial"].batch_stats})
    with torch.no_grad():
        other = model.encoder(torch.from_numpy(batch["reference"])).numpy()
    assert np.abs(other - expected).max() > 1e-2 * np.abs(expected).max()


def _reference_kmeans(x, init_rows, iterations):
    """docs/method.md §4 in NumPy: Lloyd's iterations on the sphere, empty clusters keep their centroid."""
    centroids = x[init_rows].copy()
    for _ in range(iterations):
        labels = np.argmax(x @ centroids.T, axis=1)
        for k in range(len(centroids)):
            if np.any(labels == k):
                centroids[k] = x[labels == k].mean(axis=0)
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return centroids, np.argmax(x @ centroids.T, axis=1)


@pytest.mark.parametrize("duplicated", [False, True])
def test_kmeans_and_neighbours_follow_the_spec(duplicated):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    if duplicated:  # K = every row, 5 of them equal: 4 of their centroids never win a row and must stay put
        x = np.concatenate([x[:20], np.repeat(x[:1], 5, axis=0)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    k = len(x) if duplicated else 12
    init = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:k].numpy()
    expected_centroids, expected_labels = _reference_kmeans(x, init, iterations=5)
    centroids, labels = spherical_kmeans(torch.from_numpy(x), k, 5, chunk=7, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(labels.numpy(), expected_labels)
    np.testing.assert_allclose(centroids.numpy(), expected_centroids, atol=1e-5)
    assert len(np.unique(expected_labels)) < k if duplicated else len(np.unique(expected_labels)) == k

    if duplicated:
        return  # equal centroids tie in the neighbour ranking, which either order may break
    # The neighbour table equals ours (ssps_jax.ssps.kmeans.neighbours): nearest *other* centroids.
    for m in (0, 1, 3):
        table = np.array(nearest_clusters(centroids, m))
        np.testing.assert_array_equal(table, np.asarray(jax_kmeans.neighbours(jnp.asarray(centroids.numpy()), m, None)))


def test_bfloat16_runs_the_convolutions_in_bfloat16_under_autocast(config, ours, batch):
    initial = ours["initial"]
    _, loss32 = _torch_step(config, initial, batch)
    torch.manual_seed(0)
    model = build_simclr(config)
    load_flax_variables(model, {"params": initial.params, "batch_stats": initial.batch_stats})
    seen = []
    model.encoder.blocks[0].conv.conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    step = SimCLRTrainStep(model, config.simclr.temperature, None, LR, dtype="bfloat16")
    loss16 = float(
        step(*(torch.from_numpy(batch[k]) for k in ("views", "reference")), torch.from_numpy(batch["index"]).long())
    )
    assert seen == [torch.bfloat16] * 2  # the training forwards of the two views, under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # parameters stay float32
    # bfloat16 rounding moves the loss: this untrained model's embeddings are nearly collinear and
    # temperature 0.03 magnifies their rounding (~20% here), so only "finite and moved" is asserted.
    assert np.isfinite(loss16) and _relative(loss16, loss32) > 1e-4
    with pytest.raises(ValueError, match="float16"):
        SimCLRTrainStep(model, config.simclr.temperature, dtype="float16")


def test_run_benchmark_times_steps_that_really_sample(config):
    c = config.copy_and_resolve_references()
    c.data.crops.frame_seconds, c.data.crops.reference_seconds = 0.25, 0.5
    c.ssps.enabled, c.ssps.kmeans_clusters, c.ssps.pos_queue_size = True, 4, 16
    result = run_benchmark(c, global_batch=B, steps=2, warmup=1, compile=False, ssps=True)
    assert result["implementation"] == "torch" and result["device"] == "cpu"
    assert result["samples_per_s"] == pytest.approx(B / result["step_s_median"])
    assert 0 < result["ssps_s_median"] < result["step_s_median"]
    assert result["ssps_coverage"] > 0.5  # the queues were full and clustered before the timed steps
    assert np.isfinite(result["loss_last"])

    c.model.encoder = "resnet34"
    with pytest.raises(ValueError, match="ECAPA-TDNN only"):
        run_benchmark(c, global_batch=B, steps=1, warmup=0, compile=False, ssps=False)
