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

The work is split by job: ``theory`` (pitch names, scales, chords), ``styles``, ``plan`` (what
decides each clip and the splits), ``annotations`` (the ground truth), ``synth`` (instruments and
drum sounds) and ``render`` (notes, parts and the mix); this module writes the dataset.
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

import soundfile as sf

# Every module's names are imported here too: ``pipeline.demo_data.X`` is the package's public API.
from pipeline.demo_data.annotations import (
    annotation_document,
    beat_annotations,
    chord_annotations,
    metadata_row,
    section_annotations,
)
from pipeline.demo_data.plan import (
    LONG_FORM_BODY,
    SECTION_ROLES,
    ClipPlan,
    assign_splits,
    clip_bars,
    key_sequence,
    long_form_bars,
    n_bars_for,
    plan_clip,
    plan_dataset,
)
from pipeline.demo_data.render import (
    DRUM_LEVELS,
    PART_LEVELS_DB,
    PEAK_DBFS,
    STEP_VELOCITY,
    Note,
    active_bars,
    at_level,
    bass_root,
    chord_voicing,
    render_audio,
    render_bass_notes,
    render_comp_notes,
    render_drums,
    render_melody_notes,
    render_pad_notes,
    render_part,
    reverb,
    rms,
)
from pipeline.demo_data.styles import STYLE_BY_NAME, STYLES, Style
from pipeline.demo_data.synth import (
    TIMBRES,
    additive,
    drum_kit,
    envelope,
    synth_bass,
    synth_guitar,
    synth_lead,
    synth_organ,
    synth_pad,
    synth_piano,
    synth_strings,
    synth_synth_bass,
)
from pipeline.demo_data.theory import (
    CHORD_INTERVALS,
    FLAT_NAMES,
    LOOPS,
    ROMAN_DEGREES,
    SCALES,
    SHARP_NAMES,
    chord_label,
    chord_pitch_classes,
    chord_root,
    key_name,
    midi_to_hz,
    parse_roman,
    pitch_names,
)
from pipeline.files import atomic_write, write_text
from pipeline.worker_lifetime import exit_with_parent

GENERATOR_VERSION = 1
METADATA_COLUMNS = (
    "id", "split", "genre", "tempo_bpm", "key", "tonic", "mode", "metre", "beats_per_bar",
    "instruments", "progression", "duration_s", "audio",
)


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
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=exit_with_parent) as pool:
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
