"""Rendering a clip from its plan: the note list of each part, the parts, the drums and the mix."""

from __future__ import annotations

import numpy as np
from scipy import signal

from pipeline.demo_data.plan import SECTION_ROLES, ClipPlan
from pipeline.demo_data.synth import TIMBRES, drum_kit
from pipeline.demo_data.theory import SCALES, chord_pitch_classes, chord_root, midi_to_hz, parse_roman

PEAK_DBFS = -1.0


# ---------------------------------------------------------------------------------------------
# Note lists for each part: (start s, held s, midi, velocity)


Note = tuple[float, float, int, float]


def chord_voicing(plan: ClipPlan, numeral: str, low: int = 52) -> list[int]:
    """The chord's pitch classes stacked upward from the root's lowest octave at or above ``low``."""
    pcs = chord_pitch_classes(plan.tonic, plan.mode, numeral)
    root = low + (pcs[0] - low) % 12
    return [root + (pc - pcs[0]) % 12 for pc in pcs]


def bass_root(plan: ClipPlan, numeral: str) -> int:
    pc = chord_root(plan.tonic, plan.mode, numeral)
    return 36 + (pc - 36) % 12  # C2..B2


def active_bars(plan: ClipPlan, role: str):
    for b, numeral in enumerate(plan.bars):
        if role in SECTION_ROLES[plan.sections[b]]:
            yield b, numeral, plan.bar_start(b)


def render_comp_notes(plan: ClipPlan) -> list[Note]:
    figure = plan.style.comp[1]
    beat, n_beats = plan.beat_s, plan.style.beats_per_bar
    notes: list[Note] = []
    for _, numeral, t0 in active_bars(plan, "comp"):
        voicing = chord_voicing(plan, numeral)
        if figure == "oompah":  # chords on the beats after the downbeat; the bass takes beat 1
            for k in range(1, n_beats):
                notes += [(t0 + k * beat, 0.55 * beat, p, 0.55) for p in voicing]
        elif figure == "arpeggio":
            order = [voicing[0], voicing[2], voicing[1] + 12, voicing[2]]
            for step in range(2 * n_beats):
                vel = 0.8 if step == 0 else 0.5
                notes.append((t0 + step * beat / 2, 0.9 * beat, order[step % len(order)], vel))
        elif figure == "strum":
            for step in range(2 * n_beats):
                vel = 0.9 if step == 0 else (0.65 if step % 2 == 0 else 0.4)
                for j, p in enumerate(voicing + [voicing[0] + 12]):
                    notes.append((t0 + step * beat / 2 + 0.007 * j, 0.45 * beat, p, vel))
        elif figure == "offbeat":
            for k in range(n_beats):
                notes += [(t0 + (k + 0.5) * beat, 0.3 * beat, p + 12, 0.6) for p in voicing]
        else:
            raise ValueError(f"unknown comp figure {figure!r}")
    return notes


def render_pad_notes(plan: ClipPlan) -> list[Note]:
    notes: list[Note] = []
    for _, numeral, t0 in active_bars(plan, "pad"):
        notes += [(t0, 0.98 * plan.bar_s, p, 0.5) for p in chord_voicing(plan, numeral, low=55)]
    return notes


def render_bass_notes(plan: ClipPlan) -> list[Note]:
    figure = plan.style.bass[1]
    beat, n_beats = plan.beat_s, plan.style.beats_per_bar
    notes: list[Note] = []
    for _, numeral, t0 in active_bars(plan, "bass"):
        root = bass_root(plan, numeral)
        fifth = root + 7
        if figure == "downbeat":
            notes.append((t0, 1.5 * beat, root, 1.0))
        elif figure == "root_fifth":
            notes.append((t0, (n_beats - 1.2) * beat if n_beats == 3 else 1.8 * beat, root, 1.0))
            notes.append((t0 + (n_beats - 1) * beat if n_beats == 3 else t0 + 2 * beat, 0.9 * beat, fifth, 0.7))
        elif figure == "eighths":
            notes += [(t0 + s * beat / 2, 0.45 * beat, root, 1.0 if s == 0 else 0.65)
                      for s in range(2 * n_beats)]
        elif figure == "offbeat":
            notes.append((t0, 0.4 * beat, root, 1.0))
            notes += [(t0 + (k + 0.5) * beat, 0.4 * beat, root, 0.75) for k in range(n_beats)]
        else:
            raise ValueError(f"unknown bass figure {figure!r}")
    return notes


