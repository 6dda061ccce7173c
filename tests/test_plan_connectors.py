"""`llark plan --connector`: the connector's exact parameters, its activations and its audio tokens."""

import re

import pytest
import torch

from llark.cli import main
from llark.model.connectors import audio_tokens, build_connector
from llark.model.memory import (CLIP_FRAMES, GB, MODELS, connector_activations, connector_shape, lm_sequence,
                                plan_memory)

SETTINGS = [
    {"name": "linear"},
    {"name": "mlp"},
    {"name": "mlp", "hidden": 96},
    {"name": "qformer"},
    {"name": "qformer", "window": 5, "queries": 2, "layers": 3, "heads": 2, "width": 48},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_parameters_are_the_real_connectors(settings):
    real = build_connector(settings, 40, 72, dtype=torch.float32, device="cpu")
    shape = connector_shape(settings, 40, 72)
    assert shape.params == sum(p.numel() for p in real.parameters())
    smol = MODELS["smollm2-135m"]
    plan = plan_memory(smol, mode="projector", encoder_dim=40, connector=settings, gpus=1, zero_stage=0)
    expected = connector_shape(settings, 40, smol.hidden).params
    assert plan.trained_params == expected
    assert plan.parts["gradients"] == pytest.approx(2 * expected)
    assert plan.parts["optimizer"] == pytest.approx(12 * expected)


def saved_values(settings, batch, frames, dim, hidden):
    """Values autograd keeps for the backward of the real connector's forward (parameters excluded)."""
    torch.manual_seed(0)
    connector = build_connector(settings, dim, hidden, dtype=torch.float32)
    params = {p.untyped_storage().data_ptr() for p in connector.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        connector(torch.randn(batch, frames, dim), torch.full((batch,), frames))
    return sum(seen.values())


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("frames", [250, 31])
def test_activations_are_what_the_connector_saves(settings, frames):
    shape = connector_shape(settings, 24, 64)
    estimate = connector_activations(shape, 24, 3, frames) / 2  # bf16 bytes → values
    assert estimate == pytest.approx(saved_values(settings, 3, frames, 24, 64), rel=0.02)


def test_a_bad_connector_option_is_refused_naming_the_field(capsys):
    cases = [(["--connector", "qformer", "--connector-option", "windw=3"], "model.connector.windw"),
             (["--connector", "qformer", "--connector-option", "window=0"], "model.connector.window"),
             (["--connector", "mlp", "--connector-option", "hidden=wide"], "model.connector.hidden"),
             (["--connector", "qformer", "--connector-option", "heads=7"], "model.connector.heads"),
             (["--connector", "gru"], "model.connector.name"),
             (["--connector-option", "hidden"], "--connector-option")]
    for argv, field in cases:
        assert main(["plan", *argv]) == 2, argv
        captured = capsys.readouterr()
        assert field in captured.err and not captured.out, (argv, captured)
    with pytest.raises(ValueError, match="model.connector.layers"):
        plan_memory(MODELS["llama2-7b"], connector={"name": "qformer", "layers": -1})


def test_the_qformers_fewer_audio_tokens_reduce_the_activations(capsys):
    shape, b = MODELS["llama2-7b"], 4
    qformer = {"name": "qformer"}
    tokens = audio_tokens(qformer, CLIP_FRAMES)
    assert tokens < CLIP_FRAMES
    assert lm_sequence(2048, qformer) == 2048 - CLIP_FRAMES + tokens
    assert lm_sequence(2048, {"name": "mlp"}) == 2048
    linear = plan_memory(shape, micro_batch=b, seq_len=2048)
    q = plan_memory(shape, micro_batch=b, seq_len=lm_sequence(2048, qformer), connector=qformer)
    assert q.connector_activations > linear.connector_activations  # its blocks keep more than one linear layer
    assert q.parts["activations"] < linear.parts["activations"]

    def lm_part(seq):  # the LM's checkpointed activations at that sequence length
        return (shape.layers * 2 + 34) * b * seq * shape.hidden

    assert q.parts["activations"] == pytest.approx(lm_part(2048 - CLIP_FRAMES + tokens) + q.connector_activations)
    assert linear.parts["activations"] == pytest.approx(lm_part(2048) + linear.connector_activations)

    assert main(["plan", "--micro-batch", str(b), "--connector", "qformer"]) == 0
    out = capsys.readouterr().out
    assert f"sequence 2048 ({2048 - CLIP_FRAMES + tokens} with the qformer's {tokens} audio tokens" in out
    assert re.search(rf"connector qformer \(window 3, .*\): {q.connector.params:,} parameters \(trained\), "
                     rf"{tokens} audio tokens per 25 s clip at 10 Hz", out), out
    printed = float(re.search(r"activations\s+([\d.]+) GB", out).group(1))
    assert printed == pytest.approx(q.parts["activations"] / GB, abs=0.006)
    assert main(["plan", "--micro-batch", str(b)]) == 0
    out = capsys.readouterr().out
    assert "sequence 2048, 8 GPUs" in out and "connector linear: 19,664,896 parameters" in out
    assert f"{CLIP_FRAMES} audio tokens per 25 s clip" in out
    # The audio must fit in the sequence it is part of.
    assert main(["plan", "--seq-len", "100"]) == 2
    assert "--audio-frames" in capsys.readouterr().err


def test_the_full_run_trains_on_the_connectors_tokens(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "augmented.jsonl").write_text('{"annotations": {"genre": "rock"}, "features": {"tempo": 120.0}}\n')
    flop = {}
    for name in ("linear", "qformer"):
        assert main(["plan", "--pipeline", str(run), "--connector", name]) == 0
        out = capsys.readouterr().out
        flop[name] = float(re.search(r"train \(computed\)\s+([\d.]+) EFLOP", out).group(1))
        assert f"the {name} connector's {audio_tokens({'name': name}, CLIP_FRAMES)} audio tokens" in out
    text = 400 - CLIP_FRAMES  # FullRun's tokens per sample: 250 frames and the question and answer
    assert flop["qformer"] / flop["linear"] == pytest.approx(
        (text + audio_tokens({"name": "qformer"}, CLIP_FRAMES)) / 400, rel=0.01)
