"""A synthetic demo dataset with exact ground truth: short multi-instrument clips in known keys,
tempos, metres, chord progressions and styles.

It lets the whole pipeline run (and be checked) without downloading anything: every clip is
rendered from a seed with numpy, so the same parameters always give byte-identical files, and its
annotations are the plan it was rendered from rather than an estimate. The music is simple but
built the way the estimators expect real music to be (drums with accented downbeats, a bass on
the chord roots, a chord change per bar, a diatonic melody), so madmom's tempo, key and downbeat
estimators mostly get it right; ``tests/test_demo_data.py`` checks that.

Layout written under ``out_dir``::

    README.txt               what this is (synthetic)
    demo_params.json         the parameters it was generated with
    metadata.csv             one row per clip (written last: its absence means an unfinished run)
    long_tracks.csv          one row per full-length track (only when long_tracks > 0)
    audio/{split}/{id}.flac  16-bit mono FLAC at sample_rate
    audio/long/{id}.flac     the full-length tracks, for whole-track speed benchmarks
    annotations/{id}.json    the metadata row plus beats, chords (and sections for long tracks)
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
from scipy import signal

from pipeline.files import atomic_write, write_text

GENERATOR_VERSION = 1
METADATA_COLUMNS = (
    "id", "split", "genre", "tempo_bpm", "key", "tonic", "mode", "metre", "beats_per_bar",
    "instruments", "progression", "duration_s", "audio",
)
PEAK_DBFS = -1.0

SHARP_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
FLAT_NAMES = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
CHORD_INTERVALS = {"maj": (0, 4, 7), "min": (0, 3, 7), "7": (0, 4, 7, 10), "dim": (0, 3, 6)}
ROMAN_DEGREES = {"i": 0, "ii": 1, "iii": 2, "iv": 3, "v": 4, "vi": 5, "vii": 6}

# Four-bar loops; each starts on the tonic chord. Every minor loop has the harmonic-minor V (major,
# with the leading tone): without it (e.g. i-VI-III-VII) madmom's key CNN mostly hears the
# relative major, and so would a listener.
LOOPS = {
    "major": ("I-IV-V-I", "I-vi-IV-V", "I-V-vi-IV", "I-ii-V7-I", "I-IV-I-V", "I-vi-ii-V7"),
    "minor": ("i-iv-V-i", "i-VI-V-i", "i-iio-V7-i", "i-iv-i-V7", "i-VII-iv-V", "i-III-iv-V"),
}


# ---------------------------------------------------------------------------------------------
# Styles


@dataclass(frozen=True)
class Style:
    """A genre-like label: what is audibly different between styles (tempo, metre, instruments,
    accompaniment figure and drum pattern)."""

    name: str
    beats_per_bar: int
    tempo_range: tuple[float, float]
    comp: tuple[str, str]  # (instrument, figure)
    pad: str | None  # sustained chords
    melody: tuple[str, ...]  # one is picked per clip
    bass: tuple[str, str]  # (instrument, figure)
    # Drum patterns on an eighth-note grid (2 steps per beat): X accent, x normal, o soft.
    kick: str
    snare: str
    hat: str
    open_hat: str = ""
    crash_every: int = 0  # bars between crashes on the downbeat (0: none)
    melody_eighths: float = 0.3  # chance a beat carries two eighth notes instead of one
    melody_hold: float = 0.15  # chance a beat continues the previous note
    reverb: float = 0.2


STYLES = (
    Style("waltz", 3, (84, 132), ("piano", "oompah"), None, ("strings", "piano"),
          ("bass", "downbeat"), kick="X.....", snare="..o.o.", hat="o.o.o.",
          melody_eighths=0.2, melody_hold=0.25, reverb=0.3),
    Style("folk", 3, (100, 150), ("guitar", "arpeggio"), None, ("strings", "organ"),
          ("bass", "root_fifth"), kick="X...x.", snare="", hat="xoxoxo",
          melody_eighths=0.4, melody_hold=0.1, reverb=0.15),
    Style("ballad", 4, (70, 90), ("piano", "arpeggio"), "strings", ("piano", "strings"),
          ("bass", "root_fifth"), kick="X...x...", snare="..o...o.", hat="o.o.o.o.",
          melody_eighths=0.2, melody_hold=0.3, reverb=0.35),
    Style("rock", 4, (104, 152), ("guitar", "strum"), "organ", ("synth_lead", "guitar"),
          ("bass", "eighths"), kick="X...x.x.", snare="..X...X.", hat="xoxoxoxo",
          crash_every=4, melody_eighths=0.3, melody_hold=0.15, reverb=0.12),
    Style("electronic", 4, (118, 134), ("organ", "offbeat"), "synth_pad", ("synth_lead",),
          ("synth_bass", "offbeat"), kick="X.x.x.x.", snare="..x...x.", hat="o.o.o.o.",
          open_hat=".x.x.x.x", crash_every=8, melody_eighths=0.45, melody_hold=0.1,
          reverb=0.2),
)
STYLE_BY_NAME = {s.name: s for s in STYLES}


# ---------------------------------------------------------------------------------------------
# Keys and chords


def key_name(tonic: int, mode: str) -> str:
    """Readable key name with the usual spelling, e.g. 'F# minor', 'Bb major'."""
    return f"{pitch_names(tonic, mode)[tonic]} {mode}"


def pitch_names(tonic: int, mode: str) -> tuple[str, ...]:
    """Sharps for sharp keys, flats for flat keys (judged from the relative major's signature)."""
    major_tonic = tonic if mode == "major" else (tonic + 3) % 12
    sharps = (major_tonic * 7) % 12  # position on the circle of fifths
    return SHARP_NAMES if 0 < sharps <= 6 and major_tonic != 5 else FLAT_NAMES


def parse_roman(numeral: str) -> tuple[int, str]:
    """'V7' -> (4, '7'), 'vi' -> (5, 'min'), 'III' -> (2, 'maj'), 'viio' -> (6, 'dim')."""
    core = numeral.rstrip("7o")
    degree = ROMAN_DEGREES[core.lower()]
    if numeral.endswith("7"):
        return degree, "7"
    if numeral.endswith("o"):
        return degree, "dim"
    return degree, "maj" if core.isupper() else "min"


def chord_root(tonic: int, mode: str, numeral: str) -> int:
    degree, _ = parse_roman(numeral)
    return (tonic + SCALES[mode][degree]) % 12


def chord_label(tonic: int, mode: str, numeral: str) -> str:
    """mir_eval chord label, e.g. 'F#:min', 'E:maj', 'G:7'."""
    _, quality = parse_roman(numeral)
    root = chord_root(tonic, mode, numeral)
    return f"{pitch_names(tonic, mode)[root]}:{quality}"


def chord_pitch_classes(tonic: int, mode: str, numeral: str) -> tuple[int, ...]:
    _, quality = parse_roman(numeral)
    root = chord_root(tonic, mode, numeral)
    return tuple((root + i) % 12 for i in CHORD_INTERVALS[quality])


def midi_to_hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12)


