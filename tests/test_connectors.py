"""The connectors (linear, mlp, qformer): token counts known before the forward pass, output shapes for
clips of several lengths, padding that never leaks into a clip's tokens, gradients to every part,
a learnable toy task, the settings' checks, and a model with each connector trained, exported and
asked."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# DeepSpeed prints its accelerator choice to stdout the first time it is asked; asking here keeps that
# line out of the `llark ask --json` output a test parses.
from deepspeed.accelerator import get_accelerator  # noqa: E402

get_accelerator()

from llark.model.connectors import (  # noqa: E402
    CONNECTORS,
    ConnectorConfigError,
    audio_tokens,
    build_connector,
    check_connector,
)

SETTINGS = {"linear": {"name": "linear"}, "mlp": {"name": "mlp", "hidden": 24},
            "qformer": {"name": "qformer", "window": 3, "queries": 2, "layers": 1, "heads": 2, "width": 16}}
DIM, HIDDEN = 8, 12


def connector(name, seed=0):
    torch.manual_seed(seed)
    return build_connector(SETTINGS[name], DIM, HIDDEN, dtype=torch.float32)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_token_counts_and_shapes_for_clips_of_several_lengths(name):
    model = connector(name).eval()
    lengths = [1, 3, 4, 10]
    audio = torch.randn(len(lengths), max(lengths), DIM)
    frames = torch.tensor(lengths)
    tokens = model(audio, frames)
    counts = model.token_counts(frames)
    expected = [audio_tokens(SETTINGS[name], n) for n in lengths]
    assert counts.tolist() == expected == [model.tokens_for(n) for n in lengths]
    if name == "qformer":
        assert expected == [2, 2, 4, 8]  # ceil(n / 3) windows x 2 queries
    assert tokens.shape == (len(lengths), max(expected), HIDDEN)
    # A clip's tokens do not depend on the padding after it, nor on the other clips of the batch.
    for row, n in enumerate(lengths):
        alone = model(audio[row : row + 1, :n], frames[row : row + 1])
        torch.testing.assert_close(tokens[row, : expected[row]], alone[0], rtol=1e-5, atol=1e-5)
        noisy = audio[row : row + 1].clone()
        noisy[:, n:] = 1e3
        torch.testing.assert_close(model(noisy, frames[row : row + 1])[0, : expected[row]], alone[0],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_gradients_reach_every_part_and_a_toy_task_is_learned(name):
    model = connector(name)
    generator = torch.Generator().manual_seed(1)
    audio = torch.randn(16, 6, DIM, generator=generator)
    frames = torch.full((16,), 6)
    target_map = torch.randn(DIM, HIDDEN, generator=generator)
    # Each token should say the mean of its frames under a fixed map (for the qformer: of its window).
    window = SETTINGS[name].get("window", 1)
    queries = SETTINGS[name].get("queries", 1)
    target = (audio.reshape(16, 6 // window, window, DIM).mean(2) @ target_map).repeat_interleave(queries, dim=1)
    from fixtures_train import fit_connector

    losses = fit_connector(model, audio, frames, target, steps=300)
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_standardised_initialisation_puts_tokens_at_the_embeddings_spread(name):
    model = connector(name).eval()
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.1, 50.0, DIM)
    frames = rng.normal(5.0, 1.0, (64, 10, DIM)) * scale
    model.initialise(frames.reshape(-1, DIM).mean(0), frames.reshape(-1, DIM).std(0), token_std=0.05)
    with torch.no_grad():
        tokens = model(torch.tensor(frames, dtype=torch.float32), torch.full((64,), 10))
    assert 0.02 < float(tokens.std()) < 0.12, float(tokens.std())
    assert abs(float(tokens.mean())) < 0.05


def test_settings_are_checked_naming_the_field():
    assert check_connector(None) == {"name": "linear"}
    assert check_connector({"name": "qformer"}) == {"name": "qformer", **CONNECTORS["qformer"].DEFAULTS}
    for bad, field in (({"name": "conv"}, "model.connector.name"), ({"name": "mlp", "window": 3}, "model.connector.window"),
                       ({"name": "qformer", "queries": 0}, "model.connector.queries"),
                       ({"name": "qformer", "width": 10, "heads": 4}, "model.connector.width")):
        with pytest.raises(ConnectorConfigError, match=field):
            check_connector(bad)


@pytest.mark.parametrize("name", ["mlp", "qformer"])
def test_a_model_with_each_connector_trains_exports_and_answers(name, tmp_path, capsys):
    from fixtures_train import tiny_lm_dir, train_steps, write_shards
    from test_backbones import _npy
    from test_ask import run_ask

    from llark.data import ExampleEncoder, ShardSample, collate
    from llark.model import ChatFormatter, LlarkConfig, build_llark, export_pretrained, load_pretrained
    from llark.model.llark import projector_state

    torch.manual_seed(0)
    config = LlarkConfig(lm_path=str(tiny_lm_dir()), encoder_dim=16, connector=SETTINGS[name],
                         encoder={"name": "fixture", "layer": None, "frame_rate_hz": 10.0, "dim": 16,
                                  "dtype": "float16", "config": {"fixture": True}})
    model, tokenizer = build_llark(config, dtype="float32", attn_implementation="eager")
    encode = ExampleEncoder(ChatFormatter(tokenizer), 16, 512, None, audio_tokens=config.audio_tokens)
    samples = write_shards(tmp_path / "shards", n_samples=4, n_shards=1, dim=16)
    examples = [encode(ShardSample(key=k, pairs=[(p["question"], p["answer"]) for p in s["pairs"]],
                                   npy=_npy(s["audio"]), frames=len(s["audio"])), 0) for k, s in samples.items()]
    placeholders = [int(np.sum(np.asarray(e["input_ids"]) == model.audio_token_id)) for e in examples]
    assert placeholders == [config.audio_tokens(len(s["audio"])) for s in samples.values()]
    batch = collate(examples, tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "audio", "audio_frames", "labels")}
    losses = train_steps(model, inputs, model.parameters())
    assert losses[-1] < losses[0], losses
    out = export_pretrained(tmp_path / "final", model.lm, tokenizer, model.config, projector_state(model))
    assert json.loads((out / "llark_config.json").read_text())["connector"]["name"] == name
    reloaded, _, _ = load_pretrained(out, dtype="float32", attn_implementation="eager")
    for (key, a), b in zip(model.projector.state_dict().items(), reloaded.projector.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)
    frames = tmp_path / "clip.npy"
    np.save(frames, next(iter(samples.values()))["audio"], allow_pickle=False)
    capsys.readouterr()
    code, stdout, _ = run_ask([str(out), "What is the key of this song?", "--frames", str(frames), "--json",
                               "--max-new-tokens", "3"], capsys)
    assert code == 0 and isinstance(json.loads(stdout)["answer"], str), stdout



def test_training_config_names_the_connector_field():
    from llark.train import TrainConfigError, load_config

    cfg = load_config(None, {"model.connector.name": "qformer", "model.connector.queries": 2})
    assert cfg.model.connector.settings() == {"name": "qformer", **CONNECTORS["qformer"].DEFAULTS, "queries": 2}
    for overrides, field in (({"model.connector.name": "mlp", "model.connector.window": 4}, "model.connector.window"),
                             ({"model.connector.name": "qformer", "model.connector.width": 10},
                              "model.connector.width")):
        with pytest.raises(TrainConfigError, match=field):
            load_config(None, overrides)


@pytest.mark.slow
def test_llark_train_with_a_qformer_resumes_exactly_and_refuses_another_connector_on_top(tmp_path, capsys):
    import sys

    from fixtures_train import write_shards
    from test_ask import run_ask
    from test_train import kill_when_logged, losses, run_train, train_args

    shards = tmp_path / "shards"
    write_shards(shards, n_samples=16, n_shards=2, dim=16, frames=(3, 8), pairs=(1, 2))
    settings = {"model.connector.name": "qformer", "model.connector.queries": 2, "model.connector.layers": 1,
                "model.connector.heads": 2, "optim.max_steps": 6, "export": False}
    straight = tmp_path / "straight"
    run_train(straight, shards, **settings)
    killed = tmp_path / "killed"
    kill_when_logged([sys.executable, "-m", "llark.train"] + train_args(killed, shards, **settings),
                     killed / "metrics.jsonl", 4)
    result = run_train(killed, shards, **{**settings, "export": True})
    assert "resuming at step" in result.stdout
    assert losses(killed) == losses(straight)
    final = killed / "final"
    assert json.loads((final / "llark_config.json").read_text())["connector"]["queries"] == 2
    frames = tmp_path / "clip.npy"
    np.save(frames, np.random.default_rng(0).standard_normal((7, 16)).astype(np.float16), allow_pickle=False)
    capsys.readouterr()
    code, stdout, _ = run_ask([str(final), "What is the key?", "--frames", str(frames), "--json",
                               "--max-new-tokens", "3"], capsys)
    assert code == 0 and json.loads(stdout)["frames"] == 7, stdout
    from llark.train import TrainConfigError, TrainRecipe, load_config

    with pytest.raises(TrainConfigError, match="model.connector .* differs from model.init_from's"):
        TrainRecipe(load_config(None, {"data.shards": [str(shards)], "model.init_from": str(final),
                                       "model.connector.name": "mlp", "output_dir": str(tmp_path / "more"),
                                       "global_batch": 1, "micro_batch": 1}))


@pytest.mark.slow
@pytest.mark.parametrize("name,mode,zero", [("qformer", "full", 3), ("mlp", "lora", 2)])
def test_two_processes_train_each_connector_under_zero_and_resume_exactly(name, mode, zero, tmp_path):
    import shutil

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from fixtures_train import write_shards
    from safetensors.torch import load_file
    from test_train import losses, run_train, zero3_json

    from llark.model import load_pretrained

    shards = tmp_path / "shards"
    write_shards(shards, n_samples=16, n_shards=2, dim=16, frames=(3, 8), pairs=(1, 2))
    settings = {"model.connector.name": name, "model.mode": mode, "optim.max_steps": 4, "save_every": 2,
                "data.num_workers": 1, **({"deepspeed": str(zero3_json(tmp_path))} if zero == 3 else {})}
    if name == "qformer":
        settings.update({"model.connector.queries": 2, "model.connector.layers": 1, "model.connector.heads": 2})
    out = tmp_path / "run"
    result = run_train(out, shards, nproc=2, timeout=400, **settings)
    assert f"world size 2; ZeRO-{zero}" in result.stdout
    straight = losses(out)
    assert sorted(straight) == [1, 2, 3, 4]
    # The checkpoint's connector is whole, equal to what ZeRO's partitions consolidate to, and the
    # exported model loads it.
    checkpoints = out / "checkpoints"
    saved = load_file(str(checkpoints / "step_00000004" / "projector.safetensors"))
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag="step_00000004")
    assert saved.keys() == {k[len("projector."):] for k in consolidated if k.startswith("projector.")}
    for key, tensor in saved.items():
        torch.testing.assert_close(tensor, consolidated[f"projector.{key}"], rtol=0, atol=0, msg=key)
    model, _, _ = load_pretrained(out / "final", dtype="float32")
    for key, tensor in model.projector.state_dict().items():
        torch.testing.assert_close(tensor, saved[key], rtol=0, atol=0, msg=key)
    shutil.rmtree(checkpoints / "step_00000004")
    shutil.rmtree(out / "final")
    result = run_train(out, shards, nproc=2, timeout=400, **settings)
    assert "resuming at step 2" in result.stdout and losses(out) == straight
