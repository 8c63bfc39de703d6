"""Encoders: sslsv-sized parameter count and names, exact padded embedding, bf16."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from ssps_jax import sharding
from ssps_jax.evaluation.embedding import Embedder, bucket_lengths
from ssps_jax.features import LogMelConfig
from ssps_jax.methods import simclr
from ssps_jax.methods.common import Siamese
from ssps_jax.models.ecapa_tdnn import ECAPATDNN, pooled_stats
from ssps_jax.models.heads import Projector
from ssps_jax.models.layers import BatchNorm, ContextConv, torch_default_init
from ssps_jax.models.resnet34 import ResNet34
from ssps_jax.models.sslsv_names import sslsv_name, to_torch_layout


def _sslsv_ecapa_parameter_count(channels, n_mels, scale=8, se=128, attention=128, out=512):
    """Counted from sslsv's ECAPATDNN.__init__ (weights, biases, BN affine), by hand."""

    def tdnn(i, o, k):
        return i * o * k + o + 2 * o  # conv weight + bias, BN weight + bias

    c, last = channels[0], channels[-1]
    se_res2net = 2 * tdnn(c, c, 1) + (scale - 1) * tdnn(c // scale, c // scale, 3) + (c * se + se) + (se * c + c)
    return (
        tdnn(n_mels, c, 5)
        + 3 * se_res2net
        + tdnn(3 * c, last, 1)  # mfa
        + tdnn(3 * last, attention, 1)  # asp.tdnn (global context)
        + attention * last
        + last  # asp.conv
        + 2 * 2 * last  # asp_bn
        + 2 * last * out
        + out  # fc
    )


def _abstract_variables(model, samples=32000):
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, samples))))


@pytest.mark.parametrize("n_mels", [40, 80])
def test_ecapa_c1024_has_sslsv_parameter_count(n_mels):
    model = ECAPATDNN(mel=LogMelConfig(n_mels=n_mels), channels=(1024, 1024, 1024, 1024, 3072))
    count = sum(x.size for x in jax.tree.leaves(_abstract_variables(model)["params"]))
    assert count == _sslsv_ecapa_parameter_count((1024, 1024, 1024, 1024, 3072), n_mels)
    if n_mels == 40:
        assert 22.4e6 < count < 22.6e6  # "about 22.5 M"


def test_sslsv_names_and_layouts():
    model = ECAPATDNN(mel=LogMelConfig(n_mels=40), channels=(1024, 1024, 1024, 1024, 3072))
    variables = _abstract_variables(model)
    names = {}
    for collection in ("params", "batch_stats"):
        for path, value in flatten_dict(variables[collection]).items():
            torch_shape = to_torch_layout(path, np.zeros(value.shape, np.int8)).shape
            names["encoder." + sslsv_name(path, collection)] = torch_shape
    # Spot checks against sslsv's module tree (ECAPATDNN.py), written out by hand.
    expected = {
        "encoder.blocks.0.conv.conv.weight": (1024, 40, 5),
        "encoder.blocks.0.norm.weight": (1024,),
        "encoder.blocks.0.norm.running_var": (1024,),
        "encoder.blocks.1.tdnn1.conv.conv.bias": (1024,),
        "encoder.blocks.2.res2net_block.blocks.6.conv.conv.weight": (128, 128, 3),
        "encoder.blocks.3.se_block.conv1.conv.weight": (128, 1024, 1),
        "encoder.blocks.3.se_block.conv2.conv.bias": (1024,),
        "encoder.mfa.conv.conv.weight": (3072, 3072, 1),
        "encoder.asp.tdnn.conv.conv.weight": (128, 9216, 1),
        "encoder.asp.conv.conv.weight": (3072, 128, 1),
        "encoder.asp_bn.running_mean": (6144,),
        "encoder.fc.conv.weight": (512, 6144, 1),
    }
    for name, shape in expected.items():
        assert names[name] == shape, name
    # Every sslsv tensor but the BN counters: 2 per conv, 4 per BN (weight, bias, running stats).
    n_convs = 1 + 3 * (2 + 7 + 2) + 1 + 2 + 1
    n_bns = 1 + 3 * (2 + 7) + 1 + 1 + 1
    assert len(names) == 2 * n_convs + 4 * n_bns
    assert sslsv_name(("projector", "layers_3", "kernel")) == "projector.3.weight"
    assert sslsv_name(("block2_0", "downsample_1", "scale")) == "block2.0.downsample.1.weight"


