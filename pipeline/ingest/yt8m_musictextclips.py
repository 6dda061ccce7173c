"""YouTube8M-MusicTextClips (McKee et al., 2023), https://zenodo.org/records/8040754

Expected layout under ``root``::

    train.csv, test.csv      video_id, start, end, text (one annotated clip a row)
    audio/<video_id>.wav     the audio you downloaded, named by YouTube id (.wav, .flac, .mp3 or
                             .ogg; ``audio_dir`` overrides the folder)

Format as verified from the dataset's README (the Zenodo record above): annotations come in a
train and a test file; each row has ``video_id`` (the YouTube id), ``start`` and ``end`` (the
10 s clip, in seconds, taken from the middle of the video) and ``text`` (a human description of
the clip's audio). The LLark authors' code reads the same two files, ``train.csv`` and
``test.csv``, from one folder.

The paper trains on the whole dataset (§G.10: 1,000 train and 3,169 test clips, no prior
evaluation use), so both files become the train split, feeding captioning with the captions as
given (under ``caption``; ``original_split`` says which file a row came from). The window is kept
in ``start_s``/``end_s`` with crop policy ``given``. At least one of the two files must exist.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.ingest import Adapter, DatasetLayoutError
from pipeline.ingest.common import (
    Skipped,
    caption_view,
    find_audio,
    is_youtube_id,
    log,
    occurrence_ids,
    parse_window,
    read_table,
)
from pipeline.labels import Labels
from pipeline.records import ClipRecord

DATASET = "yt8m_musictextclips"
FILES = ("train.csv", "test.csv")
COLUMNS = ("video_id", "start", "end", "text")


def prepare(root: Path, audio_dir: Path | str | None = None) -> list[ClipRecord]:
    root = Path(root)
    audio_dir = Path(audio_dir) if audio_dir else root / "audio"
    present = [root / name for name in FILES if (root / name).exists()]
    if not present:
        raise DatasetLayoutError(
            f"YouTube8M-MusicTextClips annotations not found: expected {root / FILES[0]} and {root / FILES[1]}"
        )
    if len(present) < len(FILES):
        log.warning("%s: only %s found; the paper trains on both %s", DATASET, present[0].name, " and ".join(FILES))
    skipped = Skipped(DATASET)
    rows = []
    for path in present:
        original_split = path.stem
        for row in read_table(path, "YouTube8M-MusicTextClips annotations", required=COLUMNS):
            if not is_youtube_id(row["video_id"]) or not row["text"]:
                skipped.add("without a valid video id or a caption")
                continue
            try:
                start_s, end_s = parse_window(row["start"], row["end"])
            except ValueError:
                skipped.add("with an unparseable window")
                continue
            annotations = {"video_id": row["video_id"], "caption": row["text"], "original_split": original_split}
            rows.append((row["video_id"], start_s, original_split, end_s, annotations))
    skipped.report()
    rows.sort(key=lambda r: r[:3])
    ids = occurrence_ids(DATASET, [r[0] for r in rows])
    return [
        ClipRecord(
            id=record_id,
            dataset=DATASET,
            split="train",
            audio_path=str(find_audio(audio_dir, video_id).absolute()),
            task_families=["captioning"],
            crop_policy="given",
            start_s=start_s,
            end_s=end_s,
            annotations=annotations,
        )
        for record_id, (video_id, start_s, _, end_s, annotations) in zip(ids, rows)
    ]


def labels(record: ClipRecord) -> Labels:
    return Labels.lenient(caption=record.annotations.get("caption"))


ADAPTER = Adapter(
    name=DATASET,
    prepare=prepare,
    labels=labels,
    prompt_view=caption_view,
    layout="train.csv and test.csv (video_id,start,end,text), audio/<video_id>.(wav|flac|mp3|ogg)",
    description="YouTube8M-MusicTextClips: human descriptions of 10 s music clips from YouTube8M "
    "videos; both files train captioning, as in the paper",
)
