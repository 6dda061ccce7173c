"""One rank of a multi-process training check, started by torch.distributed.run from the tests.

    python -m torch.distributed.run --nproc_per_node N tests/train_worker.py SCENARIO SETTINGS_JSON OUT_DIR

The real recipe (``TrainRecipe.setup`` and ``train``) runs on batches built here instead of the
shard loader, so that each rank's micro-batches are chosen exactly:

- ``text_only``: rank 0's micro-batches hold no audio at all (no placeholder, zero frames), the
  other ranks' hold audio. Writes the projector before and after training.
- ``token_mean``: micro-batches whose answers differ greatly in length. The gradient of the
  optimizer step (read before DeepSpeed applies it) is written beside the gradient of one plain
  PyTorch batch holding every example of every rank, under the per-token mean and under the mean of
  per-micro-batch means.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llark.data import ExampleEncoder, ShardSample, collate  # noqa: E402
from llark.model.chat import IGNORE_INDEX  # noqa: E402
from llark.train import TrainRecipe, load_config  # noqa: E402

SHORT = "Yes."
LONG = ("A slow ballad: piano chords over a bowed cello, no vocals, a soft brush kit, the key is C minor, "
        "the tempo is about 120 BPM and the mood is calm and warm. ") * 3


def example(encode: ExampleEncoder, key: str, answer: str, frames: int, seed: int) -> dict:
    audio = np.random.default_rng(seed).standard_normal((frames, encode.encoder_dim)).astype(np.float16)
    buf = io.BytesIO()
    np.save(buf, audio, allow_pickle=False)
    sample = ShardSample(key=key, pairs=[("What is the key of this song?", answer)], npy=buf.getvalue(), frames=frames)
    return encode(sample, 0)


def text_only(e: dict, audio_id: int) -> dict:
    """The example without its audio: no placeholder token, zero frames."""
    keep = [i != audio_id for i in e["input_ids"]]
    return {"key": e["key"] + "-text", "audio": e["audio"][:0],
            "input_ids": [i for i, k in zip(e["input_ids"], keep) if k],
            "labels": [x for x, k in zip(e["labels"], keep) if k]}


def batch(examples: list[dict], pad_id: int, index: int) -> dict:
    out = collate(examples, pad_id, 8)
    out.update(worker=0, position={"epoch": 0, "group": 0, "offset": index + 1}, skipped=0, too_long=0)
    return out


def micro_examples(encode: ExampleEncoder, rank: int, micro: int, per_batch: int) -> list[dict]:
    """Rank ``rank``'s micro-batch ``micro``: short answers in even micro-batches, long ones in odd."""
    answer = LONG[: 200 * (rank + 1)] if micro % 2 else SHORT
    return [example(encode, f"r{rank}m{micro}e{i}", answer, 3 + i + rank, seed=100 * rank + 10 * micro + i)
            for i in range(per_batch)]


def gathered(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone().float() for n, p in params.items()}


def main() -> None:
    scenario, settings, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    cfg = load_config(None, settings)
    recipe = TrainRecipe(cfg)
    recipe.setup()
    rank, world = recipe.rank, recipe.world_size
    model, pad_id = recipe.model, recipe.tokenizer.pad_token_id
    audio_id = model.audio_token_id
    encode = ExampleEncoder(recipe.formatter, model.projector.in_features, cfg.data.max_seq_len)
    steps, accum, mb = cfg.optim.max_steps, recipe.grad_accum, cfg.micro_batch
    params = dict(model.named_parameters())
    before = gathered(params)

    if scenario == "text_only":
        batches = []
        for m in range(steps * accum):
            examples = micro_examples(encode, 1, m, mb)
            batches.append(batch([text_only(e, audio_id) for e in examples] if rank == 0 else examples, pad_id, m))
        if rank == 0:
            assert all(int(b["audio_frames"].sum()) == 0 and not (b["input_ids"] == audio_id).any() for b in batches)
        recipe.loader = batches
        recipe.train()
        after = gathered(params)
        if rank == 0:
            torch.save({"before": {n: before[n] for n in ("projector.weight", "projector.bias")},
                        "after": {n: after[n] for n in ("projector.weight", "projector.bias")}},
                       out / "projector.pt")

    elif scenario == "token_mean":
        assert steps == 1
        every = {(r, m): micro_examples(encode, r, m, mb) for r in range(world) for m in range(accum)}
        recipe.loader = [batch(every[rank, m], pad_id, m) for m in range(accum)]
        engine, captured = recipe.engine, {}
        real_step = engine.step

        def step_capturing_gradients(*args, **kwargs):
            if engine.is_gradient_accumulation_boundary():
                from deepspeed.utils import safe_get_full_grad

                captured.update({n: safe_get_full_grad(p).detach().clone().float() for n, p in params.items()})
            return real_step(*args, **kwargs)

        engine.step = step_capturing_gradients
        recipe.train()
        if rank == 0:
            # The reference: a plain model with the same starting weights, one batch of everything.
            from llark.model import LlarkConfig, build_llark

            plain, _ = build_llark(LlarkConfig(lm_path=cfg.model.lm_path, encoder_dim=encode.encoder_dim),
                                   dtype="float32", attn_implementation=cfg.model.attn_implementation)
            plain.load_state_dict(before)
            plain.train()
            reference = {}
            big = collate([e for examples in every.values() for e in examples], pad_id, 8)
            _, loss = plain(big["input_ids"], big["attention_mask"], big["audio"], big["audio_frames"], big["labels"])
            loss.backward()
            reference["token_mean"] = {n: p.grad.clone() for n, p in plain.named_parameters()}
            reference["token_mean_loss"] = loss.item()
            plain.zero_grad()
            micro_means = []
            for examples in every.values():
                b = collate(examples, pad_id, 8)
                _, micro_mean = plain(b["input_ids"], b["attention_mask"], b["audio"], b["audio_frames"], b["labels"])
                micro_means.append(micro_mean)
            torch.stack(micro_means).mean().backward()
            reference["micro_batch_mean"] = {n: p.grad.clone() for n, p in plain.named_parameters()}
            supervised = [sum(sum(x != IGNORE_INDEX for x in e["labels"]) for e in ex) for ex in every.values()]
            torch.save({"captured": captured, "reference": reference, "supervised": supervised},
                       out / "gradients.pt")
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    recipe.cleanup()


if __name__ == "__main__":
    main()
