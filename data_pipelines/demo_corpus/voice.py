"""A source-filter voice: speaker parameters, phone sequences and synthesis.

The demo corpus needs speech that carries *speaker* identity through the same
cues real voices do (F0, vocal-tract length, glottal tilt, voice quality,
articulation habits), with enough within-speaker variability that the task is
not trivial. A classic source-filter model gives exactly that for a few dozen
lines of NumPy:

  source  = glottal pulse train (F0 contour, jitter, shimmer)  +  noise
  filter  = time-varying formant resonances, per frame in the STFT domain
  speech  = ISTFT(STFT(pulses) * H_voiced + STFT(noise) * H_noise)

Filtering in the STFT domain (rather than with per-sample IIR updates) keeps
the whole synthesis vectorised; phase stays that of the source, which the
log-mel features of the encoders ignore anyway.
"""

from __future__ import annotations

import dataclasses

import librosa
import numpy as np

SAMPLE_RATE = 16000
_N_FFT = 512
_HOP = 128
_FRAME_RATE = SAMPLE_RATE / _HOP

# Average formants (F1, F2, F3) of adult male American English vowels
# (Peterson & Barney, 1952). Speakers scale and perturb them.
_VOWELS = np.array(
    [
        [270, 2290, 3010],  # i
        [390, 1990, 2550],  # I
        [530, 1840, 2480],  # E
        [660, 1720, 2410],  # ae
        [730, 1090, 2440],  # a
        [570, 840, 2410],  # o
        [440, 1020, 2240],  # U
        [300, 870, 2240],  # u
        [640, 1190, 2390],  # V
        [490, 1350, 1690],  # er
    ],
    dtype=np.float64,
)
_F4 = 3400.0
_BANDWIDTHS = np.array([70.0, 100.0, 140.0, 220.0])

# Voiced, non-vowel sonorants: formants and voicing amplitude.
_SONORANTS = {
    "m": ((250, 1100, 2300), 0.3),
    "n": ((250, 1600, 2500), 0.3),
    "l": ((360, 1300, 2700), 0.6),
    "r": ((420, 1300, 1600), 0.6),
    "w": ((300, 700, 2200), 0.6),
    "j": ((270, 2100, 3000), 0.6),
}
# Fricatives: noise band centre, bandwidth, noise amplitude, voiced?
_FRICATIVES = {
    "s": (5000, 3000, 0.35, False),
    "sh": (2800, 1800, 0.4, False),
    "f": (5000, 7000, 0.12, False),
    "z": (5000, 3000, 0.25, True),
    "v": (5000, 7000, 0.1, True),
}
# Stops: burst band centre, bandwidth, voiced?
_STOPS = {
    "p": (800, 1500, False),
    "t": (4000, 3000, False),
    "k": (2000, 1000, False),
    "b": (800, 1500, True),
    "d": (4000, 3000, True),
    "g": (2000, 1000, True),
}
_CONSONANTS = list(_SONORANTS) + list(_FRICATIVES) + list(_STOPS)


@dataclasses.dataclass(frozen=True)
class Voice:
    """Everything that makes one synthetic speaker sound like themselves."""

    f0_hz: float  # mean fundamental frequency
    f0_range_st: float  # intonation depth, semitones
    formant_scale: float  # 1 / vocal-tract length, relative to the reference
    tilt_db_oct: float  # glottal spectral tilt above 200 Hz, dB per octave
    jitter: float  # relative std of the glottal period
    shimmer: float  # relative std of the pulse amplitude
    rate: float  # speaking rate relative to the reference durations
    breathiness: float  # aspiration noise relative to voicing
    accent: np.ndarray  # (10 vowels + 6 sonorants, 3) multiplicative formant offsets
    timbre_db: np.ndarray  # (n_fft//2+1,) fixed smooth spectral colouring, dB

    def with_state(self, rng: np.random.Generator, spread: float) -> Voice:
        """The same speaker on another day (session) or utterance: small drifts."""
        return dataclasses.replace(
            self,
            f0_hz=self.f0_hz * 2 ** (rng.normal(0, 1.0 * spread) / 12),
            tilt_db_oct=self.tilt_db_oct + rng.normal(0, 1.0 * spread),
            rate=self.rate * float(np.exp(rng.normal(0, 0.06 * spread))),
            formant_scale=self.formant_scale * float(np.exp(rng.normal(0, 0.01 * spread))),
        )


