"""MagnaTagATune (Law et al., 2009), https://mirg.city.ac.uk/codeapps/the-magnatagatune-dataset

Expected layout under ``root``::

    annotations_final.csv    clip_id, 188 binary tag columns, mp3_path
    clip_info_final.csv      optional: clip_id, track_number, title, artist, album, url,
                             segmentStart, segmentEnd, original_url, mp3_path
    mp3/f/<name>.mp3         the clips at ``{audio_dir}/{mp3_path}`` (``audio_dir`` defaults
                             to ``root/mp3``)

Both CSV files are tab-separated despite their name, with every value in double quotes. A
clip's ``tags`` are the names of the tag columns whose value is 1; when ``clip_info_final.csv``
is there, its fields (title, artist, album, ...) are joined by ``clip_id``.

There is no official split. The clips sit in 16 folders ``0``-``f``; the common convention
(Dieleman & Schrauwen 2014 and most tagging work since) is folders ``0``-``b`` train, ``c``
valid, ``d``-``f`` test, used here. (The LLark authors' code used ``0``-``a`` / ``b``-``c`` /
``d``-``f``; the test set is the same.) Train and valid clips feed understanding and reasoning;
test clips none.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.ingest import Adapter
from pipeline.ingest.common import Skipped, read_table
from pipeline.labels import Labels
from pipeline.records import ClipRecord, make_id

DATASET = "magnatagatune"
FOLDER_SPLITS = {**{c: "train" for c in "0123456789ab"}, "c": "valid", **{c: "test" for c in "def"}}
_NOT_TAGS = {"clip_id", "mp3_path"}


def prepare(root: Path, audio_dir: Path | str | None = None) -> list[ClipRecord]:
    root = Path(root)
    audio_dir = Path(audio_dir) if audio_dir else root / "mp3"
    clip_info = _read_clip_info(root / "clip_info_final.csv")
    skipped = Skipped(DATASET)
    records: dict[int, ClipRecord] = {}
    path = root / "annotations_final.csv"
    for row in read_table(path, "MagnaTagATune annotations", delimiter="\t", required=("clip_id", "mp3_path")):
        try:
            clip_id = int(row["clip_id"])
        except ValueError:
            skipped.add("without a clip id")
            continue
        if clip_id in records:
            skipped.add("with a repeated clip id")
            continue
        mp3_path = row["mp3_path"]
        if not mp3_path:
            skipped.add("without an mp3 path")
            continue
        split = FOLDER_SPLITS.get(mp3_path.split("/", 1)[0][:1].lower())
        if split is None:
            skipped.add("in a folder other than 0-f")
            continue
        tags = []
        for name, value in row.items():
            if name in _NOT_TAGS:
                continue
            if value == "1":
                tags.append(name)
            elif value not in ("0", ""):
                tags = None
                break
        if tags is None:
            skipped.add("with a tag value other than 0 or 1")
            continue
        annotations = {"clip_id": clip_id, "mp3_path": mp3_path, "tags": tags, **clip_info.get(clip_id, {})}
        records[clip_id] = ClipRecord(
            id=make_id(DATASET, clip_id),
            dataset=DATASET,
            split=split,
            audio_path=str((audio_dir / mp3_path).absolute()),
            task_families=[] if split == "test" else ["understanding", "reasoning"],
            crop_policy="paper",
            annotations=annotations,
        )
    skipped.report()
    return [records[k] for k in sorted(records)]


def _read_clip_info(path: Path) -> dict[int, dict[str, str]]:
    """clip_id → the clip's other non-empty fields; empty when the optional file is absent."""
    if not path.exists():
        return {}
    info = {}
    for row in read_table(path, "MagnaTagATune clip info", delimiter="\t", required=("clip_id",)):
        try:
            clip_id = int(row["clip_id"])
        except ValueError:
            continue
        info[clip_id] = {k: v for k, v in row.items() if k not in _NOT_TAGS and v}
    return info


def labels(record: ClipRecord) -> Labels:
    return Labels.lenient(tags=list(record.annotations.get("tags") or []))


ADAPTER = Adapter(
    name=DATASET,
    prepare=prepare,
    layout="annotations_final.csv, optional clip_info_final.csv, mp3/{mp3_path}",
    description="MagnaTagATune: 188 binary crowd-sourced tags per 29 s clip, plus title/artist/album "
    "when clip_info_final.csv is present; folders 0-b train, c valid, d-f test",
    labels=labels,
)
