"""Every chat backbone family on a tiny random stand-in (tests/backbones.py): the template's traits read
from the template, the loss mask token by token, the system prompt folded where a template has none,
the inference prompt a prefix of the training ids, template errors and tokenizer merges as bad
samples or a refusal at start, and a few training steps in each mode, exported, loaded by
``AutoModelForCausalLM.from_pretrained`` and asked through ``llark ask``; two processes under ZeRO-3 (and
LoRA under ZeRO-2) for non-Llama families; ``model.compile``'s compiled decoder layers against eager."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from backbones import BACKBONES, backbone_dir  # noqa: E402
from fixtures_train import train_steps, write_shards  # noqa: E402
from test_ask import run_ask  # noqa: E402
from test_train import REPO, losses, run_train, zero3_json  # noqa: E402

# DeepSpeed (imported by the training helpers) prints its accelerator choice to stdout the first time it is
# asked; asking here keeps that line out of the `llark ask --json` output the tests parse.
from deepspeed.accelerator import get_accelerator  # noqa: E402

get_accelerator()

from llark.data import BadSample, ExampleEncoder, ShardSample  # noqa: E402
from llark.model import IGNORE_INDEX, ChatFormatError, ChatFormatter, load_tokenizer  # noqa: E402

FAMILIES = sorted(BACKBONES)
SYSTEM = "You are a music assistant."
PAIRS = [("What is the key of this song?", "The key is C minor."),
         ("What is the tempo of this song?", "The tempo is about 120 BPM.")]
DIM = 16


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


def formatter_for(family: str, **kwargs) -> ChatFormatter:
    return ChatFormatter(load_tokenizer(backbone_dir(family, **kwargs)))


def test_template_traits_are_read_from_the_template(family):
    expected = BACKBONES[family]
    fmt = formatter_for(family)
    assert fmt.end_of_turn == expected.end_of_turn
    assert fmt.traits.system_role is expected.system_role
    assert fmt.traits.render_kwargs == ({"enable_thinking": False} if family == "qwen3" else {})
    assert fmt.end_of_turn_id == fmt.tokenizer.convert_tokens_to_ids(expected.end_of_turn)


def expected_labels(fmt: ChatFormatter, text: str, spans, n_frames: int) -> list[int]:
    """Labels built independently: a token is supervised when its characters lie inside an answer span."""
    raw = fmt.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    labels = []
    for token, (a, b) in zip(raw.ids, raw.offsets):
        if token == fmt.audio_token_id:
            labels += [IGNORE_INDEX] * n_frames
        else:
            labels.append(token if b > a and any(s <= a and b <= e for s, e in spans) else IGNORE_INDEX)
    return labels


@pytest.mark.parametrize("n_pairs", [1, 2])
def test_masks_token_by_token(family, n_pairs):
    fmt = formatter_for(family)
    eot = BACKBONES[family].end_of_turn
    pairs = PAIRS[:n_pairs]
    if family == "qwen3" and n_pairs == 2:
        with pytest.raises(ChatFormatError, match="not prefix-stable at message 2"):
            fmt.encode(fmt.conversation(pairs, SYSTEM), 3)
        return
    enc = fmt.encode(fmt.conversation(pairs, SYSTEM), 3)
    # The answers and their end-of-turn token are the supervised text, nothing else.
    assert [enc.text[s:e] for s, e in enc.spans] == [answer + eot for _, answer in pairs]
    assert enc.labels == expected_labels(fmt, enc.text, enc.spans, 3)
    supervised = [t for t, label in enumerate(enc.labels) if label != IGNORE_INDEX]
    assert enc.input_ids.count(fmt.audio_token_id) == 3
    assert all(enc.labels[t] == IGNORE_INDEX for t, i in enumerate(enc.input_ids) if i == fmt.audio_token_id)
    ends = [t for t in supervised if t + 1 == len(enc.labels) or enc.labels[t + 1] == IGNORE_INDEX]
    assert [enc.input_ids[t] for t in ends] == [fmt.end_of_turn_id] * n_pairs
    # System, user turn, question and generation prompt all come before the first supervised token.
    first_answer = enc.spans[0][0]
    assert SYSTEM in enc.text[:first_answer] and PAIRS[0][0] in enc.text[:first_answer]
    if not BACKBONES[family].system_role:
        user_turn = enc.text.index(SYSTEM)
        assert enc.text[user_turn:].startswith(SYSTEM + "\n\n<|audio|>\n" + PAIRS[0][0])
    # The prompt inference feeds is the start of the training ids, and the next token is the answer's.
    prompt = fmt.encode_prompt(fmt.prompt(PAIRS[0][0], SYSTEM), 3)
    assert enc.input_ids[:len(prompt)] == prompt and supervised[0] == len(prompt)


def test_the_dry_render_passes_and_says_when_multi_turn_cannot_work(family):
    fmt = formatter_for(family)
    fmt.check(SYSTEM)
    if family == "qwen3":
        with pytest.raises(ChatFormatError, match="multi-turn conversations cannot be trained.*conversation: pair"):
            fmt.check(SYSTEM, multi_turn=True)
    else:
        fmt.check(SYSTEM, multi_turn=True)


def test_a_merge_across_the_generation_prompt_is_refused_at_start_and_per_sample():
    # GPT-2's pre-tokenizer splits "\n\nThe" into "\n", "\nThe" but keeps a final "\n\n" whole.
    fmt = formatter_for("llama3", split="gpt2")
    with pytest.raises(ChatFormatError, match=r"training .*'Ċ','Ċ'.*inference .*'ĊĊ'.*the Llama 3 chat template"):
        fmt.check(SYSTEM)
    sample = ShardSample(key="clip-1", pairs=[PAIRS[0]], npy=_npy(np.zeros((3, DIM), np.float16)), frames=3)
    with pytest.raises(BadSample, match="clip-1: answer 0's prompt tokenizes differently"):
        ExampleEncoder(fmt, DIM, 512, SYSTEM)(sample, None)


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def test_a_template_that_raises_on_a_sample_makes_it_a_bad_sample():
    tokenizer = load_tokenizer(backbone_dir("gemma2"))
    tokenizer.chat_template = ("{% for m in messages %}{% if 'tabla' in m['content'] %}"
                               "{{ raise_exception('no tablas here') }}{% endif %}{% endfor %}" + tokenizer.chat_template)
    fmt = ChatFormatter(tokenizer)
    encode = ExampleEncoder(fmt, DIM, 512, SYSTEM)
    good = ShardSample(key="ok", pairs=[PAIRS[0]], npy=_npy(np.zeros((2, DIM), np.float16)), frames=2)
    bad = ShardSample(key="odd", pairs=[("Is there a tabla?", "Yes.")], npy=good.npy, frames=2)
    assert encode(good, None)["labels"].count(IGNORE_INDEX) < len(encode(good, None)["labels"])
    with pytest.raises(BadSample, match="odd: the Gemma chat template .* raised: TemplateError: no tablas here"):
        encode(bad, None)


def test_a_template_that_cannot_render_a_plain_exchange_is_named():
    tokenizer = load_tokenizer(backbone_dir("mistral"))
    tokenizer.chat_template = "{{ raise_exception('this template wants tools') }}"
    with pytest.raises(ChatFormatError, match="does not render a plain user/assistant exchange.*wants tools"):
        ChatFormatter(tokenizer)


def test_lora_targets_are_checked_against_the_architecture():
    from llark.model import ModelConfigError
    from llark.model.llark import lora_targets
    from transformers import AutoModelForCausalLM

    phi3 = AutoModelForCausalLM.from_pretrained(str(backbone_dir("phi3")))
    with pytest.raises(ModelConfigError, match=r"\['q_proj', 'k_proj', 'v_proj', 'gate_proj', 'up_proj'\].*"
                                               r"'gate_up_proj'.*'qkv_proj'"):
        lora_targets(phi3, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert lora_targets(phi3, ["qkv_proj", "o_proj"]) == ["qkv_proj", "o_proj"]
    assert lora_targets(phi3, "all-linear") == "all-linear"


# ---------------------------------------------------------------------------------------------
# Training steps in each mode, export, reload and `llark ask`


MODES = {"full": None, "projector": None, "lora": "all-linear"}


def training_batch(tokenizer, tmp_path):
    """Four samples written as a shard, encoded with the family's template and collated: (samples, inputs)."""
    from llark.data import collate

    encode = ExampleEncoder(ChatFormatter(tokenizer), DIM, 512, SYSTEM)
    samples = write_shards(tmp_path / "shards", n_samples=4, n_shards=1, dim=DIM)
    examples = [encode(ShardSample(key=k, pairs=[(p["question"], p["answer"]) for p in s["pairs"]],
                                   npy=_npy(s["audio"]), frames=len(s["audio"])), 0) for k, s in samples.items()]
    batch = collate(examples, tokenizer.pad_token_id)
    return samples, {k: batch[k] for k in ("input_ids", "attention_mask", "audio", "audio_frames", "labels")}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_each_family_trains_in_each_mode_exports_and_answers(family, mode, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from llark.model import LlarkConfig, build_llark, configure_training, export_pretrained, load_pretrained
    from llark.model.llark import LoraSettings, VOCAB_MULTIPLE, projector_state

    torch.manual_seed(0)
    config = LlarkConfig(lm_path=str(backbone_dir(family)), encoder_dim=DIM, system_prompt=SYSTEM,
                         encoder={"name": "fixture", "layer": None, "frame_rate_hz": 10.0, "dim": DIM,
                                  "dtype": "float16", "config": {"fixture": True}})
    model, tokenizer = build_llark(config, dtype="float32", attn_implementation="eager")
    assert model.lm.get_input_embeddings().num_embeddings % VOCAB_MULTIPLE == 0
    configure_training(model, mode, LoraSettings(r=4, target_modules=MODES[mode] or LoraSettings().target_modules),
                       gradient_checkpointing=False)
    samples, inputs = training_batch(tokenizer, tmp_path)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lm_trainable = sum(p.numel() for p in model.lm.parameters() if p.requires_grad)
    assert (lm_trainable == 0) == (mode == "projector")
    losses = train_steps(model, inputs, trainable)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses

    lm = model.lm.merge_and_unload() if mode == "lora" else model.lm
    out = export_pretrained(tmp_path / "final", lm, tokenizer, model.config, projector_state(model))
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(plain).__name__ == BACKBONES[family].architecture.replace("Config", "ForCausalLM")
    reloaded, _, _ = load_pretrained(out, dtype="float32", attn_implementation="eager")
    torch.testing.assert_close(reloaded.projector.weight, model.projector.weight)

    frames = tmp_path / "clip.npy"
    np.save(frames, next(iter(samples.values()))["audio"], allow_pickle=False)
    code, stdout, _ = run_ask([str(out), "What is the key of this song?", "--frames", str(frames), "--json",
                               "--max-new-tokens", "4"], capsys)
    answer = json.loads(stdout)
    assert code == 0 and isinstance(answer["answer"], str) and answer["frames"] == len(np.load(frames))


# ---------------------------------------------------------------------------------------------
# model.compile: each decoder layer compiled on its own


COMPILE_CASES = [("llama3", "full", False), ("gemma2", "lora", True), ("phi3", "projector", True)]


@pytest.mark.parametrize("family_name,mode,checkpointing", COMPILE_CASES)
def test_compiled_decoder_layers_give_the_eager_loss_and_gradients(family_name, mode, checkpointing, tmp_path):
    """The layers compiled with aot_eager (dynamo's tracing and AOTAutograd's joint graph, without inductor's
    code generation, which `llark train` runs in the slow test below): the same loss and gradients as
    eager, no graph break inside a layer, and the module tree and parameter names left as they were."""
    from torch._dynamo.utils import counters

    from llark.model import LlarkConfig, build_llark, configure_training
    from llark.model.compile import compile_decoder_layers, is_compiled
    from llark.model.llark import LoraSettings

    torch._dynamo.reset()
    torch.manual_seed(0)
    model, tokenizer = build_llark(LlarkConfig(lm_path=str(backbone_dir(family_name)), encoder_dim=DIM),
                                   dtype="float32", attn_implementation="sdpa")
    configure_training(model, mode, LoraSettings(r=4, dropout=0.0, target_modules="all-linear"), checkpointing)
    _, inputs = training_batch(tokenizer, tmp_path)

    def loss_and_gradients():
        model.zero_grad(set_to_none=True)
        _, loss = model(**inputs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    names = [n for n, _ in model.named_parameters()]
    eager_loss, eager_grads = loss_and_gradients()
    counters.clear()
    layers = compile_decoder_layers(model.lm, backend="aot_eager")
    assert len(layers) == 2 and all(is_compiled(layer) for layer in layers)
    assert layers is model.lm.get_decoder().layers
    assert [n for n, _ in model.named_parameters()] == names  # no _orig_mod. prefix
    compiled_loss, compiled_grads = loss_and_gradients()
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert compiled_grads.keys() == eager_grads.keys() and "projector.weight" in compiled_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, msg=name)
    torch._dynamo.reset()


def test_compile_is_refused_where_it_cannot_work():
    from llark.train import TrainConfigError, load_config
    from llark.train.config import check_run_settings

    with pytest.raises(TrainConfigError, match="model.compile: torch.compile cannot compile the bitsandbytes layers"):
        load_config(None, {"model.compile": True, "model.mode": "lora", "model.quantization": "4bit"})
    cfg = load_config(None, {"model.compile": True, "data.shards": ["shards"]})
    check_run_settings(cfg, 2, 2)
    with pytest.raises(TrainConfigError, match="model.compile with ZeRO-3 is not supported"):
        check_run_settings(cfg, 2, 3)


# ---------------------------------------------------------------------------------------------
# The recipe's check at start


@pytest.fixture
def recipe_for(tmp_path, monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    write_shards(tmp_path / "shards", n_samples=4, n_shards=1, dim=DIM)

    def make(lm_dir, **overrides):
        from llark.train import TrainRecipe, load_config

        return TrainRecipe(load_config(None, {"data.shards": [str(tmp_path / "shards")], "model.lm_path": str(lm_dir),
                                              "global_batch": 1, "micro_batch": 1, "output_dir": str(tmp_path / "run"),
                                              **overrides}))
    return make


def test_the_recipe_refuses_an_unusable_template_before_any_weight_loads(recipe_for, monkeypatch, capsys):
    from llark.model import llark as model_module
    from llark.train import TrainConfigError

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(model_module, "load_language_model", no_weights)
    with pytest.raises(TrainConfigError, match="model.lm_path: the chat template check failed: answer 0's prompt"):
        recipe_for(backbone_dir("llama3", split="gpt2"))
    with pytest.raises(TrainConfigError, match="multi-turn conversations cannot be trained"):
        recipe_for(backbone_dir("qwen3"), **{"data.conversation": "multi_turn"})
    recipe_for(backbone_dir("gemma2"), **{"model.system_prompt": SYSTEM})
    out = capsys.readouterr().out
    assert "train: the Gemma chat template of" in out
    assert "turns end with '<end_of_turn>' (it has no system role: the system prompt opens the first user turn)" in out


# ---------------------------------------------------------------------------------------------
# `llark train` under DeepSpeed for each family (slow), then `llark ask` on the export


TRAIN_RUNS = [("llama3", "full"), ("qwen2", "lora"), ("qwen3", "projector"), ("gemma2", "lora"),
              ("mistral", "full"), ("phi3", "lora")]


@pytest.mark.slow
@pytest.mark.parametrize("family_name,mode", TRAIN_RUNS)
def test_llark_train_runs_each_family_and_its_export_answers(family_name, mode, tmp_path, capsys):
    write_shards(tmp_path / "shards", n_samples=16, n_shards=2, dim=DIM, frames=(3, 6), pairs=(1, 2))
    out = tmp_path / "run"
    result = run_train(out, tmp_path / "shards", **{
        "model.lm_path": str(backbone_dir(family_name)), "model.mode": mode, "model.lora.r": 4,
        "model.lora.target_modules": "all-linear", "model.system_prompt": SYSTEM, "optim.max_steps": 6,
        "save_every": 6, "data.num_workers": 1})
    assert f"turns end with '{BACKBONES[family_name].end_of_turn}'" in result.stdout
    curve = losses(out)
    assert sorted(curve) == list(range(1, 7)) and curve[6] < curve[1], curve
    assert_export_answers(out / "final", tmp_path, capsys)


def assert_export_answers(final, tmp_path, capsys) -> None:
    """``llark ask`` loads the exported model and answers about a clip."""
    frames = tmp_path / "clip.npy"
    np.save(frames, np.random.default_rng(0).standard_normal((5, DIM)).astype(np.float16), allow_pickle=False)
    capsys.readouterr()  # what the test printed before (DeepSpeed's checkpoint reader) is not the answer
    code, stdout, _ = run_ask([str(final), "What is the key of this song?", "--frames", str(frames), "--json",
                               "--max-new-tokens", "4"], capsys)
    assert code == 0, stdout
    assert isinstance(json.loads(stdout)["answer"], str), stdout


def run_metrics(out) -> tuple[dict[int, float], dict[int, float]]:
    """(step → training loss, step → validation loss) from metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r["loss"] for r in records if "loss" in r},
            {r["step"]: r["val_loss"] for r in records if "val_loss" in r})


# Two processes: ZeRO-3 with every parameter partitioned (full and projector modes; LoRA is refused with
# ZeRO-3), and LoRA under ZeRO-2. Qwen2 ties its output layer to the token embeddings, Gemma 2 scales the
# input embeddings (the projected audio too) and soft-caps its logits, Phi-3 fuses q/k/v.
DISTRIBUTED_RUNS = [("qwen2", "full", 3), ("gemma2", "full", 3), ("phi3", "projector", 3), ("mistral", "lora", 2)]


@pytest.mark.slow
@pytest.mark.parametrize("family_name,mode,zero", DISTRIBUTED_RUNS)
def test_two_processes_train_each_family_under_zero3_or_lora_under_zero2(family_name, mode, zero, tmp_path, capsys):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    write_shards(tmp_path / "shards", n_samples=16, n_shards=2, dim=DIM, frames=(3, 6), pairs=(1, 2))
    out = tmp_path / "run"
    deepspeed = str(zero3_json(tmp_path)) if zero == 3 else str(REPO / "launch" / "zero2.json")
    # The loss on the same 16 training examples at steps 2, 4 and 6: a frozen random LM hardly reads the audio,
    # so in projector mode only a fixed set of examples shows the loss falling, not the batches' losses.
    result = run_train(out, tmp_path / "shards", nproc=2, timeout=400, **{
        "model.lm_path": str(backbone_dir(family_name)), "model.mode": mode, "model.lora.r": 4,
        "model.lora.target_modules": "all-linear", "model.system_prompt": SYSTEM, "deepspeed": deepspeed,
        "optim.max_steps": 6, "save_every": 6, "data.num_workers": 1, "optim.projector_lr": 3e-2,
        "validation.every": 2, "validation.split": "train", "validation.max_examples": 16})
    assert (f"train: 2 processes, global batch 4 = micro-batch 2 x grad-accum 1 x world size 2; ZeRO-{zero}, "
            f"float32, mode {mode}") in result.stdout
    curve, validation = run_metrics(out)
    assert sorted(curve) == list(range(1, 7)) and all(np.isfinite(list(curve.values()))), curve
    assert sorted(validation) == [2, 4, 6] and validation[6] < validation[4] < validation[2], validation
    # Both ranks read their share of the data and hold their partition of the optimizer state.
    checkpoint = out / "checkpoints" / "step_00000006"
    for rank in (0, 1):
        assert json.loads((checkpoint / f"rank_{rank:05d}.json").read_text())["loader"]["positions"]
        assert list(checkpoint.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")), sorted(checkpoint.iterdir())

    plain = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    assert type(plain).__name__ == BACKBONES[family_name].architecture.replace("Config", "ForCausalLM")
    exported = plain.state_dict()  # tied weights (Qwen2's output layer) as the loaded model has them
    if zero == 3:
        # The export is the trained weights gathered from both ranks' partitions, full size.
        trained = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=checkpoint.name)
        lm = {k[len("lm."):]: v for k, v in trained.items() if k.startswith("lm.")}
        if plain.config.tie_word_embeddings:
            lm.setdefault("lm_head.weight", lm["model.embed_tokens.weight"])
        assert exported.keys() == lm.keys()
        for name, tensor in exported.items():
            torch.testing.assert_close(tensor, lm[name], rtol=0, atol=0, msg=name)
    if mode == "projector":
        # The frozen LM comes out as it went in (the embedding rows added for the audio and pad tokens aside).
        base = load_file(str(backbone_dir(family_name) / "model.safetensors"))
        assert base.keys() <= exported.keys()
        for name, tensor in base.items():
            torch.testing.assert_close(exported[name][:len(tensor)], tensor, rtol=0, atol=0, msg=name)
    assert_export_answers(out / "final", tmp_path, capsys)


@pytest.mark.slow
def test_llark_train_with_compiled_layers_gives_the_eager_losses(tmp_path):
    """`llark train` with model.compile: true (inductor's generated code, on CPU), LoRA and gradient
    checkpointing on Gemma 2: the losses and the exported weights of the eager run (LoRA dropout off: the
    compiled graph draws its dropout masks from another random stream than eager PyTorch)."""
    from safetensors.torch import load_file

    write_shards(tmp_path / "shards", n_samples=16, n_shards=2, dim=DIM, frames=(3, 6), pairs=(1, 2))
    runs = {}
    for compiled in (False, True):
        out = tmp_path / ("compiled" if compiled else "eager")
        result = run_train(out, tmp_path / "shards", timeout=500, **{
            "model.lm_path": str(backbone_dir("gemma2")), "model.mode": "lora", "model.lora.r": 4,
            "model.lora.target_modules": "all-linear", "model.lora.dropout": 0.0, "model.gradient_checkpointing": True,
            "model.attn_implementation": "sdpa", "model.compile": compiled, "optim.max_steps": 4, "save_every": 4,
            "data.num_workers": 1})
        said = "train: model.compile: the LM's 2 decoder layers (Gemma2DecoderLayer) are compiled one by one"
        assert result.stdout.count(said) == (1 if compiled else 0), result.stdout
        runs[compiled] = losses(out), load_file(str(out / "final" / "model.safetensors"))
    (eager, eager_weights), (compiled, compiled_weights) = runs[False], runs[True]
    assert sorted(compiled) == [1, 2, 3, 4] and compiled == pytest.approx(eager, rel=1e-5), (compiled, eager)
    assert compiled_weights.keys() == eager_weights.keys()
    for name, tensor in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