def sample_voice(rng: np.random.Generator) -> Voice:
    """Draws a random speaker; about half have a low (male-like) voice."""
    low = rng.random() < 0.5
    freqs = np.fft.rfftfreq(_N_FFT, 1 / SAMPLE_RATE)
    # A smooth random curve on a log-frequency axis: a few cosines.
    logf = np.log2(np.maximum(freqs, 50.0) / 50.0)
    timbre = sum(
        rng.normal(0, 1.5) * np.cos(np.pi * k * logf / logf[-1] + rng.uniform(0, 2 * np.pi)) for k in range(1, 5)
    )
    return Voice(
        f0_hz=rng.uniform(85, 150) if low else rng.uniform(165, 260),
        f0_range_st=rng.uniform(1.5, 5.0),
        formant_scale=rng.normal(1.0, 0.05) if low else rng.normal(1.16, 0.05),
        tilt_db_oct=rng.uniform(-10.0, -3.0),
        jitter=rng.uniform(0.003, 0.02),
        shimmer=rng.uniform(0.02, 0.12),
        rate=rng.uniform(0.8, 1.25),
        breathiness=rng.uniform(0.0, 0.3),
        accent=np.exp(rng.normal(0.0, 0.05, size=(len(_VOWELS) + len(_SONORANTS), 3))),
        timbre_db=np.asarray(timbre),
    )


@dataclasses.dataclass
class _Tracks:
    """Frame-rate control tracks of one utterance."""

    formants: np.ndarray  # (T, 4) Hz
    voicing: np.ndarray  # (T,) amplitude of the glottal source
    noise: np.ndarray  # (T,) amplitude of the fricative / burst noise
    noise_centre: np.ndarray  # (T,) Hz
    noise_bw: np.ndarray  # (T,) Hz
    accent: np.ndarray  # (T,) pitch-accent bumps, semitones


def _phone_formants(voice: Voice, row: int, base: tuple[float, float, float]) -> np.ndarray:
    f123 = np.asarray(base, dtype=np.float64) * voice.accent[row]
    return np.append(f123, _F4) * voice.formant_scale


def _plan(voice: Voice, rng: np.random.Generator, n_frames: int) -> _Tracks:
    """Lays out a random phone sequence over `n_frames` frames."""
    cols = {k: [] for k in ("formants", "voicing", "noise", "noise_centre", "noise_bw", "accent")}
    last_formants = _phone_formants(voice, 4, tuple(_VOWELS[4]))

    def emit(ms, formants, voicing=0.0, noise=0.0, centre=3000.0, bw=3000.0, accent=0.0):
        n = max(1, round(ms / 1000 * _FRAME_RATE / voice.rate))
        cols["formants"].append(np.repeat(formants[None], n, axis=0))
        for key, value in (
            ("voicing", voicing),
            ("noise", noise),
            ("noise_centre", centre),
            ("noise_bw", bw),
            ("accent", accent),
        ):
            cols[key].append(np.full(n, value))
        return n

    def consonant(name):
        nonlocal last_formants
        if name in _SONORANTS:
            base, amp = _SONORANTS[name]
            row = len(_VOWELS) + list(_SONORANTS).index(name)
            last_formants = _phone_formants(voice, row, base)
            emit(rng.uniform(50, 90), last_formants, voicing=amp)
        elif name in _FRICATIVES:
            centre, bw, amp, voiced = _FRICATIVES[name]
            emit(rng.uniform(70, 130), last_formants, 0.35 * voiced, amp, centre, bw)
        else:
            centre, bw, voiced = _STOPS[name]
            emit(rng.uniform(40, 70), last_formants, voicing=0.08 * voiced)  # closure
            emit(12, last_formants, noise=0.6, centre=centre, bw=bw)  # burst
            if not voiced:
                emit(rng.uniform(20, 40), last_formants, noise=0.12, centre=1500, bw=4000)

    total = 0
    while total < n_frames:
        if rng.random() < 0.25:  # a pause between words
            emit(rng.uniform(60, 300), last_formants)
        for _ in range(rng.integers(1, 4)):  # syllables of one word
            if rng.random() < 0.8:
                consonant(_CONSONANTS[rng.integers(len(_CONSONANTS))])
            row = rng.integers(len(_VOWELS))
            last_formants = _phone_formants(voice, row, tuple(_VOWELS[row]))
            stressed = rng.random() < 0.35
            emit(
                rng.uniform(90, 180) * (1.4 if stressed else 1.0),
                last_formants,
                voicing=1.0,
                accent=voice.f0_range_st / 2 if stressed else 0.0,
            )
            if rng.random() < 0.3:
                consonant(_CONSONANTS[rng.integers(len(_CONSONANTS))])
        total = sum(len(v) for v in cols["voicing"])

    tracks = {k: np.concatenate(v)[:n_frames] for k, v in cols.items()}
    # Coarticulation: formants glide (~40 ms), amplitudes ramp (~16 ms).
    tracks["formants"] = _smooth(tracks["formants"], 5)
    for key in ("voicing", "noise", "noise_centre", "noise_bw"):
        tracks[key] = _smooth(tracks[key], 2)
    tracks["accent"] = _smooth(tracks["accent"], 12)
    return _Tracks(**tracks)


