"""Synthetic stand-ins for MUSAN (speech / music / noise) and simulated RIRs.

They only need to behave like their real counterparts for the augmentation
code: babble made of other voices, harmonic music, coloured and bursty noise,
and room responses of several sizes.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.demo_corpus import voice as voice_lib
from data_pipelines.demo_corpus.channel import synthetic_rir

SAMPLE_RATE = voice_lib.SAMPLE_RATE


def babble(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """One to three overlapping talkers who are in no train or test list."""
    n_talkers = int(rng.integers(1, 4))
    out = np.zeros(round(seconds * SAMPLE_RATE))
    for _ in range(n_talkers):
        out += voice_lib.synthesize(voice_lib.sample_voice(rng), rng, seconds)
    return out / np.abs(out).max()


def music(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Chords of harmonic notes with decaying envelopes, plus soft percussion."""
    n = round(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    out = np.zeros(n)
    beat = rng.uniform(0.3, 0.8)
    root = rng.integers(40, 60)  # MIDI note of the key
    for start in np.arange(0.0, seconds, beat):
        onset = int(start * SAMPLE_RATE)
        for degree in rng.choice([0, 3, 4, 7, 10, 12], size=3, replace=False):
            f0 = 440.0 * 2 ** ((root + degree - 69) / 12)
            decay = rng.uniform(0.2, 1.0)
            tt = t[: min(n - onset, int(5 * decay * SAMPLE_RATE))]  # until it has died out (-43 dB)
            harmonics = np.arange(1, 8)[np.arange(1, 8) * f0 < 7000]
            gains = rng.uniform(0.2, 1.0, len(harmonics)) / harmonics
            note = gains @ np.sin(2 * np.pi * f0 * harmonics[:, None] * tt[None])
            out[onset : onset + len(tt)] += note * np.exp(-tt / decay)
        if rng.random() < 0.5:  # a hit-hat-like click
            size = min(400, n - onset)
            click = rng.normal(0, 0.5, size) * np.exp(-np.arange(size) / 60)
            out[onset : onset + len(click)] += click
    return out / np.abs(out).max()


def noise(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Coloured noise, amplitude-modulated, with occasional bursts."""
    n = round(seconds * SAMPLE_RATE)
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    slope = rng.uniform(-6.0, 0.0)
    shape = (np.maximum(freqs, 50.0) / 1000.0) ** (slope / 6.02)
    out = np.fft.irfft(np.fft.rfft(rng.normal(0, 1, n)) * shape, n=n)  # n: 8 s, a fast size
    t = np.arange(n) / SAMPLE_RATE
    out *= 1 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.1, 3.0) * t)
    for _ in range(int(rng.integers(0, 6))):
        at = int(rng.integers(0, n - 1600))
        out[at : at + 1600] += rng.normal(0, 4 * out.std(), 1600) * np.exp(-np.arange(1600) / 300)
    return out / np.abs(out).max()


def room_impulse_response(rng: np.random.Generator, room: str) -> np.ndarray:
    rt60 = {"smallroom": (0.15, 0.35), "mediumroom": (0.3, 0.6), "largeroom": (0.5, 0.9)}[room]
    return synthetic_rir(rng, rng.uniform(*rt60), rng.uniform(-5.0, 5.0))


MUSAN_CATEGORIES = {"speech": babble, "music": music, "noise": noise}
ROOMS = ("smallroom", "mediumroom", "largeroom")
