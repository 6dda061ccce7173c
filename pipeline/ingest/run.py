"""The ingest stage: a dataset's metadata on disk → a JSONL of clip records.

Ingestion is the source of the pipeline, so it does not run on the per-item runner: it reads a
dataset's own metadata files once. It checks every record (a valid, unique id; the audio file
exists) and writes records whose audio is missing to the errors file instead of the output. An
adapter may also hand back error records of its own (rows of its metadata it could not use) by
returning a ``Prepared``; they go to the same errors file.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.ingest import DatasetLayoutError, Prepared, get_adapter, with_labels
from pipeline.records import write_jsonl
from pipeline.runner import OutputLock, StageConfigError, errors_path

log = logging.getLogger("llark")


@dataclass
class IngestSummary:
    dataset: str
    output: Path
    errors: Path
    records: int = 0
    missing_audio: int = 0
    adapter_errors: int = 0
    by_split: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def ingest_dataset(name: str, root: str | os.PathLike, output: str | os.PathLike, options: dict[str, Any] | None = None) -> IngestSummary:
    """Read dataset ``name`` under ``root`` and write its clip records to ``output``."""
    started = time.monotonic()
    try:
        adapter = get_adapter(name)
    except KeyError as exc:
        raise StageConfigError(str(exc.args[0])) from None
    root, output = Path(root), Path(output)
    if not root.is_dir():
        raise StageConfigError(f"--root: {root} is not a directory")
    options = dict(options or {})
    accepted = inspect.signature(adapter.prepare).parameters
    unknown = [k for k in options if k not in accepted]
    if unknown:
        allowed = [p for p in accepted if p != "root"]
        raise StageConfigError(f"--set: {name} has no option {unknown[0]!r} (its options: {', '.join(allowed) or 'none'})")
    if "split_file" in accepted and "split_file" not in options:
        options["split_file"] = output.with_name(f"{name}_test_ids.txt")

    output.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(output, "ingest"):
        log.info("ingest: reading %s from %s", name, root)
        try:
            records = adapter.prepare(root, **options)
        except DatasetLayoutError as exc:
            raise StageConfigError(f"{name}: {exc}") from None
        adapter_errors: list[dict[str, Any]] = []
        if isinstance(records, Prepared):
            records, adapter_errors = records.records, [{"stage": "ingest", **e} for e in records.errors]
        summary = IngestSummary(dataset=name, output=output, errors=errors_path(output))
        seen: set[str] = set()
        good, errors = [], []
        for record in records:
            if record.id in seen:
                raise StageConfigError(f"{name}: the adapter produced the id {record.id} twice")
            seen.add(record.id)
            if not os.path.exists(record.audio_path):
                errors.append({"id": record.id, "stage": "ingest", "code": "missing_audio",
                               "reason": f"audio file not found: {record.audio_path}"})
                continue
            good.append(with_labels(record))
            summary.by_split[record.split] = summary.by_split.get(record.split, 0) + 1
        summary.records = write_jsonl(output, good)
        summary.missing_audio = len(errors)
        summary.adapter_errors = len(adapter_errors)
        write_jsonl(summary.errors, errors + adapter_errors)
    summary.seconds = time.monotonic() - started
    splits = ", ".join(f"{k}: {v}" for k, v in sorted(summary.by_split.items()))
    log.info("ingest: %d %s records (%s) in %s", summary.records, name, splits or "none", output)
    if errors:
        log.warning("ingest: %d records have no audio file; listed in %s", len(errors), summary.errors)
    if adapter_errors:
        log.warning("ingest: %d parts of %s could not be used; listed in %s", len(adapter_errors), name, summary.errors)
    return summary
