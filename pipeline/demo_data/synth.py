"""The instruments: additive, plucked-string and drum synthesis.

Each timbre maps (frequency Hz, held seconds, sample rate, rng) to samples, release included.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import signal


def envelope(n_on: int, n_total: int, sr: int, attack_s: float) -> np.ndarray:
    """Linear attack, sustain at 1 while held, then a quick exponential-looking release."""
    env = np.ones(n_total)
    a = max(1, min(n_on, int(attack_s * sr)))
    env[:a] = np.linspace(0.0, 1.0, a, endpoint=False)
    tail = n_total - n_on
    if tail > 0:
        env[n_on:] *= np.linspace(1.0, 0.0, tail) ** 2
    return env


def additive(freq: float, n: int, sr: int, amps, decays=None, vibrato_hz=0.0, vibrato_depth=0.0,
             vibrato_delay_s=0.0, inharmonicity=0.0, phase_rng=None) -> np.ndarray:
    """Sum of harmonics k*f (stretched by inharmonicity), each with its own exponential decay."""
    t = np.arange(n) / sr
    inst_phase = 2 * np.pi * freq * t
    if vibrato_depth:
        ramp = np.clip((t - vibrato_delay_s) / 0.3, 0.0, 1.0)
        # integral of f*depth*ramp*sin(2 pi fv t), ramp treated as slowly varying
        inst_phase -= ramp * freq * vibrato_depth / vibrato_hz * np.cos(2 * np.pi * vibrato_hz * t)
    out = np.zeros(n, dtype=np.float32)
    t32 = t.astype(np.float32)
    for k, amp in enumerate(amps, start=1):
        stretch = k * np.sqrt(1.0 + inharmonicity * k * k)
        if freq * stretch >= 0.45 * sr or amp == 0:
            continue
        phase0 = phase_rng.uniform(0, 2 * np.pi) if phase_rng is not None else 0.0
        # float32 sines are many times faster than float64 ones and precise enough for audio
        partial = np.sin((stretch * inst_phase + phase0).astype(np.float32))
        partial *= np.float32(amp)
        if decays is not None:
            partial *= np.exp(np.float32(-decays[k - 1]) * t32)
        out += partial
    return out


def synth_piano(freq, held_s, sr, rng):
    n_on = int(held_s * sr)
    n = n_on + int(0.25 * sr)
    ks = np.arange(1, 13)
    amps = 1.0 / ks ** 1.3
    # higher notes and higher partials die away faster, as on a piano
    decays = (0.8 + 0.4 * (freq / 261.6)) * (1.0 + 0.55 * (ks - 1))
    tone = additive(freq, n, sr, amps, decays, inharmonicity=0.0003, phase_rng=rng)
    return tone * envelope(n_on, n, sr, 0.003)


def synth_organ(freq, held_s, sr, rng):
    n_on = int(held_s * sr)
    n = n_on + int(0.06 * sr)
    amps = [1.0, 0.7, 0.45, 0.35, 0.0, 0.2, 0.0, 0.12]
    t = np.arange(n) / sr
    tremolo = 1.0 + 0.08 * np.sin(2 * np.pi * 6.0 * t)
    return additive(freq, n, sr, amps, phase_rng=rng) * tremolo * envelope(n_on, n, sr, 0.015)


def synth_strings(freq, held_s, sr, rng):
    n_on = int(held_s * sr)
    n = n_on + int(0.3 * sr)
    ks = np.arange(1, 16)
    amps = 1.0 / ks ** 1.4
    tone = additive(freq, n, sr, amps, vibrato_hz=5.5, vibrato_depth=0.004,
                    vibrato_delay_s=0.15, phase_rng=rng)
    attack = min(0.18, 0.5 * held_s)
    return tone * envelope(n_on, n, sr, attack)


def synth_guitar(freq, held_s, sr, rng):
    """Karplus-Strong plucked string, computed one period per numpy step."""
    n_on = int(held_s * sr)
    n = n_on + int(0.08 * sr)
    period = max(2, int(round(sr / freq - 0.5)))  # the two-point average adds half a sample
    loss = 0.5 * 0.996
    burst = rng.uniform(-1.0, 1.0, period)
    burst = np.convolve(burst, [0.5, 0.5], mode="same")  # softer pick
    y = np.zeros(n + 2 * period + 1)
    y[1:period + 1] = burst
    start = period + 1
    while start < len(y):
        stop = min(start + period, len(y))
        m = stop - start
        y[start:stop] = loss * (y[start - period:start - period + m] + y[start - period - 1:start - period - 1 + m])
        start = stop
    tone = y[1:n + 1]
    return tone * envelope(n_on, n, sr, 0.001)


def synth_lead(freq, held_s, sr, rng):
    n_on = int(held_s * sr)
    n = n_on + int(0.08 * sr)
    ks = np.arange(1, 14)
    amps = np.where(ks % 2 == 1, 1.0 / ks, 0.35 / ks)  # square-ish with some even harmonics
    a = additive(freq, n, sr, amps, vibrato_hz=6.0, vibrato_depth=0.003, vibrato_delay_s=0.2, phase_rng=rng)
    b = additive(freq * 1.004, n, sr, amps, phase_rng=rng)
    return 0.5 * (a + b) * envelope(n_on, n, sr, 0.01)


def synth_pad(freq, held_s, sr, rng):
    n_on = int(held_s * sr)
    n = n_on + int(0.4 * sr)
    ks = np.arange(1, 10)
    amps = 1.0 / ks ** 1.6
    voices = [additive(freq * d, n, sr, amps, phase_rng=rng) for d in (0.997, 1.0, 1.003)]
    return sum(voices) / 3 * envelope(n_on, n, sr, min(0.3, 0.4 * held_s))


def synth_bass(freq, held_s, sr, rng):
    n_on = int(held_s * sr)
    n = n_on + int(0.05 * sr)
    tone = additive(freq, n, sr, [1.0, 0.5, 0.25, 0.12], decays=[1.5, 2.5, 4.0, 6.0], phase_rng=rng)
    return tone * envelope(n_on, n, sr, 0.005)


def synth_synth_bass(freq, held_s, sr, rng):
    n_on = int(held_s * sr)
    n = n_on + int(0.03 * sr)
    ks = np.arange(1, 10)
    tone = additive(freq, n, sr, 1.0 / ks, decays=3.0 + 3.0 * ks, phase_rng=rng)
    return tone * envelope(n_on, n, sr, 0.004)


TIMBRES: dict[str, Callable] = {
    "piano": synth_piano,
    "organ": synth_organ,
    "strings": synth_strings,
    "guitar": synth_guitar,
    "synth_lead": synth_lead,
    "synth_pad": synth_pad,
    "bass": synth_bass,
    "synth_bass": synth_synth_bass,
}


def drum_kit(sr: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Kick (pitched sine sweep), snare (band-passed noise + tone), hats and crash (high-passed noise)."""
    def t_of(seconds):
        return np.arange(int(seconds * sr)) / sr

    t = t_of(0.4)
    kick_phase = 2 * np.pi * (48 * t + (110 / 28.0) * (1 - np.exp(-28 * t)))
    kick = np.sin(kick_phase) * np.exp(-7 * t)
    kick[: int(0.002 * sr)] += rng.uniform(-0.5, 0.5, int(0.002 * sr))  # beater click

    t = t_of(0.25)
    band = signal.butter(2, [1200, 6000], btype="bandpass", fs=sr, output="sos")
    snare = (signal.sosfilt(band, rng.standard_normal(len(t))) * np.exp(-16 * t) * 0.9
             + 0.6 * np.sin(2 * np.pi * 190 * t) * np.exp(-30 * t))

    high = signal.butter(4, 6500, btype="highpass", fs=sr, output="sos")
    t = t_of(0.08)
    hat = signal.sosfilt(high, rng.standard_normal(len(t))) * np.exp(-55 * t)
    t = t_of(0.35)
    open_hat = signal.sosfilt(high, rng.standard_normal(len(t))) * np.exp(-9 * t)
    t = t_of(1.6)
    crash_hp = signal.butter(2, 3500, btype="highpass", fs=sr, output="sos")
    crash = signal.sosfilt(crash_hp, rng.standard_normal(len(t))) * np.exp(-2.8 * t)
    kit = {"kick": kick, "snare": snare, "hat": hat, "open_hat": open_hat, "crash": crash}
    return {name: wave / np.max(np.abs(wave)) for name, wave in kit.items()}
