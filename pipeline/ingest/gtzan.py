"""GTZAN Genre Collection: 1,000 30-second excerpts, 100 in each of ten genres.

Tzanetakis & Cook, "Musical genre classification of audio signals", IEEE Transactions on Speech
and Audio Processing 10(5), 2002. http://marsyas.info/downloads/datasets.html

Two layouts are accepted, the original release and the common re-release of it (Kaggle's
"GTZAN Dataset - Music Genre Classification", which unpacks to ``Data/genres_original``)::

    genres/{genre}/{genre}.{nnnnn}.au                   original release (22,050 Hz mono .au)
    genres_original/{genre}/{genre}.{nnnnn}.wav         re-release
    Data/genres_original/{genre}/{genre}.{nnnnn}.wav    re-release, as unpacked

with ``genre`` one of blues, classical, country, disco, hiphop, jazz, metal, pop, reggae, rock
and ``nnnnn`` 00000..00099. The genre is the folder's name, kept as given ("hiphop"; the LLark
paper writes it "hip-hop"). GTZAN is an evaluation set: every record is in the "test" split.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pipeline.ingest import Adapter, DatasetLayoutError
from pipeline.ingest.common import Skipped
from pipeline.labels import Labels
from pipeline.records import ClipRecord, make_id

log = logging.getLogger("llark")

GENRES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")
# (folder under the root, audio extension), in the order they are looked for.
LAYOUTS = (("genres", ".au"), ("genres_original", ".wav"), ("Data/genres_original", ".wav"))


def _find_layout(root: Path) -> tuple[Path, str]:
    for folder, ext in LAYOUTS:
        if (root / folder).is_dir():
            return root / folder, ext
    expected = " or ".join(str(root / folder) for folder, _ in LAYOUTS)
    raise DatasetLayoutError(f"GTZAN genre folder not found: expected {expected}")


def prepare(root: str | Path) -> list[ClipRecord]:
    """Read GTZAN under ``root``: one test record per excerpt, annotated with its genre."""
    root = Path(root)
    genres_dir, ext = _find_layout(root)
    skipped = Skipped("gtzan", unit="files")
    missing = [g for g in GENRES if not (genres_dir / g).is_dir()]
    if len(missing) == len(GENRES):
        raise DatasetLayoutError(
            f"GTZAN genre folders not found: expected {genres_dir}/{{{','.join(GENRES)}}}"
        )
    if missing:
        log.warning("gtzan: %s has no folder for %s", genres_dir, ", ".join(missing))
    records = []
    for genre in GENRES:
        folder = genres_dir / genre
        if not folder.is_dir():
            continue
        pattern = re.compile(rf"^{genre}\.(\d{{5}}){re.escape(ext)}$")
        for path in sorted(folder.iterdir()):
            match = pattern.match(path.name)
            if not match or not path.is_file():
                skipped.add(f"not named {genre}.nnnnn{ext}")
                continue
            records.append(
                ClipRecord(
                    id=make_id("gtzan", genre, match.group(1)),
                    dataset="gtzan",
                    split="test",
                    audio_path=str(path.resolve()),
                    task_families=[],
                    crop_policy="paper",
                    annotations={"genre": genre},
                )
            )
    skipped.report()
    return sorted(records, key=lambda r: r.id)


def labels(record: ClipRecord) -> Labels:
    genre = record.annotations.get("genre")
    return Labels.lenient(genre=genre, genres=[genre] if genre else [], complete=["genres"],
                  vocabularies={"genre": list(GENRES)})


ADAPTER = Adapter(
    name="gtzan",
    prepare=prepare,
    labels=labels,
    layout="genres/{genre}/{genre}.{nnnnn}.au (original) or [Data/]genres_original/{genre}/"
    "{genre}.{nnnnn}.wav (re-release); ten genre folders",
    description="GTZAN genre collection (1,000 excerpts, 10 genres): evaluation, test split",
)
