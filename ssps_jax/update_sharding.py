"""The large parameters and their optimizer state split over the devices (ZeRO stage 1 with float32 masters).

Applying the optimizer on every device to all the parameters repeats the same
work n times: on the paper's SimCLR-SSPS step each device read the
parameters, the averaged gradients and both Adam moments of all 22.5 M
parameters and wrote three of them back, a fifth of the step's memory
traffic (docs/performance.md). Here each large parameter has one *split
axis*, and the train state holds it, and its optimizer state, split along it:
each device keeps its 1/n in float32. A step gathers the parameters whole,
the kernels in the model's compute dtype (`gather`: bfloat16 in a bfloat16
step, half the bytes of a float32 gather), runs the forward and backward passes on them,
reduce-scatters the gradients instead of all-reducing them (each device
receives the mean of its 1/n), and updates its 1/n of the parameter and of the
optimizer state. An all-reduce is a reduce-scatter followed by an all-gather,
so the collectives move what they moved before (less in bfloat16); the
optimizer's memory traffic and state, and the parameters' memory, are divided
by n. (Xu et al. 2020, "Automatic cross-replica sharding of weight update in
data-parallel training"; Rajbhandari et al. 2020, ZeRO.)

Gathering kernels in the compute dtype changes no number: every layer casts
its kernels to the compute dtype before using them (flax's promote_dtype), so
casting before the gather gives the layers the values they had. Vectors
(BatchNorm's scale and bias, used in float32) are gathered as they are; a
layer that computes with a kernel in float32 (models/heads.py:WeightNormDense's
norm) sees its bfloat16 rounding in a bfloat16 step.

The gradients of the kernels so gathered come out of the backward pass in
the compute dtype, and are averaged in it: a bfloat16 step reduce-scatters
bfloat16 gradients, half the bytes, summed over the devices in bfloat16, and
takes the mean to float32 for the update. That does change numbers, by
bfloat16's rounding of each device's gradient and of the sums (measured in
docs/performance.md, "Numerics"); `optim.reduce_gradients_in_float32` takes
them to float32 first, as before. A float32 step is the same either way.

A leaf is split when it has at least `optim.split_update_min_size` elements
(64 Ki by default: smaller ones are not worth three collectives each) and an
axis whose size the device count divides (the largest such axis); the others,
and every leaf on one device, are held whole on every device and updated there
as before. Split leaves keep their shape and only change layout, so a
checkpoint restores onto any number of devices, and into the replicated
layout evaluation and export use. The optimizer's transforms see this
device's parts: Adam, SGD, weight decay and masks treat each element on their
own; the clipping transforms of optim.py, which take norms over a tensor or
over all, get `split_axes` from the train step and sum the parts' squares
over the devices (`leaf_norms`, `global_norm`).

A method's momentum copy of the model (DINO's teacher, BYOL's target
network, MoCo's key network: `Method.momentum_entry`) is held split the
same way, its leaves having the parameters' shapes and so their split
axes (`sub_axes`). The step gathers it as it gathers the parameters, for
the target's forward and for y^, and its EMA runs on each device's part of
both: a teacher is read whole only in the compute dtype, never gathered in
float32, and its EMA reads and writes 1/n of it.

The functions below, but for the layouts (`split_axes` and the specs), run
inside the train step's shard_map, over the `data` axis; `axes` is
`split_axes`'s tree (an int or None per parameter).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from ssps_jax.sharding import DATA


def _split_axis(shape: tuple[int, ...], num_devices: int, min_size: int | None) -> int | None:
    """The axis a leaf of `shape` is split along: its largest axis that `num_devices` divides; None: whole."""
    if min_size is None or num_devices <= 1 or math.prod(shape) < min_size:
        return None
    divisible = [a for a, size in enumerate(shape) if size % num_devices == 0]
    return max(divisible, key=lambda a: shape[a], default=None)


def split_axes(params, num_devices: int, min_size: int | None):
    """A tree like `params` (arrays or shapes): the axis each leaf's update is split along, or None (whole).
    `min_size` None: no leaf is split."""
    return jax.tree.map(lambda leaf: _split_axis(tuple(leaf.shape), num_devices, min_size), params)


def _spec(axis: int | None) -> P:
    return P() if axis is None else P(*([None] * axis), DATA)


def param_specs(params, num_devices: int, min_size: int | None):
    """Partition specs of the parameters (arrays or shapes): each split along its split axis, the rest replicated."""
    return jax.tree.map(lambda leaf: _spec(_split_axis(tuple(leaf.shape), num_devices, min_size)), params)


def opt_state_specs(opt_state, params, num_devices: int, min_size: int | None):
    """Partition specs of an optimizer state (arrays or shapes): each array of a parameter's shape (Adam's
    moments, a momentum) split as that parameter's update is, the rest (step counts) replicated.

    By shape, since the split axis depends on the shape alone: optax's own `tree_map_params` cannot see
    through `multi_transform`'s masked states (DINO's and SwAV's frozen layers).
    """
    shapes = {tuple(p.shape) for p in jax.tree.leaves(params)}

    def spec(leaf):
        shape = tuple(leaf.shape)
        return _spec(_split_axis(shape, num_devices, min_size)) if shape in shapes else P()

    return jax.tree.map(spec, opt_state)


def _map(f, axes, *trees):
    """f(leaves..., axis) over trees shaped like the parameters (`axes`' None leaves kept as leaves)."""
    return jax.tree.map(lambda axis, *leaves: f(*leaves, axis), axes, *trees, is_leaf=lambda x: x is None)


def mean_gradients(grads, axes):
    """The mean over devices of each gradient: whole (all-reduce) or this device's part of it (reduce-scatter)."""

    def mean(g, axis):
        if axis is None:
            return lax.pmean(g, DATA)
        return lax.psum_scatter(g, DATA, scatter_dimension=axis, tiled=True) / lax.axis_size(DATA)

    return _map(mean, axes, grads)


def gather(parts, axes, dtype=None):
    """The whole parameters, on every device: each split one gathered from the devices' parts, a kernel (two
    axes or more) cast to `dtype` first (None: none is); the whole ones as they are.

    Only kernels: every layer casts its kernels to the compute dtype before using them, but a BatchNorm
    scales and shifts in float32, so a split vector (a tiny model's, with a small split_update_min_size) is
    gathered in its own dtype."""

    def whole(p, axis):
        if axis is None:
            return p
        cast = dtype is not None and p.ndim >= 2
        return lax.all_gather(p.astype(dtype) if cast else p, DATA, axis=axis, tiled=True)

    return _map(whole, axes, parts)


def sub_axes(axes, modules):
    """The split axes of `modules`, some of the parameters' top-level modules (a momentum copy of them): theirs,
    since a leaf's split axis depends on its shape alone."""
    return {name: axes[name] for name in modules}


def leaf_norms(parts, axes=None):
    """The L2 norm of each whole leaf, from this device's part of it where it is split (`axes` None: none is)."""
    axes = jax.tree.map(lambda _: None, parts) if axes is None else axes

    def norm(g, axis):
        square = jnp.sum(jnp.square(g.astype(jnp.float32)))
        return jnp.sqrt(square if axis is None else lax.psum(square, DATA))

    return _map(norm, axes, parts)


def global_norm(parts, axes=None) -> jax.Array:
    """The L2 norm of the whole tree, from each device's parts of the split leaves and the whole others."""
    if axes is None:
        return optax.tree.norm(parts)
    whole, split = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    for g, axis in zip(jax.tree.leaves(parts), jax.tree.leaves(axes, is_leaf=lambda x: x is None)):
        square = jnp.sum(jnp.square(g.astype(jnp.float32)))
        whole, split = (whole + square, split) if axis is None else (whole, split + square)
    return jnp.sqrt(whole + lax.psum(split, DATA))
