"""FMA: the Free Music Archive dataset (Defferrard et al., 2017), https://github.com/mdeff/fma

Expected layout under ``root``::

    fma_metadata/tracks.csv      per-track metadata, a three-line header (see below)
    fma_metadata/genres.csv      genre_id,#tracks,parent,title,top_level
    fma_{subset}/123/123456.mp3  audio: the zero-padded 6-digit track id, in a folder named by
                                 its first three digits (``audio_dir`` overrides the folder)

``tracks.csv`` has a two-level column header: line 1 names the group (``album``, ``artist``,
``set``, ``track``), line 2 the field within it, and line 3 holds only the index label
``track_id``. List fields (``tags``, ``genres``, ``genres_all``) are Python literals such as
``[21, 811]``; they are parsed with ``ast.literal_eval``.

Subsets nest (small ⊂ medium ⊂ large ⊂ full) through the ``(set, subset)`` column, which names
the smallest subset a track is in; ``large`` and ``full`` hold the same tracks (``full`` has the
untrimmed audio). The split is FMA's default one, ``(set, split)``: training → train,
validation → valid, test → test (the paper uses it, §G.2).

Annotations keep FMA's own fields, grouped as in the file (``track``, ``album``, ``artist``; the
``set`` group becomes the record's split), with empty fields left out, counts as numbers, and
genre ids also given as titles (``genres``/``genres_all`` are titles, ``genre_ids``/
``genres_all_ids`` the ids). Free-text fields (``information``, ``bio``) keep their HTML.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from pipeline.ingest import Adapter, DatasetLayoutError
from pipeline.ingest.common import Skipped, open_text, parse_literal_list, parse_number, read_table
from pipeline.labels import Labels
from pipeline.prompt_values import clean_text, strings, unique_words
from pipeline.records import ClipRecord, make_id

DATASET = "fma"
SUBSETS = ("small", "medium", "large", "full")
SPLITS = {"training": "train", "validation": "valid", "test": "test"}
GROUPS = ("track", "album", "artist")

_LIST_FIELDS = {("track", "tags"), ("album", "tags"), ("artist", "tags")}
_GENRE_FIELDS = {("track", "genres"): "genre_ids", ("track", "genres_all"): "genres_all_ids"}
_INT_FIELDS = {
    ("track", f) for f in ("bit_rate", "comments", "duration", "favorites", "interest", "listens", "number")
} | {("album", f) for f in ("comments", "favorites", "id", "listens", "tracks")} | {
    ("artist", f) for f in ("comments", "favorites", "id")
}
_FLOAT_FIELDS = {("artist", "latitude"), ("artist", "longitude")}


def prepare(root: Path, subset: str = "large", audio_dir: Path | str | None = None) -> list[ClipRecord]:
    root = Path(root)
    if subset not in SUBSETS:
        raise ValueError(f"fma: subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    audio_dir = Path(audio_dir) if audio_dir else root / f"fma_{subset}"
    genre_titles = _read_genres(root / "fma_metadata" / "genres.csv")
    tracks_csv = root / "fma_metadata" / "tracks.csv"
    wanted = SUBSETS.index(subset)
    skipped = Skipped(DATASET)
    records: dict[int, ClipRecord] = {}
    with open_text(tracks_csv, "FMA tracks metadata") as fh:
        reader = csv.reader(fh)
        columns = _read_header(reader, tracks_csv)
        for row in reader:
            if not any(field.strip() for field in row):
                continue
            fields = {col: value.strip() for col, value in zip(columns, row[1:])}
            try:
                track_id = int(row[0])
                if track_id < 0:
                    raise ValueError(track_id)
            except (ValueError, IndexError):
                skipped.add("without a track id")
                continue
            if track_id in records:
                skipped.add("with a repeated track id")
                continue
            row_subset = fields.get(("set", "subset"), "")
            if row_subset not in SUBSETS:
                skipped.add("without a known subset")
                continue
            if SUBSETS.index(row_subset) > wanted:
                continue
            split = SPLITS.get(fields.get(("set", "split"), ""))
            if split is None:
                skipped.add("without a known split")
                continue
            try:
                annotations = _annotations(track_id, fields, genre_titles)
            except ValueError as exc:
                skipped.add(f"with an unparseable {exc.args[0]}")
                continue
            name = f"{track_id:06d}"
            duration = annotations["track"].get("duration")
            records[track_id] = ClipRecord(
                id=make_id(DATASET, track_id),
                dataset=DATASET,
                split=split,
                audio_path=str((audio_dir / name[:3] / f"{name}.mp3").absolute()),
                task_families=[] if split == "test" else ["understanding", "reasoning"],
                crop_policy="paper",
                source_duration_s=duration if duration and duration > 0 else None,
                annotations=annotations,
            )
    skipped.report()
    return [records[k] for k in sorted(records)]


def _read_genres(path: Path) -> dict[int, str]:
    titles = {}
    for row in read_table(path, "FMA genres table", required=("genre_id", "title")):
        try:
            titles[int(row["genre_id"])] = row["title"]
        except ValueError:
            continue
    return titles


def _read_header(reader, path: Path) -> list[tuple[str, str]]:
    """The (group, field) name of every column after the first (the track id)."""
    try:
        groups, names, index = next(reader), next(reader), next(reader)
    except StopIteration:
        raise DatasetLayoutError(f"FMA tracks metadata {path} is shorter than its three header lines") from None
    columns = [(g.strip(), n.strip()) for g, n in zip(groups[1:], names[1:])]
    missing = [c for c in (("set", "split"), ("set", "subset")) if c not in columns]
    if not index or index[0].strip() != "track_id" or missing:
        raise DatasetLayoutError(
            f"FMA tracks metadata {path} does not have FMA's header (line 1 groups, line 2 fields "
            "including set/split and set/subset, line 3 'track_id')"
        )
    return columns


def _annotations(track_id: int, fields: dict[tuple[str, str], str], genre_titles: dict[int, str]) -> dict:
    """FMA's fields grouped by their top-level name; ValueError(field name) for a bad value."""
    out: dict = {"track_id": track_id, **{g: {} for g in GROUPS}}
    for (group, name), value in fields.items():
        if group not in GROUPS:
            continue
        key = (group, name)
        try:
            if key in _GENRE_FIELDS:
                ids = [int(g) for g in parse_literal_list(value)]
                out[group][_GENRE_FIELDS[key]] = ids
                out[group][name] = [genre_titles[g] for g in ids if g in genre_titles]
            elif key in _LIST_FIELDS:
                out[group][name] = parse_literal_list(value)
            elif not value:
                continue
            elif key in _INT_FIELDS:
                out[group][name] = int(parse_number(value))
            elif key in _FLOAT_FIELDS:
                out[group][name] = parse_number(value)
            else:
                out[group][name] = value
        except (ValueError, TypeError):
            raise ValueError(f"{group} {name}") from None
    return out