def render_melody_notes(plan: ClipPlan, rng: np.random.Generator) -> list[Note]:
    """A stepwise diatonic line: chord tones on downbeats, scale steps between, tonic at the end.

    Pitches are scale indices (degree + 7 * octave) above the tonic at MIDI 60..71.
    """
    scale = SCALES[plan.mode]
    base = 60 + plan.tonic

    def to_midi(idx: int, numeral: str) -> int:
        degree, octave = idx % 7, idx // 7
        # harmonic minor (the leading tone) except over the chords built on the natural 7th
        raised = plan.mode == "minor" and degree == 6 and numeral not in ("VII", "III")
        return base + scale[degree] + 12 * octave + int(raised)

    beat, n_beats = plan.beat_s, plan.style.beats_per_bar
    idx = 7 if base < 66 else 0  # keep the line around C5
    notes: list[Note] = []
    for b, numeral, t0 in active_bars(plan, "melody"):
        chord_degree = parse_roman(numeral)[0]
        chord_tones = [d for d in range(0, 15) if (d - chord_degree) % 7 in (0, 2, 4)]
        if b == len(plan.bars) - 1:
            idx = min((d for d in (0, 7, 14)), key=lambda d: abs(d - idx))
            notes.append((t0, 0.95 * plan.bar_s, to_midi(idx, numeral), 0.9))
            continue
        for k in range(n_beats):
            if k == 0:
                near = sorted(chord_tones, key=lambda d: (abs(d - idx), d))[:2]
                idx = near[int(rng.integers(len(near)))]
                onsets = [0.0]
            else:
                r = rng.random()
                if r < plan.style.melody_hold and notes:
                    start, held, midi, vel = notes[-1]
                    notes[-1] = (start, held + beat, midi, vel)
                    continue
                onsets = [0.0, 0.5] if r < plan.style.melody_hold + plan.style.melody_eighths else [0.0]
            for o in onsets:
                if k or o:
                    idx = int(np.clip(idx + rng.choice([-2, -1, -1, 1, 1, 2]), 2, 13))
                held = beat * (0.5 if len(onsets) == 2 else 1.0) * 0.92
                vel = 0.95 if k == 0 and o == 0 else 0.75
                notes.append((t0 + (k + o) * beat, held, to_midi(idx, numeral), vel))
    return notes


def render_part(notes: list[Note], instrument: str, n_samples: int, sr: int,
                rng: np.random.Generator) -> np.ndarray:
    """Render a note list with one timbre; identical notes are synthesised once per part."""
    out = np.zeros(n_samples)
    synth = TIMBRES[instrument]
    cache: dict[tuple[int, int], np.ndarray] = {}
    for start, held, midi, vel in notes:
        i0 = int(round(start * sr))
        if i0 >= n_samples:
            continue
        key = (midi, int(round(held * sr)))
        if key not in cache:
            cache[key] = synth(midi_to_hz(midi), key[1] / sr, sr, rng)
        wave = cache[key]
        m = min(len(wave), n_samples - i0)
        out[i0:i0 + m] += vel * wave[:m]
    return out


# ---------------------------------------------------------------------------------------------
# Drums


STEP_VELOCITY = {"X": 1.0, "x": 0.7, "o": 0.4, ".": 0.0}
DRUM_LEVELS = {"kick": 1.0, "snare": 0.7, "hat": 0.25, "open_hat": 0.22, "crash": 0.3}