def _tiny_encoders():
    mel = LogMelConfig(n_mels=16)
    return [
        ECAPATDNN(mel=mel, channels=(16, 16, 16, 16, 48), attention_channels=8, se_channels=8, encoder_dim=8),
        ResNet34(mel=mel, base_dim=8, layers=(1, 1, 2, 1), encoder_dim=8),
    ]


@pytest.mark.parametrize("model", _tiny_encoders(), ids=["ecapa_tdnn", "resnet34"])
def test_bucketed_embedding_equals_each_utterance_alone(model):
    rng = np.random.default_rng(0)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((2, 16000)))
    # Non-trivial BatchNorm statistics, so that padding mistakes cannot hide behind zeros.
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree.map(lambda x: x + rng.uniform(0.5, 1.5, x.shape), variables["batch_stats"]),
    }
    lengths = [16000, 7001, 12345, 9999, 3300, 20500]
    waves = [(0.1 * rng.normal(size=n)).astype(np.float32) for n in lengths]
    mesh = sharding.make_mesh()  # 8 simulated devices

    def embed(v, wave, n):
        return model.apply(v, wave, n)

    embedder = Embedder(embed, mesh, batch_size=4, bucket_ratio=1.5, min_bucket=8000)
    assert embedder.batch_size == 8  # rounded up to the device count
    got = embedder(variables, waves)
    alone = jax.jit(model.apply)  # unpadded, no mask: one compilation per length
    for wave, emb in zip(waves, got):
        np.testing.assert_allclose(emb, alone(variables, wave[None])[0], rtol=1e-4, atol=1e-5)
    # One compilation per bucket used (8000, 12000, 18080, 27040 samples), not per length.
    buckets = bucket_lengths(max(lengths), 8000, 1.5)
    assert embedder.program._cache_size() == len(set(np.searchsorted(buckets, lengths))) == 4


def test_bucket_lengths():
    assert bucket_lengths(40000, 16000, 1.5) == [16000, 24000, 36000, 54080]
    assert all(b % 160 == 0 for b in bucket_lengths(10**6, 32000, 1.25))


def test_bfloat16_compute_stays_close_to_float32():
    mel = LogMelConfig(n_mels=16)
    kwargs = dict(mel=mel, channels=(32, 32, 32, 32, 96), attention_channels=16, se_channels=16, encoder_dim=16)
    wave = np.random.default_rng(1).normal(size=(4, 16000)).astype(np.float32)
    f32 = ECAPATDNN(**kwargs)
    variables = jax.jit(f32.init)(jax.random.PRNGKey(0), wave)
    bf16 = ECAPATDNN(**kwargs, dtype=jnp.bfloat16)
    a, b = jax.jit(f32.apply)(variables, wave), jax.jit(bf16.apply)(variables, wave)
    assert b.dtype == jnp.float32  # embeddings come back in float32
    params = jax.eval_shape(lambda: bf16.init(jax.random.PRNGKey(0), wave))["params"]
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}  # float32 parameters
    cosine = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.all(cosine > 0.99)
    assert not np.array_equal(a, b)  # really computed in bfloat16

    # The training loss: SimCLR's NT-Xent (temperature 0.03) of two views in training mode (batch statistics)
    # agrees to 1% (0.1-0.3% measured here and on a SimCLR step; docs/performance.md states the tolerance).
    views = np.random.default_rng(2).normal(size=(8, 2, 8000)).astype(np.float32)

    def loss(model):
        def fn(v, x):
            z1, z2 = model.apply(v, x, train=True, mutable=["batch_stats"])[0]
            return simclr.nt_xent(z1, z2, 0.03)

        return float(jax.jit(fn)({name: {"encoder": tree} for name, tree in variables.items()}, views))

    losses = [loss(Siamese(encoder=encoder.clone(bn_groups=2))) for encoder in (f32, bf16)]
    assert losses[1] != losses[0] and abs(losses[1] / losses[0] - 1) < 0.01


