"""The crop stage: cut the window the model will hear out of each source track.

The paper's rule (LLark §4.1): one 25 s crop per track. A track shorter than 60 s keeps its first
25 s (or all of it); a longer one keeps [30, 55) s with probability 0.8, else [0, 25) s. The choice
is drawn from a generator seeded by the record id (and ``seed``), so it is the same on every run
and every machine. Records may ask for other policies (``ClipRecord.crop_policy``):

- ``all_windows``: every consecutive full 25 s window (MusicNet's captioning data); a track
  shorter than 25 s gives one window with all of it. Windows that are silent are left out; the
  item fails only if no window is usable.
- ``given``: the record's own ``start_s``/``end_s`` (MusicCaps, YT8M-MusicTextClips). A file that
  was already trimmed to that window (shorter than ``end_s`` and about as long as the window) is
  used whole.

Each clip is written as a mono 16-bit wav at 44.1 kHz under ``clips_dir/<dataset>/<id>.wav``. When
the dataset's adapter knows how to restrict its annotations to a window (MusicNet notes, MedleyDB
instrument activations), the window's annotations go under ``annotations["in_clip"]``, times
relative to the clip.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.audio import TARGET_SAMPLE_RATE, AudioChecks, AudioError, probe, read_window, write_wav16
from pipeline.ingest import with_labels
from pipeline.records import ClipRecord, parse_record
from pipeline.runner import ItemError, Stage


@dataclass(frozen=True)
class CropSettings:
    clips_dir: str
    clip_s: float = 25.0
    long_track_s: float = 60.0
    late_start_s: float = 30.0
    p_late: float = 0.8
    seed: int = 0
    sample_rate: int = TARGET_SAMPLE_RATE
    checks: AudioChecks = field(default_factory=AudioChecks)

    def __post_init__(self) -> None:
        if not self.clip_s > 0:
            raise ValueError(f"clip_s must be positive, got {self.clip_s}")
        if not 0.0 <= self.p_late <= 1.0:
            raise ValueError(f"p_late must be a probability, got {self.p_late}")
        if self.long_track_s < self.late_start_s + self.clip_s:
            raise ValueError(
                f"long_track_s ({self.long_track_s}) must be at least late_start_s + clip_s "
                f"({self.late_start_s + self.clip_s}) so the late window fits"
            )


def record_rng(record_id: str, seed: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{record_id}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def paper_window(record_id: str, duration_s: float, s: CropSettings) -> tuple[float, float]:
    if duration_s < s.long_track_s:
        return 0.0, min(s.clip_s, duration_s)
    if record_rng(record_id, s.seed).random() < s.p_late:
        return s.late_start_s, s.late_start_s + s.clip_s
    return 0.0, s.clip_s


def all_windows(duration_s: float, s: CropSettings) -> list[tuple[float, float]]:
    n = math.floor(duration_s / s.clip_s + 1e-9)
    if n == 0:
        return [(0.0, duration_s)]
    return [(k * s.clip_s, (k + 1) * s.clip_s) for k in range(n)]


def given_window(record: ClipRecord, duration_s: float, tolerance_s: float = 0.5) -> tuple[float, float]:
    start, end = record.start_s, record.end_s
    if end <= duration_s + 0.05:
        return start, min(end, duration_s)
    if duration_s <= (end - start) + tolerance_s:
        return 0.0, duration_s  # the file was already trimmed to the window
    raise AudioError(
        "window_outside_audio",
        f"the given window [{start}, {end}) s lies beyond the audio's {duration_s:.2f} s: {record.audio_path}",
    )


def choose_windows(record: ClipRecord, duration_s: float, s: CropSettings) -> list[tuple[float, float]]:
    if record.crop_policy == "paper":
        return [paper_window(record.id, duration_s, s)]
    if record.crop_policy == "all_windows":
        return all_windows(duration_s, s)
    return [given_window(record, duration_s)]


def _window_annotations(record: ClipRecord, start_s: float, end_s: float) -> dict | None:
    from pipeline.ingest import ADAPTER_MODULES, get_adapter

    if record.dataset not in ADAPTER_MODULES:
        return None
    adapter = get_adapter(record.dataset)
    if adapter.window_annotations is None:
        return None
    return adapter.window_annotations(record, start_s, end_s)


def crop_item(row: dict, settings: CropSettings) -> list[dict]:
    """Per-item function of the crop stage: one source record → one or more clip records."""
    record = parse_record(row)
    info = probe(record.audio_path, settings.checks)
    windows = choose_windows(record, info.duration_s, settings)
    many = record.crop_policy == "all_windows"
    clips, failures = [], []
    for k, (start, end) in enumerate(windows):
        clip_id = f"{record.id}-w{k:03d}" if many else record.id
        try:
            audio = read_window(info, start, end, target_sample_rate=settings.sample_rate, checks=settings.checks)
        except AudioError as exc:
            if not many or exc.code not in ("silent", "too_short"):
                raise
            failures.append(exc)
            continue
        clip_path = Path(settings.clips_dir) / record.dataset / f"{clip_id}.wav"
        write_wav16(clip_path, audio, settings.sample_rate)
        annotations = dict(record.annotations)
        in_clip = _window_annotations(record, start, end)
        if in_clip is not None:
            annotations["in_clip"] = in_clip
        clip = record.model_copy(
            update={
                "id": clip_id,
                "source_id": record.id if many else record.source_id,
                "start_s": round(start, 6),
                "end_s": round(end, 6),
                "source_duration_s": round(info.duration_s, 6),
                "clip_path": str(clip_path.resolve()),
                "annotations": annotations,
            }
        )
        clip = with_labels(clip)  # what the window holds: its beats, the instruments heard in it
        clips.append(ClipRecord.model_validate(clip.model_dump()).model_dump(mode="json", exclude_none=True))
    if not clips:
        raise ItemError(failures[0].code, f"no usable window: {failures[0]}")
    return clips


def crop_stage(settings: CropSettings) -> Stage:
    return Stage(name="crop", process=crop_item, settings=settings)