def render_drums(plan: ClipPlan, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    sr = plan.sample_rate
    kit = drum_kit(sr, rng)
    style = plan.style
    patterns = {"kick": style.kick, "snare": style.snare, "hat": style.hat, "open_hat": style.open_hat}
    out = np.zeros(n_samples)
    step_s = plan.beat_s / 2
    for b, _, t0 in active_bars(plan, "drums"):
        hits = [(t0, "crash", 1.0)] if style.crash_every and b % style.crash_every == 0 else []
        for name, pattern in patterns.items():
            for step, ch in enumerate(pattern):
                if STEP_VELOCITY[ch]:
                    hits.append((t0 + step * step_s, name, STEP_VELOCITY[ch]))
        for t, name, vel in hits:
            i0 = int(round(t * sr))
            if i0 >= n_samples:
                continue
            wave = kit[name]
            m = min(len(wave), n_samples - i0)
            jitter = 1.0 + 0.08 * (rng.random() - 0.5)
            out[i0:i0 + m] += DRUM_LEVELS[name] * vel * jitter * wave[:m]
    return out


# ---------------------------------------------------------------------------------------------
# Mixing


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x * x))) if len(x) else 0.0


def at_level(x: np.ndarray, db: float) -> np.ndarray:
    level = rms(x)
    return x * (10 ** (db / 20) / level) if level > 0 else x


PART_LEVELS_DB = {"bass": -18.0, "comp": -21.0, "pad": -26.0, "melody": -19.0, "drums": -17.0}


def reverb(x: np.ndarray, sr: int, wet: float, rng: np.random.Generator) -> np.ndarray:
    """Convolution with a decaying, darkened noise tail (RT60 about 1.2 s)."""
    t = np.arange(int(1.2 * sr)) / sr
    lp = signal.butter(1, 4000, btype="lowpass", fs=sr, output="sos")
    ir = signal.sosfilt(lp, rng.standard_normal(len(t))) * np.exp(-5.8 * t)
    ir[: int(0.012 * sr)] = 0.0  # pre-delay
    ir /= np.sqrt(np.sum(ir ** 2))
    tail = signal.fftconvolve(x.astype(np.float32), ir.astype(np.float32))[: len(x)]
    return (1 - wet) * x + wet * tail


def render_audio(plan: ClipPlan) -> np.ndarray:
    """The clip's mono mix as float32 in [-1, 1], peak at PEAK_DBFS."""
    sr = plan.sample_rate
    n = int(round(plan.duration_s * sr))
    rng = np.random.default_rng(list(plan.seed))
    parts = {
        "comp": render_part(render_comp_notes(plan), plan.instruments["comp"], n, sr, rng),
        "melody": render_part(render_melody_notes(plan, rng), plan.instruments["melody"], n, sr, rng),
        "bass": render_part(render_bass_notes(plan), plan.instruments["bass"], n, sr, rng),
        "drums": render_drums(plan, n, rng),
    }
    if "pad" in plan.instruments:
        parts["pad"] = render_part(render_pad_notes(plan), plan.instruments["pad"], n, sr, rng)
    tonal = sum(at_level(parts[r], PART_LEVELS_DB[r]) for r in parts if r != "drums")
    drums = at_level(parts["drums"], PART_LEVELS_DB["drums"])
    mix = reverb(tonal + 0.4 * drums, sr, plan.style.reverb, rng) + 0.6 * drums
    mix += rng.standard_normal(n) * rms(mix) * 10 ** (-55 / 20)  # noise floor
    fade = min(n, int(0.02 * sr))
    mix[n - fade:] *= np.linspace(1.0, 0.0, fade)
    peak = np.max(np.abs(mix))
    mix *= 10 ** (PEAK_DBFS / 20) / peak
    return mix.astype(np.float32)