# ---------------------------------------------------------------------------------------------
# The plan of one clip


@dataclass
class ClipPlan:
    """Everything that decides one clip; the annotations are derived from it, the audio rendered."""

    id: str
    split: str
    style: Style
    tempo_bpm: float
    tonic: int
    mode: str
    loop: tuple[str, ...]
    bars: list[str]  # one roman numeral per bar
    sections: list[str]  # one section name per bar ("main" for short clips)
    instruments: dict[str, str]  # role -> instrument
    lead_in_s: float
    duration_s: float
    sample_rate: int
    seed: tuple[int, ...]
    folder: str  # under audio/

    @property
    def beat_s(self) -> float:
        return 60.0 / self.tempo_bpm

    @property
    def bar_s(self) -> float:
        return self.beat_s * self.style.beats_per_bar

    def bar_start(self, bar: int) -> float:
        return self.lead_in_s + bar * self.bar_s

    @property
    def audio_relpath(self) -> str:
        return f"audio/{self.folder}/{self.id}.flac"


# Which parts play in each section of a long track.
SECTION_ROLES = {
    "main": {"comp", "pad", "melody", "bass", "drums"},
    "intro": {"comp", "pad", "bass"},
    "verse": {"comp", "melody", "bass", "drums"},
    "chorus": {"comp", "pad", "melody", "bass", "drums"},
    "bridge": {"pad", "melody", "bass", "drums"},
    "outro": {"comp", "pad", "bass"},
}
LONG_FORM_BODY = ("verse", "chorus", "verse", "chorus", "bridge", "chorus")


def clip_bars(loop: tuple[str, ...], n_bars: int, last_bar_heard: float) -> list[str]:
    """Repeat the loop over the clip and return to the tonic (``loop[0]``) for the final bar; when
    less than half of that bar is heard, the bar before is the tonic too, so the cadence is audible."""
    bars = [loop[b % len(loop)] for b in range(n_bars)]
    bars[-1] = loop[0]
    if n_bars >= 2 and last_bar_heard < 0.5:
        bars[-2] = loop[0]
    return bars


