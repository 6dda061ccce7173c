"""The demo dataset's five styles, the genre labels of its clips."""

from __future__ import annotations

from dataclasses import dataclass


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
