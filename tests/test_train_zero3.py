"""ZeRO-3 on CPU with two processes (gloo) and a tiny Llama whose every parameter is partitioned:
a rank whose micro-batch has no audio does not hang the step; `llark train` exports full-size
weights, saves the gathered projector in every checkpoint, and resumes from a ZeRO-3 checkpoint."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fixtures_train import write_shards  # noqa: E402
from test_train import DIM, losses, run_train, run_worker, zero3_json  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_shards(d, n_samples=32, n_shards=4, dim=DIM, frames=(3, 6), pairs=(1, 2))
    return d


@pytest.mark.slow
def test_text_only_micro_batch_on_one_rank_does_not_hang(tmp_path, shards):
    import torch

    out = tmp_path / "run"
    # A hang (the text-only rank skipping the projector's all-gather) ends in the timeout, as a failure.
    run_worker("text_only", out, shards, nproc=2, timeout=240, deepspeed=str(zero3_json(tmp_path)),
               micro_batch=2, grad_accum=2, global_batch=8, **{"optim.max_steps": 2, "optim.lr": 1e-3})
    curve = losses(out)
    assert sorted(curve) == [1, 2] and all(math.isfinite(v) and v > 0 for v in curve.values()), curve
    saved = torch.load(out / "projector.pt")
    for name in ("projector.weight", "projector.bias"):
        before, after = saved["before"][name], saved["after"][name]
        assert before.shape == after.shape and before.numel() > 0
        assert torch.isfinite(after).all() and not torch.equal(before, after)  # the audio rank's gradient arrived


@pytest.mark.slow
def test_zero3_exports_full_weights_saves_the_projector_and_resumes(tmp_path, shards):
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoConfig

    out = tmp_path / "run"
    settings = {"deepspeed": str(zero3_json(tmp_path)), "optim.max_steps": STEPS, "save_every": 2,
                "data.num_workers": 1}
    result = run_train(out, shards, nproc=2, timeout=400, **settings)
    assert "2 processes, global batch 4 = micro-batch 2 x grad-accum 1 x world size 2; ZeRO-3" in result.stdout
    straight = losses(out)
    assert sorted(straight) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in straight.values())

    # Every checkpoint holds the whole projector, equal to the one ZeRO's own partitions consolidate to.
    final, checkpoints = out / "final", out / "checkpoints"
    config = AutoConfig.from_pretrained(final)
    for tag in ("step_00000002", "step_00000004"):
        consolidated = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
        projector = load_file(str(checkpoints / tag / "projector.safetensors"))
        assert projector["weight"].shape == (config.hidden_size, DIM)
        assert projector["bias"].shape == (config.hidden_size,)
        for name in ("weight", "bias"):
            torch.testing.assert_close(projector[name], consolidated[f"projector.{name}"], rtol=0, atol=0)

    # The export: full-size LM tensors (not ZeRO-3's empty placeholders) equal to the trained weights.
    exported = load_file(str(final / "model.safetensors"))
    assert exported["model.embed_tokens.weight"].shape == (config.vocab_size, config.hidden_size) == (
        consolidated["lm.model.embed_tokens.weight"].shape)
    assert exported["model.layers.1.mlp.down_proj.weight"].shape == (config.hidden_size, config.intermediate_size)
    lm = {k[len("lm."):]: v for k, v in consolidated.items() if k.startswith("lm.")}
    assert set(exported) == set(lm)
    for name, tensor in exported.items():
        assert tensor.numel() > 0
        torch.testing.assert_close(tensor, lm[name], rtol=0, atol=0, msg=name)
    params = sum(t.numel() for t in exported.values())
    assert params > 150_000 and (final / "model.safetensors").stat().st_size >= 4 * params
    from llark.model import load_pretrained

    model, _, _ = load_pretrained(final, dtype="float32")
    torch.testing.assert_close(model.projector.weight, consolidated["projector.weight"], rtol=0, atol=0)

    # Resume from the ZeRO-3 checkpoint of step 2: the same steps 3 and 4 as the uninterrupted run.
    shutil.rmtree(checkpoints / "step_00000004")
    shutil.rmtree(final)
    result = run_train(out, shards, nproc=2, timeout=400, **settings)
    assert "resuming at step 2" in result.stdout
    assert losses(out) == straight
    assert json.loads((checkpoints / "step_00000004" / "trainer_state.json").read_text())["step"] == STEPS
    assert load_file(str(final / "model.safetensors")).keys() == exported.keys()