def labels(record: ClipRecord) -> Labels:
    track = record.annotations.get("track") or {}
    top = track.get("genre_top")
    return Labels.lenient(genre=top, genres=list(track.get("genres") or ([top] if top else [])),
                  tags=list(track.get("tags") or []), lyrics_language=track.get("language_code"))


def prompt_view(a: dict) -> dict:
    track, album, artist = (a.get(g) or {} for g in ("track", "album", "artist"))
    return {
        "track.genre_top": track.get("genre_top"),
        "track.genres": strings(track.get("genres")),
        "track.genres_all": strings(track.get("genres_all")),
        "track.tags": strings(track.get("tags")),
        "track.information": clean_text(track.get("information")),
        "track.language_code": track.get("language_code"),
        "album.information": clean_text(album.get("information")),
        "album.tags": strings(album.get("tags")),
        "artist.tags": strings(artist.get("tags")),
    }


_WORDY_TAG = re.compile(r"[a-z][a-z &'-]{1,24}")


def template_words(view: dict) -> dict:
    """The track's genres, and up to 8 of its free tags that read as a few words (not URLs or codes)."""
    tags = [t for t in unique_words(view.get("track.tags") or []) if _WORDY_TAG.fullmatch(t.lower()) and len(t.split()) <= 3]
    return {"genres": unique_words([view.get("track.genre_top"), *(view.get("track.genres") or [])]), "tags": tags[:8]}


ADAPTER = Adapter(
    name=DATASET,
    prepare=prepare,
    layout="fma_metadata/tracks.csv, fma_metadata/genres.csv, fma_{subset}/NNN/NNNNNN.mp3",
    description="FMA (Free Music Archive): track, album and artist metadata, genres and tags; "
    "FMA's default train/validation/test split; option subset=small|medium|large|full",
    labels=labels,
    prompt_view=prompt_view,
    template_words=template_words,
)
