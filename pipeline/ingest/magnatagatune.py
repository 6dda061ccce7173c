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
from pipeline.prompt_values import strings
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


def prompt_view(a: dict) -> dict:
    return {"tags": strings(a.get("tags"))}


# ---------------------------------------------------------------------------------------------
# The tags in words, for the template writer (the crowd's spellings, misspellings included)


GENRE_WORDS = {
    "classical": "classical", "clasical": "classical", "rock": "rock", "hard rock": "hard rock",
    "soft rock": "soft rock", "jazz": "jazz", "jazzy": "jazz", "folk": "folk", "ambient": "ambient",
    "new age": "new age", "funk": "funk", "funky": "funk", "country": "country", "reggae": "reggae",
    "electronic": "electronic", "electronica": "electronic", "electro": "electronic", "trance": "trance",
    "heavy metal": "heavy metal", "metal": "metal", "disco": "disco", "industrial": "industrial",
    "jungle": "jungle", "pop": "pop", "punk": "punk", "blues": "blues", "techno": "techno", "house": "house",
    "rap": "rap", "hip hop": "hip-hop", "baroque": "baroque", "medieval": "medieval", "celtic": "Celtic",
    "irish": "Irish folk", "opera": "opera", "world": "world", "middle eastern": "Middle Eastern",
    "indian": "Indian", "india": "Indian", "arabic": "Arabic", "oriental": "East Asian", "eastern": "Eastern",
    "spanish": "Spanish", "tribal": "tribal", "dance": "dance",
}


INSTRUMENT_WORDS = {
    "guitar": "guitar", "guitars": "guitar", "acoustic guitar": "acoustic guitar",
    "electric guitar": "electric guitar", "classical guitar": "classical guitar", "piano": "piano",
    "piano solo": "piano", "harpsichord": "harpsichord", "harpsicord": "harpsichord", "sitar": "sitar",
    "clarinet": "clarinet", "woodwind": "woodwinds", "horns": "horns", "horn": "horn", "banjo": "banjo",
    "violin": "violin", "violins": "violins", "fiddle": "fiddle", "strings": "strings", "string": "strings",
    "synth": "synthesizer", "synthesizer": "synthesizer", "trumpet": "trumpet", "percussion": "percussion",
    "drum": "drums", "drums": "drums", "bongos": "bongos", "bass": "bass", "keyboard": "keyboard",
    "organ": "organ", "bells": "bells", "chimes": "chimes", "harp": "harp", "lute": "lute", "oboe": "oboe",
    "viola": "viola", "cello": "cello", "flute": "flute", "flutes": "flute", "sax": "saxophone",
    "orchestra": "orchestra", "choir": "choir", "clapping": "hand claps",
}


MOOD_WORDS = {
    "heavy": "heavy", "eerie": "eerie", "spacey": "spacey", "quiet": "quiet", "happy": "happy", "airy": "airy",
    "repetitive": "repetitive", "loud": "loud", "weird": "weird", "dark": "dark", "strange": "strange",
    "mellow": "mellow", "light": "light", "sad": "sad", "scary": "scary", "calm": "calm", "upbeat": "upbeat",
    "soft": "soft", "deep": "deep", "hard": "hard",
}


FEMALE_VOICE = {"female singing", "female opera", "female", "female voice", "girl", "female vocal", "woman",
                "woman singing", "female vocals", "female singer", "women", "soprano"}


MALE_VOICE = {"male vocal", "men", "male voice", "male singer", "man singing", "male opera", "man",
              "male vocals", "male", "monks"}


VOCAL_TAGS = FEMALE_VOICE | MALE_VOICE | {"singer", "duet", "chorus", "vocals", "vocal", "voice", "voices",
                                          "chanting", "chant", "talking", "choral", "opera", "operatic",
                                          "singing", "choir", "rap"}


NO_VOCAL_TAGS = {"no voice", "no voices", "no vocal", "no vocals", "no singing", "no singer", "instrumental"}


def template_words(view: dict) -> dict:
    tags = [t.lower() for t in view.get("tags") or []]
    words: dict = {
        "genres": [GENRE_WORDS[t] for t in tags if t in GENRE_WORDS],
        "instruments": [INSTRUMENT_WORDS[t] for t in tags if t in INSTRUMENT_WORDS and t != "choir"],
        "moods": [MOOD_WORDS[t] for t in tags if t in MOOD_WORDS],
        "tags": [t for t in tags if not t.startswith(("no ", "not ")) and t not in ("lol", "silence")][:8],
    }
    if any(t in NO_VOCAL_TAGS for t in tags):
        words["vocals"] = False
    elif any(t in VOCAL_TAGS for t in tags):
        female, male = any(t in FEMALE_VOICE for t in tags), any(t in MALE_VOICE for t in tags)
        words["vocals"] = True
        words["voice"] = "female" if female and not male else "male" if male and not female else None
    return words


ADAPTER = Adapter(
    name=DATASET,
    prepare=prepare,
    layout="annotations_final.csv, optional clip_info_final.csv, mp3/{mp3_path}",
    description="MagnaTagATune: 188 binary crowd-sourced tags per 29 s clip, plus title/artist/album "
    "when clip_info_final.csv is present; folders 0-b train, c valid, d-f test",
    labels=labels,
    prompt_view=prompt_view,
    template_words=template_words,
)
