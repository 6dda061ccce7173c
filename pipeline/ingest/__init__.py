"""Dataset ingestion: one module per dataset, each reading the dataset's documented on-disk layout.

Every module defines ``ADAPTER = Adapter(...)`` whose ``prepare(root, **options)`` returns the
dataset's clip records (``pipeline.records.ClipRecord``) with the dataset's annotations kept as
given under ``annotations``. Modules are imported on demand, so a dataset's extra dependencies
(none so far) only matter when that dataset is used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import PipelineError
from pipeline.labels import Labels
from pipeline.records import ClipRecord

ADAPTER_MODULES = {
    "demo": "pipeline.ingest.demo",
    "fma": "pipeline.ingest.fma",
    "mtg_jamendo": "pipeline.ingest.mtg_jamendo",
    "magnatagatune": "pipeline.ingest.magnatagatune",
    "musicnet": "pipeline.ingest.musicnet",
    "musiccaps": "pipeline.ingest.musiccaps",
    "yt8m_musictextclips": "pipeline.ingest.yt8m_musictextclips",
    "giantsteps_key": "pipeline.ingest.giantsteps",
    "giantsteps_tempo": "pipeline.ingest.giantsteps",
    "gtzan": "pipeline.ingest.gtzan",
    "medleydb": "pipeline.ingest.medleydb",
    "folder": "pipeline.ingest.folder",  # a researcher's own folder of audio
}


class DatasetLayoutError(PipelineError, ValueError):
    """The directory given for a dataset does not hold the files its layout requires."""


@dataclass(frozen=True)
class Adapter:
    """How to read one dataset.

    ``prepare(root, **options) -> list[ClipRecord] | Prepared`` reads the dataset under ``root``; it
    raises ``DatasetLayoutError`` naming the missing file when the layout is not there, and returns a
    ``Prepared`` when it also has error records for parts of the dataset it could not use. ``layout`` is a
    short description of the expected files, shown by ``llark ingest --help``.
    ``window_annotations(record, start_s, end_s) -> dict``, when given, returns the annotations of
    the window ``[start_s, end_s)`` of the source (times relative to the window); the crop stage
    stores them in the cropped record's ``annotations``.
    ``labels(record) -> Labels``, when given, derives the normalised labels from the record's
    annotations (a pure function: ingest stores its result, the crop stage calls it again on each
    clip, whose ``in_clip`` annotations narrow what is heard, and it serves records written before
    labels existed). An adapter without it sets ``labels`` on its records itself.
    ``prompt_view(annotations) -> dict``, when given, chooses and names the annotations the Q/A
    writer's prompt shows, under the keys ``prompts/fields/<name>.txt`` describes (values made with
    ``pipeline.prompt_values``); without it the prompt shows the annotations less ids, paths and names,
    and the labels.
    ``template_words(view) -> dict``, when given, turns that view's labels into the words the
    template writer uses: any of the ``pipeline.instructions.facts.Facts`` fields ``genres``,
    ``instruments``, ``moods``, ``themes``, ``tags``, ``vocals`` (True/False) and ``voice``
    (``"female"``/``"male"``). Without it, the view's ``genre(s)``, ``instruments``, ``moods``,
    ``tags``, ``ensemble`` and ``notes`` are read as they are.
    ``lists_every_instrument``: the dataset's instrument lists name every instrument heard (note-level
    data), so templates may say an instrument is absent.
    """

    name: str
    prepare: Callable[..., "list[ClipRecord] | Prepared"]
    layout: str
    description: str
    window_annotations: Callable[[ClipRecord, float, float], dict[str, Any]] | None = None
    labels: Callable[[ClipRecord], Labels] | None = None
    prompt_view: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    template_words: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    lists_every_instrument: bool = False


@dataclass
class Prepared:
    """An adapter's records and its error records (``{"id", "code", "reason", ...}``): rows of its
    metadata it could not use, written to the ingest errors file while the run goes on."""

    records: list[ClipRecord]
    errors: list[dict[str, Any]] = field(default_factory=list)


def get_adapter(name: str) -> Adapter:
    if name not in ADAPTER_MODULES:
        known = ", ".join(sorted(ADAPTER_MODULES))
        raise KeyError(f"unknown dataset {name!r}; known datasets: {known}")
    module = importlib.import_module(ADAPTER_MODULES[name])
    adapters = getattr(module, "ADAPTERS", None) or {module.ADAPTER.name: module.ADAPTER}
    return adapters[name]


def find_adapter(name: str) -> Adapter | None:
    """The adapter registered as ``name``, or None for a dataset this version does not know (records
    written by another version are still described, generically)."""
    return get_adapter(name) if name in ADAPTER_MODULES else None


def labels_of(record: ClipRecord | dict) -> Labels:
    """The clip's labels: those its record carries, else what its dataset's adapter derives from the
    annotations (records written before labels existed), else none."""
    if isinstance(record, dict):
        record = ClipRecord.model_validate(record)
    if record.labels is not None:
        return Labels.model_validate(record.labels)
    adapter = find_adapter(record.dataset)
    if adapter is None or adapter.labels is None:
        return Labels.lenient()
    return adapter.labels(record)


def with_labels(record: ClipRecord) -> ClipRecord:
    """``record`` with the labels its adapter derives from its annotations (unchanged without one)."""
    adapter = find_adapter(record.dataset)
    if adapter is None or adapter.labels is None:
        return record
    return record.model_copy(update={"labels": adapter.labels(record).to_dict() or None})


def require(path: Path, what: str) -> Path:
    """Return ``path`` if it exists, else raise DatasetLayoutError saying what was expected there."""
    if not path.exists():
        raise DatasetLayoutError(f"{what} not found: expected {path}")
    return path
