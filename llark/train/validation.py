"""Validation during training: every ``validation.every`` steps, the loss on a held-out split's shards
with the training masking (the answers' tokens only), as a per-token mean over up to
``validation.max_examples`` examples.

The examples are the same at every evaluation (the shards in index order, a sample's pairs one
example each as training makes them with ``data.conversation: pair``, or the whole conversation
with ``multi_turn``); with several ranks, rank ``r`` takes examples ``r, r + W, ...``, and every rank
runs as many forward passes (a rank short of a batch runs its last one again with no weight), as
ZeRO-3's collectives require. Bad samples are left out as in training.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:
    from llark.data import ExampleEncoder

log = logging.getLogger("llark")


class Validator:
    def __init__(self, urls: list[str], encode: "ExampleEncoder", pad_id: int, micro_batch: int, max_examples: int,
                 conversation: str, rank: int, world_size: int):
        self.urls, self.encode, self.pad_id = urls, encode, pad_id
        self.micro_batch, self.max_examples, self.conversation = micro_batch, max_examples, conversation
        self.rank, self.world_size = rank, world_size
        self._examples: list[dict[str, Any]] | None = None

    def _all_examples(self) -> Iterator[dict[str, Any]]:
        from llark.data import BadSample, iter_shard, read_sample

        for url in self.urls:
            for raw in iter_shard(url):
                try:
                    sample = read_sample(raw)
                    pairs = [None] if self.conversation == "multi_turn" else range(len(sample.pairs))
                    for pair in pairs:
                        yield self.encode(sample, pair)
                except BadSample as exc:
                    log.debug("validation: leaving out %s", exc)

    def examples(self) -> list[dict[str, Any]]:
        """This rank's examples (read once, kept: a few hundred short token lists and frames)."""
        if self._examples is None:
            mine = []
            for i, example in enumerate(self._all_examples()):
                if i >= self.max_examples:
                    break
                if i % self.world_size == self.rank:
                    mine.append(example)
            self._examples = mine
        return self._examples

    @torch.no_grad()
    def loss(self, engine, batches_per_rank: int) -> tuple[float, int]:
        """This rank's summed token loss and supervised-token count over ``batches_per_rank`` forward passes."""
        from llark.data import collate

        mine = self.examples()
        total, tokens = torch.zeros((), dtype=torch.float64), 0
        for b in range(batches_per_rank):
            chunk = mine[b * self.micro_batch:(b + 1) * self.micro_batch]
            weight = 1.0 if chunk else 0.0
            chunk = chunk or mine[-self.micro_batch:] or None
            if chunk is None:
                raise RuntimeError("validation: a rank without any example")  # ruled out at start
            batch = collate(chunk, self.pad_id)
            inputs = {k: batch[k].to(engine.device) for k in ("input_ids", "attention_mask", "audio", "audio_frames",
                                                             "labels")}
            _, loss_sum = engine(**inputs, loss_denominator=1)
            total += weight * loss_sum.double().cpu()
            tokens += int(weight) * batch["supervised"]
        return float(total), tokens