def test_context_conv_is_the_conv_of_the_concatenation():
    """ECAPA-TDNN's attentive pooling concatenates the utterance's mean and std to every frame before a
    kernel-1 convolution: ContextConv computes it without the concatenation, with nn.Conv's very parameters."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(3, 7, 4)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    concatenated = jnp.concatenate([x, jnp.broadcast_to(context[:, None], (3, 7, 8))], axis=-1)
    reference = nn.Conv(5, (1,), kernel_init=torch_default_init)
    variables = reference.init(jax.random.PRNGKey(1), concatenated)
    variables = jax.tree.map(lambda v: v + rng.normal(size=v.shape), variables)  # a non-zero bias too
    ours = ContextConv(5)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x, context)) == jax.tree.map(jnp.shape, variables)
    np.testing.assert_allclose(
        ours.apply(variables, x, context), reference.apply(variables, concatenated), rtol=1e-5, atol=1e-5
    )
    # Initialised like the conv it replaces: the same key gives the same kernel.
    fresh = ours.init(jax.random.PRNGKey(2), x, context)["params"]["kernel"]
    np.testing.assert_array_equal(fresh, reference.init(jax.random.PRNGKey(2), concatenated)["params"]["kernel"])


def _sslsv_pooled_stats(x, logits, mask, eps=1e-12):
    """sslsv's attentive statistics (softmax over the valid frames, mean = sum w x, std = sqrt(max(sum w (x -
    mean)^2, eps))), or uniform with logits None: the formula as written, two passes, no shift."""
    if logits is None:
        weights = mask / jnp.sum(mask, axis=1, keepdims=True)
    else:
        weights = jax.nn.softmax(logits, axis=1, where=mask)
        weights = jnp.where(mask, weights, 0.0)
    mean = jnp.sum(weights * x, axis=1)
    return mean, jnp.sqrt(jnp.maximum(jnp.sum(weights * jnp.square(x - mean[:, None]), axis=1), eps))


def test_pooled_stats_are_sslsv_statistics_and_gradients():
    """The pooling's one-pass statistics and hand-written backward pass against autodiff of sslsv's formula
    in float64, on frames far from zero (|mean| >> std: E[x^2] - E[x]^2 cancels there unless shifted), a
    constant channel (std = sqrt(eps), no gradient), and padding holding huge logits and values."""
    rng = np.random.default_rng(7)
    b, t, c = 3, 9, 5
    x = 1000.0 + rng.normal(size=(b, t, c))
    x[:, :, 1] = 3.0  # constant over time
    logits = 2 * rng.normal(size=(b, t, c))
    mask = (np.arange(t)[None] < np.array([9, 4, 1])[:, None])[..., None]
    x[~mask[..., 0]], logits[~mask[..., 0]] = 1e6, 1e4  # padding: must not count
    cotangent = rng.normal(size=(2, b, c))
    with jax.enable_x64():
        for logits_or_none in (logits, None):  # attentive, then uniform
            want, vjp_want = jax.vjp(lambda *a: _sslsv_pooled_stats(*a, mask), jnp.asarray(x), logits_or_none)
            f32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), (x, logits_or_none))
            got, vjp = jax.vjp(lambda *a: pooled_stats(*a, mask), *f32)
            np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
            # float32 frames near 1000 are rounded by ~3e-5: the std is as exact as the frames are.
            np.testing.assert_allclose(got[1], want[1], rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(got[1][:, 1], 1e-6, rtol=1e-6)  # the constant channel's sqrt(eps)
            grads, grads_want = vjp(tuple(jnp.asarray(cotangent, jnp.float32))), vjp_want(tuple(cotangent))
            assert (grads[1] is None) == (logits_or_none is None)
            for g, g_want in zip(grads, grads_want):
                if g is None:
                    continue
                assert g.dtype == jnp.float32 and np.isfinite(g).all()
                assert not np.asarray(g)[~mask[..., 0]].any()  # nothing flows into the padding
                np.testing.assert_allclose(g, g_want, rtol=2e-3, atol=2e-3 * np.abs(g_want).max())


class _PerViewSiamese(nn.Module):
    """The Siamese model as sslsv runs it: one call of the encoder and projector per view."""

    encoder: nn.Module
    projector: nn.Module

    def __call__(self, views, train=False):
        return tuple(self.projector(self.encoder(views[:, v], train=train), train=train) for v in range(2))


def test_siamese_one_call_normalises_each_view_as_its_own_call():
    """Siamese runs both views through the model in one call, its BatchNorms built with bn_groups=2: the
    embeddings and the updated running statistics are those of one call per view (each view normalised by
    its own batch statistics, the running averages updated view after view), not those of one batch."""
    kwargs = dict(
        mel=LogMelConfig(n_mels=16),
        channels=(32, 32, 32, 32, 96),
        attention_channels=16,
        se_channels=16,
        encoder_dim=16,
    )
    views = np.random.default_rng(3).normal(size=(4, 2, 8000)).astype(np.float32)
    views[:, 1] *= 3  # views that differ in scale: joint statistics would show
    ours = Siamese(encoder=ECAPATDNN(**kwargs, bn_groups=2), projector_dims=(24, 8))
    variables = jax.jit(ours.init)(jax.random.PRNGKey(0), views)
    variables = {**variables, "batch_stats": jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])}

    def train(model):
        (z1, z2), updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
            variables, views
        )
        return (z1, z2), updates["batch_stats"]

    got = train(ours)
    want = train(_PerViewSiamese(ECAPATDNN(**kwargs), Projector(24, 8)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)
    # Normalising the two views together (one group) is something else on these views.
    stacked, encoder_variables = (
        jnp.concatenate([views[:, 0], views[:, 1]]),
        {k: v["encoder"] for k, v in variables.items()},
    )
    joint, grouped = (
        ECAPATDNN(**kwargs, bn_groups=g).apply(encoder_variables, stacked, train=True, mutable=["batch_stats"])[0]
        for g in (1, 2)
    )
    assert not np.allclose(joint, grouped, atol=1e-3)
    with pytest.raises(ValueError, match="bn_groups=2"):
        Siamese(encoder=ECAPATDNN(**kwargs)).init(jax.random.PRNGKey(0), views)


def test_batch_norm_is_flax_batch_norm_group_by_group():
    """Our BatchNorm against flax's nn.BatchNorm: the same variables; in training with groups=2, the outputs
    and running statistics of flax's module called on each half in turn; with groups=1 and in inference,
    flax's on the whole batch."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(3 * rng.normal(size=(12, 5, 7)) + 1, jnp.float32)
    flax_bn = {train: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5) for train in (0, 1)}
    variables = flax_bn[1].init(jax.random.PRNGKey(0), x)
    variables = jax.tree.map(lambda v: v + rng.uniform(0.5, 1.5, size=v.shape), variables)
    ours = functools.partial(BatchNorm, momentum=0.9, epsilon=1e-5)
    assert jax.tree.map(jnp.shape, ours(False).init(jax.random.PRNGKey(0), x)) == jax.tree.map(jnp.shape, variables)

    def run(module, variables, x):
        y, updates = module.apply(variables, x, mutable=["batch_stats"])
        return y, updates["batch_stats"]

    y1, stats = run(flax_bn[1], variables, x[:6])
    y2, stats = run(flax_bn[1], {**variables, "batch_stats": stats}, x[6:])
    for (y, got_stats), want in (
        (run(ours(False, groups=2), variables, x), (jnp.concatenate([y1, y2]), stats)),
        (run(ours(False), variables, x), run(flax_bn[1], variables, x)),
    ):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), (y, got_stats), want)
    np.testing.assert_allclose(ours(True).apply(variables, x), flax_bn[0].apply(variables, x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not 5 equal groups"):
        ours(False, groups=5).apply(variables, x, mutable=["batch_stats"])
