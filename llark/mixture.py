"""Mixtures: batches drawn from several shard streams (task families, datasets, or both) by fixed
weights, whatever the streams' sizes (``data.mixture``, ``data.dataset_weights``)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

import numpy as np
import torch

from llark.data import DataConfigError, ShardSet, ShardStream, StreamSettings, collate_batch


def mixture_cells(shards: ShardSet, families: dict[str, float] | None,
                  datasets: dict[str, float] | None) -> dict[str, tuple[list[str], float]]:
    """The streams a mixture draws from: ``{name: (shard urls, weight)}``, one per task family
    (``families``), per dataset (``datasets``) or per dataset and family (both; weight the product).
    Datasets the shards hold but ``datasets`` does not name are left out; one it names that the shards
    do not hold is refused, as are shards written before they were cut per dataset."""
    if datasets and any("dataset" not in e for e in shards.entries):
        raise DataConfigError("data.dataset_weights: these shards mix datasets (written before the shards stage "
                              "cut one set per dataset); rerun `llark shards --overwrite`")
    held = {e["dataset"] for e in shards.entries if "dataset" in e}
    if datasets and (absent := sorted(set(datasets) - held)):
        raise DataConfigError(f"data.dataset_weights: no shards of {absent}; the shards hold {sorted(held)}")
    cells: dict[str, tuple[list[str], float]] = {}
    for e in shards.entries:
        parts, weight = [], 1.0
        if datasets:
            if e["dataset"] not in datasets:
                continue
            parts.append(e["dataset"])
            weight *= datasets[e["dataset"]]
        if families:
            parts.append(e["task_family"])
            weight *= families[e["task_family"]]
        urls, _ = cells.setdefault("/".join(parts), ([], weight))
        urls.append(e["url"])
    return cells


class MixtureStream(ShardStream):
    """Batches drawn from several streams (one per task family) with fixed weights, whatever their sizes.

    Each example comes from stream ``i`` with probability ``weights[i] / sum(weights)``: the ``n``-th
    draw of global worker ``g`` is a pure function of ``(seed, g, n)``, so a worker's sequence is the
    same on every run, and a batch's position (the draw count and each stream's position) resumes it
    exactly. Every stream is endless (each pass over its shards reshuffled), so a small family is
    repeated as often as its weight asks. Batches carry ``mixture``: how many of their examples came
    from each stream.
    """

    def __init__(self, streams: dict[str, ShardStream], weights: dict[str, float], settings: StreamSettings):
        torch.utils.data.IterableDataset.__init__(self)
        if set(streams) != set(weights) or not streams:
            raise DataConfigError(f"data.mixture: weights for {sorted(weights)}, streams for {sorted(streams)}")
        bad = {k: w for k, w in weights.items() if not w > 0}
        if bad:
            raise DataConfigError(f"data.mixture: weights must be > 0, got {bad}")
        self.streams, self.s = streams, settings
        self.names = sorted(streams)
        total = sum(weights[k] for k in self.names)
        self.cumulative = np.cumsum([weights[k] / total for k in self.names])
        self.encode = next(iter(streams.values())).encode

    def worker_stream(self, worker: int) -> Iterator[dict[str, Any]]:
        s = self.s
        g = s.rank * max(1, s.num_workers) + worker
        start = s.start.get(worker) or {}
        draws = int(start.get("draws", 0))
        positions = {k: dict(p) for k, p in (start.get("streams") or {}).items()}
        examples = {k: stream.worker_examples(worker, positions.get(k)) for k, stream in self.streams.items()}
        batch, left_out, counts = [], Counter(), Counter()
        while True:
            u = np.random.default_rng([s.seed, 0x6D6978, g, draws]).random()
            name = self.names[min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.names) - 1)]
            draws += 1
            for kind, example, pos in examples[name]:
                positions[name] = pos.to_dict()
                if kind == "example":
                    break
                left_out[kind] += 1
            else:
                return  # a finite stream (data epochs) ran out
            batch.append(example)
            counts[name] += 1
            if len(batch) == s.micro_batch:
                position = {"draws": draws, "streams": {k: dict(p) for k, p in positions.items()}}
                yield collate_batch(batch, s, worker, position, left_out, mixture=dict(counts))
                batch, left_out, counts = [], Counter(), Counter()
