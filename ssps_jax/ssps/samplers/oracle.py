"""oracle (a diagnostic, not a method): the anchor's own speaker from another session, by labels.

Candidates are positive-queue rows whose speaker label is the anchor's and
whose session label differs (labels from the index file, SSPSState.speaker /
session); one is drawn uniformly over all devices, exactly as kmeans-repr draws
within c*. It measures the headroom of any positive sampling. With
oracle_purity p < 1, an anchor draws a right positive with probability p and
otherwise a labelled row of another speaker, uniformly: an SSPS whose
pseudo-labels are right p of the time, to find the p that pays off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ssps_jax.ssps.samplers.base import Sample, Sampler, anchor_keys, fetch, local_slice


class Oracle(Sampler):
    name = "oracle"
    summary = "a diagnostic: a positive-queue row of the anchor's speaker from another session, by labels"
    needs_labels = True

    def default_config(self) -> dict:
        # The share of anchors given a right positive; the others get a row of another speaker, uniformly
        # (what the pseudo-labelling's mistakes cost: docs/demo_findings.md).
        return {"oracle_purity": 1.0}

    def validate(self, config, method, fail) -> None:
        if not 0 <= config.ssps.oracle_purity <= 1:  # also NaN
            fail("ssps.oracle_purity", f"must be in [0, 1], got {config.ssps.oracle_purity}")

    def validate_unselected(self, config, fail) -> None:
        if config.ssps.oracle_purity != 1:
            fail(
                "ssps.oracle_purity",
                f"only oracle sampling has a purity to set (ssps.sampling is {config.ssps.sampling!r})",
            )

    def sample(self, state, anchors_local, y_ref_local, key, cfg, axis) -> Sample:
        n = anchors_local.shape[0]
        device = lax.axis_index(axis)
        anchors = lax.all_gather(anchors_local, axis, tiled=True)  # (G,)
        keys = anchor_keys(key, anchors.shape[0])
        speaker, session = state.speaker[anchors], state.session[anchors]

        # This device's candidates for every anchor: a (G, local rows) match table. Same speaker, other
        # session: the anchor's own row (same session) is never a candidate; unlabelled anchors have none.
        entry_index = state.pos_index.reshape(-1)
        safe = jnp.maximum(entry_index, 0)
        labelled = (entry_index[None, :] >= 0) & (speaker[:, None] >= 0) & (state.speaker[safe][None, :] >= 0)
        same_speaker = state.speaker[safe][None, :] == speaker[:, None]
        right = same_speaker & (state.session[safe][None, :] != session[:, None])
        if cfg.oracle_purity < 1:  # a static choice: the default program is the plain oracle's
            wrong = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 2)))(keys) >= cfg.oracle_purity
            match = labelled & jnp.where(wrong[:, None], ~same_speaker, right)
        else:
            match = labelled & right
        # Candidates are ranked in queue-position order (block, then global row), so a draw does not depend
        # on how the rows are split over devices: gather every (device, block) count, offset this device's.
        blocks = state.pos_index.shape[0]
        match = match.reshape(-1, blocks, n)  # (G, blocks, local rows)
        count = jnp.sum(match, axis=2)  # (G, blocks)
        counts = lax.all_gather(count, axis, axis=2)  # (G, blocks, devices)
        flat = counts.reshape(counts.shape[0], -1)
        total = jnp.sum(flat, axis=1)
        before = (jnp.cumsum(flat, axis=1) - flat).reshape(counts.shape)[:, :, device]  # (G, blocks)
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(keys)
        rank = jnp.minimum(jnp.floor(u * total).astype(jnp.int32), jnp.maximum(total - 1, 0))
        position = before[:, :, None] + jnp.cumsum(match, axis=2) - 1  # global rank of each local candidate
        hit = (match & (position == rank[:, None, None])).reshape(match.shape[0], -1)
        mine = jnp.any(hit, axis=1)
        entry = jnp.argmax(hit, axis=1)
        emb, index = fetch(state.pos_emb, state.pos_index, entry, mine, axis)
        return Sample(emb, local_slice(total > 0, axis, n), index)


SAMPLER = Oracle()
