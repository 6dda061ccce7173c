"""Validation during training: every ``validation.every`` steps, the loss on a held-out split's shards
with the training masking (the answers' tokens only), as a per-token mean over up to
``validation.max_examples`` examples; and, with ``validation.tasks``, the evaluation tasks' questions
about up to ``validation.max_clips`` held-out clips (``validation.clips`` and
``validation.embeddings``, as ``llark evaluate`` reads them) answered greedily and scored with the
evaluation's metrics (e.g. ``tempo/demo/acc2``).

The examples are the same at every evaluation (the shards in index order, a sample's pairs one
example each as training makes them with ``data.conversation: pair``, or the whole conversation
with ``multi_turn``); with several ranks, rank ``r`` takes examples ``r, r + W, ...``, and every rank
runs as many forward passes (a rank short of a batch runs its last one again with no weight), as
ZeRO-3's collectives require. Bad samples are left out as in training.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Iterator

import torch

from llark.multi_encoder import to_device
from llark.train.config import TrainConfigError

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
            inputs = {k: to_device(batch[k], engine.device, False) for k in ("input_ids", "attention_mask", "audio", "audio_frames",
                                                             "labels")}
            _, loss_sum = engine(**inputs, loss_denominator=1)
            total += weight * loss_sum.double().cpu()
            tokens += int(weight) * batch["supervised"]
        return float(total), tokens


# ---------------------------------------------------------------------------------------------
# Answers scored with the evaluation tasks (validation.tasks)


def answer_rows(llark, items: list, rank: int, world_size: int, batch_size: int, batches: int) -> list[dict[str, Any]]:
    """This rank's share of ``items`` (``llark.evaluate.run.EvalItem``) answered greedily, as the rows the
    evaluation scores. Every rank generates ``batches`` times (a rank short of a batch answers a
    repeated one and keeps nothing of it), as ZeRO-3's synchronised generation requires."""
    from llark.evaluate.run import max_new_tokens_defaults
    from llark.evaluate.tasks import DEFAULT_MAX_NEW_TOKENS
    from llark.inference import GenerationSettings, read_frames

    limits = max_new_tokens_defaults()
    mine = items[rank::world_size]
    rows = []
    for b in range(batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        kept = bool(chunk)
        chunk = chunk or items[:batch_size]
        settings = GenerationSettings(max_new_tokens=max(limits.get(i.task, DEFAULT_MAX_NEW_TOKENS) for i in chunk))
        frames = [read_frames(i.embedding_path, llark.encoder_dim, llark.audio_states) for i in chunk]
        answers = llark.answer([i.question for i in chunk], frames, settings)
        if kept:
            rows += [{**i.row(), "answer": a, "audio": "real", "audio_from": i.clip_id} for i, a in zip(chunk, answers)]
    return rows


def answer_metrics(rows: list[dict[str, Any]], items: list) -> dict[str, float]:
    """``{"<task>/<dataset>/<metric>": value}`` of the rows, scored as ``llark evaluate`` scores them."""
    from llark.evaluate.run import label_vocabularies, score_rows

    _, metrics, _ = score_rows(rows, vocabularies=label_vocabularies(items))
    flat = {}
    for key, result in metrics.items():
        for name, value in result.items():
            value = getattr(value, "value", value)
            if isinstance(value, dict):
                value = value.get("value")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in (
                    "n", "unparseable", "distinct_parsed"):
                flat[f"{key}/{name}"] = float(value)
    return flat


# ---------------------------------------------------------------------------------------------
# The recipe's validation step


def validate(recipe) -> float:
    """The per-token loss on the validation examples (and, with validation.tasks, the task scores), logged
    beside the training metrics; with validation.export_best, a new best by validation.best exports the
    model to output_dir/best."""
    import torch.distributed as dist

    recipe.engine.eval()
    mine = len(recipe.validator.examples())
    v = recipe.cfg.validation
    counts = torch.tensor([-mine, -(-mine // recipe.cfg.micro_batch)], dtype=torch.int64, device=recipe.engine.device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)  # [-fewest examples on a rank, most batches on a rank]
    if -counts[0].item() == 0:
        raise TrainConfigError(f"validation: a rank has no example ({v.split} split, validation.max_examples "
                               f"{v.max_examples} over {recipe.world_size} ranks); validate on more examples")
    loss_sum, tokens = recipe.validator.loss(recipe.engine, int(counts[1].item()))
    totals = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=recipe.engine.device)
    dist.all_reduce(totals)
    loss, tokens = totals[0].item() / max(1.0, totals[1].item()), int(totals[1].item())
    metrics = {"step": recipe.step, "val_loss": loss, "val_tokens": tokens}
    if recipe.cfg.stage is not None:
        metrics["stage"] = recipe.cfg.stage
    scores = answer_scores(recipe) if v.tasks else {}
    metrics.update(scores)
    # What export_best ranks by, as "lower is better"; decided on rank 0, where the scores are.
    rank_by = loss if v.best == "val_loss" else -scores.get(v.best, -math.inf) if recipe.is_main else 0.0
    flag = torch.tensor([float(rank_by < recipe.best_validation), rank_by], dtype=torch.float64,
                        device=recipe.engine.device)
    dist.broadcast(flag, 0)
    best = bool(flag[0].item())
    if best:
        recipe.best_validation = flag[1].item()
    if recipe.is_main:
        recipe.metrics.write(metrics, {"valid/loss": loss} | {f"valid/{k}": s for k, s in scores.items()})
        shown = "".join(f"; {k} {s:.3f}" for k, s in sorted(scores.items()))
        recipe._print(f"validation: step {recipe.step} loss {loss:.4f} over {tokens:,} answer tokens{shown}"
                      + (f" (best {v.best} so far)" if best else ""))
    if best and v.export_best:
        recipe.export(recipe.output_dir / "best")
    return loss


def answer_scores(recipe) -> dict[str, float]:
    """The evaluation tasks' questions about the held-out clips, each rank answering its share;
    ``{"<task>/<dataset>/<metric>": value}`` on rank 0 (empty elsewhere)."""
    import torch.distributed as dist

    from llark.inference import Llark

    items, batch = recipe.validation_items, recipe.cfg.micro_batch
    if recipe.validation_llark is None:  # made once: its formatter reads the template
        recipe.validation_llark = Llark(recipe.engine.module, recipe.tokenizer, recipe.model.config,
                                        device=str(recipe.engine.device))
    llark = recipe.validation_llark
    batches = torch.tensor([-(-len(items[recipe.rank::recipe.world_size]) // batch)], device=recipe.engine.device)
    dist.all_reduce(batches, op=dist.ReduceOp.MAX)
    rows = answer_rows(llark, items, recipe.rank, recipe.world_size, batch, int(batches.item()))
    gathered: list = [None] * recipe.world_size
    dist.all_gather_object(gathered, rows)
    return answer_metrics([r for part in gathered for r in part], items) if recipe.is_main else {}
