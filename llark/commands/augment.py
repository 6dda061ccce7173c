"""``llark augment``: madmom's tempo, key, chords and beat grid of each cropped clip."""

from __future__ import annotations

from pathlib import Path

from llark.commands.common import add_runner_options, add_verb, run_stage_from_args


def register(sub) -> None:
    from pipeline.augment.stage import AugmentSettings as DEFAULTS  # its fields' defaults

    p = add_verb(
        sub, "augment", "estimate each clip's tempo, key, chords and beat grid with madmom",
        "Run madmom on each clip the model hears (the wav at clip_path, written by `llark crop`)\n"
        "and add to the record's features: tempo_in_beats_per_minute_madmom (BPM, one decimal),\n"
        "key_madmom ('F# minor'), chords_madmom ([{start, end, chord}]), beat_grid_madmom\n"
        "([{time, beat_number}], metres 3 and 4), all times in seconds from the clip start, and\n"
        "unavailable ({feature: reason}) for features a clip has none of (silence, noise, a clip\n"
        "too short). Output: OUT (augmented clip records) and OUT's .errors.jsonl (records without\n"
        "a clip, unreadable clips). Each worker uses one core.",
    )
    p.add_argument("input", type=Path, help="input JSONL of clip records (from `llark crop`)")
    p.add_argument("--out", required=True, type=Path, help="output JSONL")
    p.add_argument("--beats-per-bar", type=int, nargs="+", default=list(DEFAULTS.beats_per_bar),
                   help="the metres the downbeat tracker chooses between")
    p.add_argument("--silence-dbfs", type=float, default=DEFAULTS.silence_dbfs,
                   help="a clip whose peak is below this gets no features (reason: silent)")
    p.add_argument("--min-tempo-seconds", type=float, default=DEFAULTS.min_tempo_s,
                   help="clips shorter than this get no tempo")
    add_runner_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.augment import AugmentSettings, augment_stage
    from pipeline.runner import StageConfigError

    try:
        settings = AugmentSettings(beats_per_bar=tuple(args.beats_per_bar), silence_dbfs=args.silence_dbfs,
                                   min_tempo_s=args.min_tempo_seconds)
    except ValueError as exc:
        raise StageConfigError(str(exc)) from None
    return run_stage_from_args(augment_stage(settings), args)