def n_bars_for(duration_s: float, lead_in_s: float, bar_s: float) -> int:
    """How many bars start before the end of the clip."""
    return max(1, int(np.ceil((duration_s - lead_in_s) / bar_s)))


def key_sequence(seed: int) -> list[tuple[int, str]]:
    """The 24 keys in a seeded order that alternates major and minor."""
    rng = np.random.default_rng([seed, 24])
    majors = rng.permutation(12)
    minors = rng.permutation(12)
    return [k for pair in zip(((int(t), "major") for t in majors), ((int(t), "minor") for t in minors)) for k in pair]


def plan_clip(index: int, seed: int, duration_s: float, sample_rate: int, split: str,
              keys: list[tuple[int, str]], long: bool = False) -> ClipPlan:
    """Plan clip ``index``: its key cycles through all 24 and its style through all 5 (24 and 5 are
    coprime, so every key meets every style once in 120 clips); the rest is drawn from its seed."""
    tonic, mode = keys[index % len(keys)]
    style = STYLES[index % len(STYLES)]
    rng = np.random.default_rng([seed, int(long), index])
    lo, hi = style.tempo_range
    tempo = round(float(rng.uniform(lo, hi)), 1)
    lead_in = round(float(rng.uniform(0.0, 0.5)), 3)
    loop = tuple(LOOPS[mode][rng.integers(len(LOOPS[mode]))].split("-"))
    bar_s = 60.0 / tempo * style.beats_per_bar
    n_bars = n_bars_for(duration_s, lead_in, bar_s)
    if long:
        bars, sections = long_form_bars(loop, n_bars, mode, rng)
    else:
        last_bar_heard = (duration_s - lead_in) / bar_s - (n_bars - 1)
        bars, sections = clip_bars(loop, n_bars, last_bar_heard), ["main"] * n_bars
    instruments = {
        "comp": style.comp[0],
        "melody": style.melody[int(rng.integers(len(style.melody)))],
        "bass": style.bass[0],
        "drums": "drums",
    }
    if style.pad:
        instruments["pad"] = style.pad
    ident = f"demo-long-{index:03d}" if long else f"demo-{index:05d}"
    return ClipPlan(
        id=ident, split=split, style=style, tempo_bpm=tempo, tonic=tonic, mode=mode, loop=loop,
        bars=bars, sections=sections, instruments=instruments, lead_in_s=lead_in,
        duration_s=duration_s, sample_rate=sample_rate, seed=(seed, int(long), index, 1),
        folder="long" if long else split,
    )


def long_form_bars(loop: tuple[str, ...], n_bars: int, mode: str, rng: np.random.Generator):
    """A 4-bar intro, then verse/chorus/bridge sections of 8 bars (LONG_FORM_BODY, repeated as
    needed) and a 4-bar outro ending on the tonic; the chorus and bridge use their own loops."""
    others = [tuple(p.split("-")) for p in LOOPS[mode] if tuple(p.split("-")) != loop]
    chorus, bridge = (others[i] for i in rng.choice(len(others), size=2, replace=False))
    section_loops = {"intro": loop, "verse": loop, "chorus": chorus, "bridge": bridge, "outro": loop}
    names = ["intro"] * 4
    while len(names) < n_bars - 4:
        for name in LONG_FORM_BODY:
            names += [name] * 8
    names = names[: max(0, n_bars - 4)] + ["outro"] * min(4, n_bars)
    bars, position = [], 0
    for b, name in enumerate(names):
        position = position + 1 if b and names[b - 1] == name else 0
        bars.append(section_loops[name][position % len(loop)])
    bars[-1] = loop[0]
    return bars, names[:n_bars]


def assign_splits(plans_keys: list[tuple[str, int]]) -> list[str]:
    """Deterministic ~80/10/10 split, stratified by (mode, metre) so the held-out clips cover
    both modes and both metres: within each stratum, every 10th clip is test, every 10th valid."""
    seen: dict[tuple[str, int], int] = {}
    splits = []
    for stratum in plans_keys:
        j = seen.get(stratum, 0)
        seen[stratum] = j + 1
        splits.append("valid" if j % 10 == 4 else "test" if j % 10 == 9 else "train")
    return splits


# ---------------------------------------------------------------------------------------------
# Ground truth


