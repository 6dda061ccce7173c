"""The plan of each clip: its style, key, tempo, bars and sections, drawn from the seed; and the
plan of the whole dataset (the key order, the splits, the long tracks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.demo_data.styles import STYLES, Style
from pipeline.demo_data.theory import LOOPS


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
