"""MTG-Jamendo (Bogdanov et al., 2019), https://github.com/MTG/mtg-jamendo-dataset

Expected layout under ``root``::

    data/autotagging.tsv     the official repository's metadata (``autotagging.tsv`` at the
                             top of ``root`` is accepted too)
    audio/14/214.mp3         the full-quality audio at ``{audio_dir}/{PATH}`` (``audio_dir``
                             defaults to ``root/audio``)

``autotagging.tsv`` is tab-separated with the header ``TRACK_ID ARTIST_ID ALBUM_ID PATH DURATION
TAGS``; a track's tags continue as extra tab-separated fields after ``TAGS``, each written
``category---tag`` with category ``genre``, ``instrument`` or ``mood/theme``. Annotations keep
the raw tag list and split it by category into ``genres``, ``instruments`` and ``moods``.

MTG-Jamendo has no official split. The paper holds out a random 1,000-track test set (§G.7),
whose ids are not published with this dataset, so it is drawn here deterministically: ``test_size``
ids sampled with ``random.Random(seed)`` from the sorted track ids. The drawn ids are written
to ``split_file`` (one id a line); when that file already exists its ids are reused, so the split
never moves between runs. Train tracks feed understanding and reasoning; test tracks none.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from pipeline.files import write_text
from pipeline.ingest import Adapter, DatasetLayoutError
from pipeline.ingest.common import Skipped, log, open_text, parse_number
from pipeline.labels import Labels
from pipeline.prompt_values import strings
from pipeline.records import ClipRecord, make_id

DATASET = "mtg_jamendo"
HEADER = ("TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION", "TAGS")
CATEGORIES = {"genre": "genres", "instrument": "instruments", "mood/theme": "moods"}


def prepare(
    root: Path,
    audio_dir: Path | str | None = None,
    test_size: int = 1000,
    seed: int = 0,
    split_file: Path | str | None = None,
) -> list[ClipRecord]:
    root = Path(root)
    audio_dir = Path(audio_dir) if audio_dir else root / "audio"
    tsv = root / "data" / "autotagging.tsv"
    if not tsv.exists() and (root / "autotagging.tsv").exists():
        tsv = root / "autotagging.tsv"
    tracks = _read_tracks(tsv)
    test_ids = _test_ids(sorted(tracks), int(test_size), int(seed), Path(split_file) if split_file else None)
    records = []
    for track_id in sorted(tracks):
        annotations = tracks[track_id]
        split = "test" if track_id in test_ids else "train"
        records.append(
            ClipRecord(
                id=make_id(DATASET, track_id),
                dataset=DATASET,
                split=split,
                audio_path=str((audio_dir / annotations["path"]).absolute()),
                task_families=[] if split == "test" else ["understanding", "reasoning"],
                crop_policy="paper",
                source_duration_s=annotations["duration"] or None,
                annotations=annotations,
            )
        )
    return records


def _read_tracks(tsv: Path) -> dict[str, dict]:
    skipped = Skipped(DATASET)
    tracks: dict[str, dict] = {}
    with open_text(tsv, "MTG-Jamendo autotagging metadata") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = [h.strip() for h in next(reader, [])]
        if tuple(header[:5]) != HEADER[:5]:
            raise DatasetLayoutError(
                f"MTG-Jamendo metadata {tsv} does not start with the header {' '.join(HEADER)}"
            )
        for row in reader:
            row = [field.strip() for field in row]
            if not any(row):
                continue
            if len(row) < 5 or not row[0] or not row[3]:
                skipped.add("without a track id or path")
                continue
            track_id, artist_id, album_id, path, duration = row[:5]
            if track_id in tracks:
                skipped.add("with a repeated track id")
                continue
            try:
                seconds = parse_number(duration)
                if seconds < 0:
                    raise ValueError(duration)
            except ValueError:
                skipped.add("with an unparseable duration")
                continue
            tags = [t for t in row[5:] if t]
            annotations = {
                "track_id": track_id,
                "artist_id": artist_id,
                "album_id": album_id,
                "path": path,
                "duration": seconds,
                "tags": tags,
                **{key: [] for key in CATEGORIES.values()},
            }
            for tag in tags:
                category, sep, name = tag.partition("---")
                if sep and category in CATEGORIES:
                    annotations[CATEGORIES[category]].append(name)
            tracks[track_id] = annotations
    skipped.report()
    return tracks


def _test_ids(track_ids: list[str], test_size: int, seed: int, split_file: Path | None) -> set[str]:
    """The held-out track ids: read from ``split_file`` if it exists, else drawn and written there."""
    if split_file is not None and split_file.exists():
        with open(split_file, encoding="utf-8") as fh:
            chosen = {line.strip() for line in fh if line.strip() and not line.startswith("#")}
        unknown = chosen.difference(track_ids)
        if unknown:
            log.warning("%s: %d test ids in %s are not in the metadata", DATASET, len(unknown), split_file)
        log.info("%s: reusing the test split in %s (%d ids)", DATASET, split_file, len(chosen))
        return chosen
    if test_size < 0:
        raise ValueError(f"{DATASET}: test_size must be >= 0, got {test_size}")
    if test_size > len(track_ids):
        log.warning("%s: test_size %d is more than the %d tracks; all are test", DATASET, test_size, len(track_ids))
    chosen = set(random.Random(seed).sample(track_ids, min(test_size, len(track_ids))))
    if split_file is not None:
        split_file.parent.mkdir(parents=True, exist_ok=True)
        write_text(split_file, "".join(f"{t}\n" for t in sorted(chosen)))
        log.info("%s: wrote the %d test ids (seed %d) to %s", DATASET, len(chosen), seed, split_file)
    return chosen


def labels(record: ClipRecord) -> Labels:
    a = record.annotations
    return Labels.lenient(genres=list(a.get("genres") or []), instruments=list(a.get("instruments") or []) or None,
                  instrument_vocabulary="mtg_jamendo", moods=list(a.get("moods") or []), tags=list(a.get("tags") or []))


def prompt_view(a: dict) -> dict:
    return {"genres": strings(a.get("genres")), "instruments": strings(a.get("instruments")),
            "moods": strings(a.get("moods"))}


# ---------------------------------------------------------------------------------------------
# The tags in words, for the template writer (MTG-Jamendo writes them as run-together words)


GENRE_WORDS = {
    "hiphop": "hip-hop", "rnb": "R&B", "drumnbass": "drum and bass", "easylistening": "easy listening",
    "newage": "new age", "triphop": "trip-hop", "poprock": "pop rock", "idm": "IDM", "chillout": "chill-out",
    "darkambient": "dark ambient", "bossanova": "bossa nova", "alternativerock": "alternative rock",
    "singersongwriter": "singer-songwriter", "worldfusion": "world fusion", "deephouse": "deep house",
    "jazzfusion": "jazz fusion", "hardrock": "hard rock", "acidjazz": "acid jazz", "rocknroll": "rock and roll",
    "electropop": "electropop", "synthpop": "synth-pop", "edm": "EDM", "lounge": "lounge", "dubstep": "dubstep",
    "breakbeat": "breakbeat", "eurodance": "Eurodance", "postrock": "post-rock", "newwave": "new wave",
    "hardcore": "hardcore", "reggae": "reggae", "90s": "1990s pop", "80s": "1980s pop", "60s": "1960s pop",
}


INSTRUMENT_WORDS = {
    "electricguitar": "electric guitar", "acousticguitar": "acoustic guitar", "classicalguitar": "classical guitar",
    "drummachine": "drum machine", "electricpiano": "electric piano", "doublebass": "double bass",
    "acousticbassguitar": "acoustic bass guitar", "pipeorgan": "pipe organ", "rhodes": "Rhodes piano",
    "synthesizer": "synthesizer", "computer": "computer-made sounds", "beat": "a programmed beat",
    "pad": "synth pad", "sampler": "samples", "voice": "voice", "bongo": "bongos", "bell": "bells",
}


THEMES = {
    "film", "movie", "christmas", "advertising", "commercial", "corporate", "documentary", "background",
    "children", "game", "holiday", "nature", "party", "retro", "space", "sport", "summer", "trailer",
    "travel", "love", "soundscape", "ballad", "action", "adventure", "horror", "wedding", "sexy", "fun",
}


MOOD_WORDS = {"dream": "dreamy", "melancholic": "melancholic", "funny": "funny"}


def template_words(view: dict) -> dict:
    instruments = view.get("instruments") or []
    moods, themes = [], []
    for mood in view.get("moods") or []:
        (themes if mood in THEMES else moods).append(MOOD_WORDS.get(mood, mood))
    return {"genres": [GENRE_WORDS.get(g, g) for g in view.get("genres") or []],
            "instruments": [INSTRUMENT_WORDS.get(i, i) for i in instruments],
            "vocals": True if "voice" in instruments else None, "moods": moods, "themes": themes}


ADAPTER = Adapter(
    name=DATASET,
    prepare=prepare,
    layout="data/autotagging.tsv, audio/{PATH} (e.g. audio/14/214.mp3)",
    description="MTG-Jamendo autotagging: genre, instrument and mood/theme tags; a fixed random "
    "test set (options test_size=1000, seed=0, split_file), the rest train",
    labels=labels,
    prompt_view=prompt_view,
    template_words=template_words,
)
