"""MusicCaps (Agostinelli et al., 2023), https://www.kaggle.com/datasets/googleai/musiccaps

Expected layout under ``root``::

    musiccaps-public.csv     ytid, start_s, end_s, audioset_positive_labels, aspect_list,
                             caption, author_id, is_balanced_subset, is_audioset_eval
    audio/<ytid>.wav         the audio you downloaded, named by YouTube id (.wav, .flac, .mp3 or
                             .ogg; ``audio_dir`` overrides the folder)

MusicCaps is a list of 10 s windows of YouTube videos with a caption and an aspect list per
window. ``aspect_list`` is a Python-literal list string, parsed with ``ast.literal_eval``;
``audioset_positive_labels`` is a comma-joined list of AudioSet label ids. The record keeps the
window in ``start_s``/``end_s`` with crop policy ``given``; the audio may be the whole video or
already trimmed to the window (the crop stage handles both). Clips from AudioSet's eval split
(``is_audioset_eval``) are the test split; the others train captioning with the captions as given.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.ingest import Adapter
from pipeline.ingest.common import (
    Skipped,
    caption_view,
    find_audio,
    is_youtube_id,
    occurrence_ids,
    parse_bool,
    parse_literal_list,
    parse_window,
    read_table,
)
from pipeline.labels import Labels
from pipeline.records import ClipRecord

DATASET = "musiccaps"
COLUMNS = ("ytid", "start_s", "end_s", "caption", "aspect_list", "is_audioset_eval")


def prepare(root: Path, audio_dir: Path | str | None = None) -> list[ClipRecord]:
    root = Path(root)
    audio_dir = Path(audio_dir) if audio_dir else root / "audio"
    skipped = Skipped(DATASET)
    rows = []
    for row in read_table(root / "musiccaps-public.csv", "MusicCaps metadata", required=COLUMNS):
        if not is_youtube_id(row["ytid"]) or not row["caption"]:
            skipped.add("without a valid ytid or a caption")
            continue
        try:
            start_s, end_s = parse_window(row["start_s"], row["end_s"])
        except ValueError:
            skipped.add("with an unparseable window")
            continue
        try:
            aspects = [str(a) for a in parse_literal_list(row["aspect_list"])]
            is_eval = parse_bool(row["is_audioset_eval"])
            balanced = parse_bool(row["is_balanced_subset"]) if row.get("is_balanced_subset") else None
            author = int(row["author_id"]) if row.get("author_id") else None
        except ValueError:
            skipped.add("with an unparseable aspect_list, flag or author_id")
            continue
        annotations = {
            "ytid": row["ytid"],
            "caption": row["caption"],
            "aspect_list": aspects,
            "audioset_positive_labels": [x for x in row.get("audioset_positive_labels", "").split(",") if x],
        }
        if author is not None:
            annotations["author_id"] = author
        if balanced is not None:
            annotations["is_balanced_subset"] = balanced
        annotations["is_audioset_eval"] = is_eval
        rows.append((row["ytid"], start_s, end_s, is_eval, annotations))
    skipped.report()
    rows.sort(key=lambda r: (r[0], r[1]))
    ids = occurrence_ids(DATASET, [r[0] for r in rows])
    return [
        ClipRecord(
            id=record_id,
            dataset=DATASET,
            split="test" if is_eval else "train",
            audio_path=str(find_audio(audio_dir, ytid).absolute()),
            task_families=[] if is_eval else ["captioning"],
            crop_policy="given",
            start_s=start_s,
            end_s=end_s,
            annotations=annotations,
        )
        for record_id, (ytid, start_s, end_s, is_eval, annotations) in zip(ids, rows)
    ]


def labels(record: ClipRecord) -> Labels:
    tags = list(record.annotations.get("aspect_list") or [])
    return Labels.lenient(caption=record.annotations.get("caption"), tags=tags)


ADAPTER = Adapter(
    name=DATASET,
    prepare=prepare,
    labels=labels,
    prompt_view=caption_view,
    layout="musiccaps-public.csv, audio/<ytid>.(wav|flac|mp3|ogg)",
    description="MusicCaps: human captions and aspect lists of 10 s YouTube windows; AudioSet eval "
    "clips are the test split, the rest train captioning",
)
