"""The self-supervised methods, by name: each is one module exposing one `Method` (methods/base.py).

Adding a method: write methods/<name>.py with a `Method` subclass and its
`METHOD` object, and add one line to REGISTRY.
"""

from __future__ import annotations

from ssps_jax.methods import barlow_twins, byol, dino, moco, simclr, supervised, swav, vicreg
from ssps_jax.methods.base import Method

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        simclr.METHOD,
        dino.METHOD,
        vicreg.METHOD,
        supervised.METHOD,
        moco.METHOD,
        swav.METHOD,
        byol.METHOD,
        barlow_twins.METHOD,
    )
}


def get(name: str) -> Method:
    """The method registered as `name` (config.method)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}: one of {tuple(REGISTRY)}") from None
