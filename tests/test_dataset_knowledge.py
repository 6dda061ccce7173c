"""Dataset knowledge lives in the ingest adapters: what a dataset's prompt shows and how its tags read
as words come from its adapter, and no module after ingest compares a dataset's name."""

import ast
import sys
import types
from pathlib import Path

from instructions_fixtures import clip
from pipeline import ingest
from pipeline.ingest import ADAPTER_MODULES, Adapter
from pipeline.instructions.facts import clip_facts
from pipeline.instructions.metadata import clip_metadata

REPO = Path(__file__).resolve().parents[1]
OWNERS = (REPO / "pipeline" / "ingest", REPO / "pipeline" / "demo_data")


def _toy_adapter(monkeypatch) -> None:
    module = types.ModuleType("toy_dataset_adapter")
    module.ADAPTER = Adapter(
        name="toy", prepare=lambda root: [], layout="-", description="a dataset written as one module",
        prompt_view=lambda a: {"styles": [s.upper() for s in a.get("styles", [])], "bpm_guess": a.get("bpm")},
        template_words=lambda view: {"genres": [s.lower() + " music" for s in view.get("styles", [])],
                                     "vocals": False},
        lists_every_instrument=True,
    )
    monkeypatch.setitem(sys.modules, "toy_dataset_adapter", module)
    monkeypatch.setitem(ingest.ADAPTER_MODULES, "toy", "toy_dataset_adapter")


def test_a_new_adapter_decides_its_prompt_view_and_template_words(monkeypatch):
    _toy_adapter(monkeypatch)
    record = {**clip("gtzan", 1), "dataset": "toy", "annotations": {"styles": ["Dub", "Ska"], "bpm": 140, "track_id": 9}}
    metadata = clip_metadata(record)
    assert metadata["styles"] == ["DUB", "SKA"] and metadata["bpm_guess"] == 140
    assert "track_id" not in metadata and "tempo_in_beats_per_minute_madmom" in metadata
    facts = clip_facts(metadata, "toy")
    assert facts.genres == ["dub music", "ska music"] and facts.vocals is False


def test_a_dataset_this_version_does_not_know_is_described_generically():
    record = {**clip("gtzan", 1), "dataset": "someone_elses", "labels": {"tempo_bpm": 96.0},
              "annotations": {"genre": "Blues", "file_id": 3, "mood": ["sad"]}}
    metadata = clip_metadata(record)
    assert metadata["genre"] == "Blues" and metadata["tempo_bpm"] == 96.0 and "file_id" not in metadata
    facts = clip_facts(metadata, "someone_elses")
    assert facts.genres == ["blues"] and facts.moods == ["sad"] and facts.tempo_bpm == 96.0
    assert not facts.instruments_complete


def test_instrument_lists_are_complete_only_where_the_adapter_says_so():
    for dataset, complete in (("musicnet", True), ("demo", True), ("medleydb", False)):
        metadata = clip_metadata(clip(dataset, 1))
        metadata.setdefault("instruments", ["piano"])
        assert clip_facts(metadata, dataset).instruments_complete is complete, dataset


def _name_comparisons(path: Path) -> list[str]:
    names = set(ADAPTER_MODULES)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            literals = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            for lit in literals:
                if isinstance(lit, ast.Constant) and lit.value in names:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} compares with {lit.value!r}")
    return found


def test_no_module_after_ingest_compares_a_datasets_name():
    files = [p for top in ("pipeline", "llark") for p in (REPO / top).rglob("*.py")
             if not any(owner in p.parents for owner in OWNERS)]
    assert len(files) > 40
    found = [hit for p in files for hit in _name_comparisons(p)]
    assert not found, "\n".join(found)