def beat_annotations(plan: ClipPlan) -> list[dict]:
    n = plan.style.beats_per_bar
    beats = []
    k = 0
    while (t := plan.lead_in_s + k * plan.beat_s) < plan.duration_s - 1e-9:
        beats.append({"time": round(t, 6), "beat_number": k % n + 1})
        k += 1
    return beats


def chord_annotations(plan: ClipPlan) -> list[dict]:
    chords = []
    if plan.lead_in_s > 0:
        chords.append({"start": 0.0, "end": round(plan.lead_in_s, 6), "chord": "N"})
    for b, numeral in enumerate(plan.bars):
        start = plan.bar_start(b)
        end = min(plan.bar_start(b + 1), plan.duration_s)
        if start >= plan.duration_s:
            break
        chords.append({"start": round(start, 6), "end": round(end, 6),
                       "chord": chord_label(plan.tonic, plan.mode, numeral)})
    return chords


def section_annotations(plan: ClipPlan) -> list[dict]:
    out = []
    for b, name in enumerate(plan.sections):
        start = plan.bar_start(b) if b else 0.0
        if out and out[-1]["section"] == name:
            out[-1]["end"] = round(min(plan.bar_start(b + 1), plan.duration_s), 6)
        else:
            out.append({"start": round(start, 6),
                        "end": round(min(plan.bar_start(b + 1), plan.duration_s), 6),
                        "section": name})
    return out


def metadata_row(plan: ClipPlan) -> dict:
    return {
        "id": plan.id,
        "split": plan.split,
        "genre": plan.style.name,
        "tempo_bpm": plan.tempo_bpm,
        "key": key_name(plan.tonic, plan.mode),
        "tonic": pitch_names(plan.tonic, plan.mode)[plan.tonic],
        "mode": plan.mode,
        "metre": f"{plan.style.beats_per_bar}/4",
        "beats_per_bar": plan.style.beats_per_bar,
        "instruments": ";".join(sorted(set(plan.instruments.values()))),
        "progression": "-".join(plan.loop),
        "duration_s": plan.duration_s,
        "audio": plan.audio_relpath,
    }


def annotation_document(plan: ClipPlan) -> dict:
    doc = metadata_row(plan)
    doc["instruments"] = sorted(set(plan.instruments.values()))
    doc.update(
        synthetic=True,
        sample_rate=plan.sample_rate,
        lead_in_s=plan.lead_in_s,
        parts=dict(sorted(plan.instruments.items())),
        bar_chords=list(plan.bars),
        beats=beat_annotations(plan),
        chords=chord_annotations(plan),
    )
    if any(s != "main" for s in plan.sections):
        doc["sections"] = section_annotations(plan)
    return doc


# ---------------------------------------------------------------------------------------------
# Instrument timbres: (frequency Hz, held seconds, sample rate, rng) -> samples incl. release


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


# ---------------------------------------------------------------------------------------------
# Writing the dataset


@dataclass
class DemoSummary:
    out_dir: Path
    metadata_path: Path
    n_clips: int
    n_long: int
    splits: dict[str, int]
    generated: bool  # False when an existing dataset with the same parameters was kept
    seconds: float
    long_tracks_path: Path | None = None
    params: dict = field(default_factory=dict)


def write_clip(out_dir: Path, plan: ClipPlan) -> dict:
    """Render and write one clip's audio and annotation; return its metadata row."""
    audio = render_audio(plan)
    path = out_dir / plan.audio_relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        sf.write(fh, audio, plan.sample_rate, subtype="PCM_16", format="FLAC")
    write_text(out_dir / "annotations" / f"{plan.id}.json",
                json.dumps(annotation_document(plan), indent=1) + "\n")
    return metadata_row(plan)


def _write_clip_job(job: tuple[str, ClipPlan]) -> dict:
    return write_clip(Path(job[0]), job[1])


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METADATA_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plan_dataset(n_clips: int, seed: int, duration_s: float, sample_rate: int,
                 long_tracks: int = 0, long_duration_s: float = 210.0) -> tuple[list[ClipPlan], list[ClipPlan]]:
    keys = key_sequence(seed)
    strata = [(keys[i % 24][1], STYLES[i % len(STYLES)].beats_per_bar) for i in range(n_clips)]
    splits = assign_splits(strata)
    clips = [plan_clip(i, seed, duration_s, sample_rate, splits[i], keys) for i in range(n_clips)]
    # long tracks start at a different place in the key cycle so they do not copy clips 0, 1, ...
    longs = [plan_clip(j, seed, long_duration_s, sample_rate, "test", keys[7:] + keys[:7], long=True)
             for j in range(long_tracks)]
    return clips, longs


