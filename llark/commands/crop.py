"""``llark crop``: cut each record's window into a 44.1 kHz 16-bit mono wav."""

from __future__ import annotations

from pathlib import Path

from llark.commands.common import add_runner_options, add_verb, run_stage_from_args


def register(sub) -> None:
    p = add_verb(
        sub, "crop", "cut each record's 25 s window into a 44.1 kHz 16-bit mono wav",
        "Cut the window the model hears out of each source track (the paper's rule: first\n"
        "25 s of a track under 60 s; else [30, 55) s with p=0.8, [0, 25) s otherwise, seeded by the\n"
        "record id). Input: clip records (from `llark ingest`). Output: OUT (clip records with\n"
        "start_s, end_s, clip_path), OUT's .errors.jsonl, and the wavs under --clips-dir.",
    )
    p.add_argument("input", type=Path, help="input JSONL of clip records")
    p.add_argument("--out", required=True, type=Path, help="output JSONL")
    p.add_argument("--clips-dir", required=True, type=Path, help="where to write the clip wavs")
    p.add_argument("--clip-seconds", type=float, default=25.0, help="window length")
    p.add_argument("--p-late", type=float, default=0.8, help="probability of the [30, 55) s window for tracks of 60 s or more")
    p.add_argument("--seed", type=int, default=0, help="seed mixed with each record id for the window choice")
    p.add_argument("--min-seconds", type=float, default=1.0, help="shortest usable clip")
    p.add_argument("--silence-dbfs", type=float, default=-80.0, help="a clip whose peak is below this is silent")
    p.add_argument("--max-channels", type=int, default=8, help="files with more channels are refused")
    add_runner_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.audio import AudioChecks
    from pipeline.crop import CropSettings, crop_stage
    from pipeline.runner import StageConfigError

    try:
        settings = CropSettings(
            clips_dir=str(Path(args.clips_dir).resolve()), clip_s=args.clip_seconds, seed=args.seed,
            p_late=args.p_late,
            checks=AudioChecks(min_duration_s=args.min_seconds, silence_dbfs=args.silence_dbfs,
                               max_channels=args.max_channels),
        )
    except ValueError as exc:
        raise StageConfigError(str(exc)) from None
    return run_stage_from_args(crop_stage(settings), args)