def _smooth(x: np.ndarray, n: int) -> np.ndarray:
    """Centred moving average over 2n+1 frames with edge padding."""
    kernel = np.ones(2 * n + 1) / (2 * n + 1)
    pad = [(n, n)] + [(0, 0)] * (x.ndim - 1)
    xp = np.pad(x, pad, mode="edge")
    return np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="valid"), 0, xp)


def _resonance(freqs: np.ndarray, centre: np.ndarray, bw: np.ndarray) -> np.ndarray:
    """Magnitude of a two-pole resonator with unit gain at DC.

    H(s) = (sigma^2 + w0^2) / ((s + sigma)^2 + w0^2), sigma = pi B, w0 = 2 pi F.
    `centre` and `bw` broadcast against `freqs`.
    """
    sigma = np.pi * bw
    w0 = 2 * np.pi * centre
    w = 2 * np.pi * freqs
    num = sigma**2 + w0**2
    return num / np.sqrt((num - w**2) ** 2 + (2 * sigma * w) ** 2)


def _pulse_train(voice: Voice, rng: np.random.Generator, f0: np.ndarray) -> np.ndarray:
    """Glottal pulses at the sample-rate F0 contour `f0`, with jitter and shimmer."""
    n = len(f0)
    phase = np.cumsum(f0 / SAMPLE_RATE)
    onsets = np.flatnonzero(np.diff(np.floor(phase)) > 0).astype(np.float64)
    periods = SAMPLE_RATE / f0[onsets.astype(int)]
    onsets += rng.normal(0.0, voice.jitter, len(onsets)) * periods
    amps = np.exp(rng.normal(0.0, voice.shimmer, len(onsets))) * np.sqrt(periods)
    keep = (onsets >= 0) & (onsets < n - 1)
    onsets, amps = onsets[keep], amps[keep]
    # Split each fractional-position pulse between its two neighbouring samples.
    lo = np.floor(onsets).astype(int)
    frac = onsets - lo
    out = np.zeros(n)
    np.add.at(out, lo, amps * (1 - frac))
    np.add.at(out, lo + 1, amps * frac)
    return out


def _stft(x: np.ndarray) -> np.ndarray:
    return librosa.stft(x, n_fft=_N_FFT, hop_length=_HOP, window="hann", center=True)


def synthesize(voice: Voice, rng: np.random.Generator, seconds: float) -> np.ndarray:
    """One utterance of `seconds` of speech by `voice`, float64, peak ~ 1."""
    n = round(seconds * SAMPLE_RATE)
    n_frames = 1 + n // _HOP  # centred frames
    tracks = _plan(voice, rng, n_frames)
    frame_t = np.arange(n_frames) * _HOP / SAMPLE_RATE
    freqs = np.fft.rfftfreq(_N_FFT, 1 / SAMPLE_RATE)[:, None]

    # F0 contour: slow random intonation, declination and pitch accents.
    t = np.arange(n) / SAMPLE_RATE
    contour = np.zeros(n)
    for _ in range(3):
        contour += np.sin(2 * np.pi * rng.uniform(0.2, 1.5) * t + rng.uniform(0, 2 * np.pi))
    semitones = voice.f0_range_st / 3 * contour - 2.0 * t / max(seconds, 1e-3)
    semitones += np.interp(t, frame_t, tracks.accent)
    f0 = voice.f0_hz * 2 ** (semitones / 12)

    pulses = _stft(_pulse_train(voice, rng, f0))  # (F, T)
    noise = _stft(rng.normal(0.0, 1.0, n))

    tract = np.ones((len(freqs), n_frames))
    for k in range(4):
        tract *= _resonance(freqs, tracks.formants[None, :, k], _BANDWIDTHS[k] * voice.formant_scale)
    octaves = np.log2(np.maximum(freqs[:, 0], 200.0) / 200.0)
    colour = 10 ** ((voice.tilt_db_oct * octaves + voice.timbre_db) / 20)[:, None]
    frication = _resonance(freqs, tracks.noise_centre[None], tracks.noise_bw[None])
    # Fricative noise is normalised so its band peak, not its DC, sets the level.
    frication /= np.maximum(frication.max(axis=0, keepdims=True), 1e-9)

    voiced = pulses * tract * colour * tracks.voicing[None]
    unvoiced = noise * (frication * tracks.noise[None] + 0.05 * voice.breathiness * tract * tracks.voicing[None])
    speech = librosa.istft(voiced + unvoiced, hop_length=_HOP, n_fft=_N_FFT, length=n)
    return speech / max(np.abs(speech).max(), 1e-9)