README_TEXT = """\
LLark demo dataset (SYNTHETIC)
==============================

Every clip here was synthesised by pipeline/demo_data.py from a random seed: simple multi-
instrument pieces (piano, organ, strings, plucked guitar, synth lead and pad, bass, drums) in five
styles (waltz, folk, ballad, rock, electronic). None of it is recorded music and none of it comes
from another dataset. The annotations are exact: they are the plan each clip was rendered from.

metadata.csv             one row per clip: id, split, genre, tempo_bpm, key, tonic, mode, metre,
                         beats_per_bar, instruments (';'-separated), progression (the repeating
                         roman-numeral loop; the last bar returns to the tonic), duration_s, audio
audio/{split}/{id}.flac  16-bit mono FLAC
annotations/{id}.json    the metadata row plus beats [{time, beat_number}], chords
                         [{start, end, chord}] (mir_eval labels, 'N' before the first downbeat)
                         and, for long tracks, sections [{start, end, section}]
long_tracks.csv          full-length tracks (audio/long/) for timing whole-track analysis, if any
demo_params.json         the generation parameters

Times are in seconds from the start of the file. Regenerate with
`llark demo-data --out DIR --clips N` (same parameters give byte-identical files).
"""


def generate_demo_dataset(out_dir: str | os.PathLike, n_clips: int = 240, seed: int = 0,
                          duration_s: float = 15.0, sample_rate: int = 22050, long_tracks: int = 0,
                          long_duration_s: float = 210.0, workers: int | None = None) -> DemoSummary:
    """Write the demo dataset under ``out_dir`` (see the module docstring for the layout).

    When ``out_dir`` already holds a complete dataset made with the same parameters, nothing is
    written. ``workers`` processes render clips in parallel (default: all cores); the output does
    not depend on it.
    """
    if n_clips < 0 or long_tracks < 0:
        raise ValueError("n_clips and long_tracks must be >= 0")
    if duration_s <= 1.0 or long_duration_s <= 1.0:
        raise ValueError("durations must be over 1 s")
    if sample_rate < 16000:
        raise ValueError("sample_rate must be at least 16000 (the hi-hat sits above 6.5 kHz)")
    started = time.perf_counter()
    out = Path(out_dir)
    params = {"generator_version": GENERATOR_VERSION, "n_clips": n_clips, "seed": seed,
              "duration_s": float(duration_s), "sample_rate": sample_rate,
              "long_tracks": long_tracks, "long_duration_s": float(long_duration_s)}
    metadata_path = out / "metadata.csv"
    params_path = out / "demo_params.json"
    long_path = out / "long_tracks.csv" if long_tracks else None

    if metadata_path.exists() and params_path.exists() and _read_params(params_path) == params:
        rows = list(csv.DictReader(metadata_path.open(encoding="utf-8")))
        return DemoSummary(out, metadata_path, len(rows), long_tracks, _count_splits(rows), False,
                           time.perf_counter() - started, long_path, params)

    metadata_path.unlink(missing_ok=True)  # from here on, an interruption leaves no metadata.csv
    _remove_previous_output(out)
    out.mkdir(parents=True, exist_ok=True)
    clips, longs = plan_dataset(n_clips, seed, duration_s, sample_rate, long_tracks, long_duration_s)
    jobs = [(str(out), p) for p in clips + longs]
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs)))
    if workers > 1 and len(jobs) > 4:
        # forkserver: the caller may hold threads (torch, onnxruntime) that fork would copy mid-lock
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            rows = list(pool.map(_write_clip_job, jobs, chunksize=4))
    else:
        rows = [_write_clip_job(job) for job in jobs]
    clip_rows, long_rows = rows[:n_clips], rows[n_clips:]

    write_text(out / "README.txt", README_TEXT)
    if long_path:
        write_text(long_path, _csv_text(long_rows))
    write_text(params_path, json.dumps(params, indent=1) + "\n")
    write_text(metadata_path, _csv_text(clip_rows))
    return DemoSummary(out, metadata_path, n_clips, long_tracks, _count_splits(clip_rows), True,
                       time.perf_counter() - started, long_path, params)


def _read_params(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _count_splits(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["split"]] = counts.get(row["split"], 0) + 1
    return counts


def _remove_previous_output(out: Path) -> None:
    """Delete files an earlier generation wrote (and only those: demo-* audio and annotations)."""
    for pattern in ("audio/*/demo-*.flac", "annotations/demo-*.json", "long_tracks.csv"):
        for path in out.glob(pattern):
            path.unlink()
