"""The model on a tiny random Llama: chat rendering, assistant-only labels token by token, placeholder
replacement, loss masking, trainable modes, export and reload."""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fixtures_train import LLAMA2_CHAT_TEMPLATE, smollm2_tokenizer_or_skip, tiny_lm_dir  # noqa: E402

from llark.data import collate  # noqa: E402
from llark.model import (  # noqa: E402
    IGNORE_INDEX, ChatFormatError, ChatFormatter, LlarkConfig, ModelConfigError, build_llark, build_messages,
    configure_training, export_pretrained, load_pretrained, load_tokenizer,
)
from llark.model.llark import LlarkModel, LoraSettings, check_quantization, projector_state  # noqa: E402

SYSTEM = "You are a music assistant."
PAIRS = [("What is the key of this song?", "The key is C minor."),
         ("What is the tempo of this song?", "The tempo is about 120 BPM."),
         ("Is there a drum kit?", "Yes, a soft brush kit keeps time.")]


@pytest.fixture(scope="module")
def lm_dir():
    return tiny_lm_dir()


@pytest.fixture(scope="module")
def tokenizer(lm_dir):
    return load_tokenizer(lm_dir)


def tiny_model(lm_dir, encoder_dim=16, seed=0):
    torch.manual_seed(seed)
    model, tok = build_llark(LlarkConfig(lm_path=str(lm_dir), encoder_dim=encoder_dim), dtype="float32",
                             attn_implementation="eager")
    return model, tok


def pieces(tokenizer, ids):
    return "".join(tokenizer.convert_ids_to_tokens(ids)).replace("▁", " ")


def spelled(messages, n_frames):
    """The messages with the audio placeholder written out once per frame."""
    return [{**m, "content": m["content"].replace("<|audio|>", "<|audio|>" * n_frames)} for m in messages]


def supervised_runs(labels):
    runs, run = [], []
    for x in labels:
        if x != IGNORE_INDEX:
            run.append(x)
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


# ---------------------------------------------------------------------------------------------
# Llama 2 format


def test_llama2_template_renders_meta_format_exactly(tokenizer):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Key?"},
                {"role": "assistant", "content": "C minor."}]
    assert tokenizer.chat_template == LLAMA2_CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<s>[INST] <<SYS>>\nYou are a music assistant.\n<</SYS>>\n\nHi [/INST] Hello. </s>"
        "<s>[INST] Key? [/INST] C minor. </s>"
    )


def test_llama2_labels_token_by_token_multi_turn(tokenizer):
    fmt = ChatFormatter(tokenizer)
    enc = fmt.encode(build_messages(PAIRS, SYSTEM), 5)
    ids, labels = enc.input_ids, enc.labels
    assert len(ids) == len(labels)
    # One tokenization: the ids are exactly the tokenizer's own rendering of the template, with the
    # audio placeholder spelled out once per frame.
    expected_ids = tokenizer.apply_chat_template(spelled(build_messages(PAIRS, SYSTEM), 5), tokenize=True,
                                                 return_dict=False)
    assert ids == list(expected_ids)
    # Exactly one BOS at the start, and each round opens with one BOS (Llama 2's multi-turn format).
    bos, eos, inst_end = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("▁[/INST]")
    assert ids[0] == bos and ids[1] != bos
    assert ids.count(bos) == len(PAIRS)
    # Independently of spans: the supervised tokens are those after each "[/INST]" up to its "</s>".
    expected = [IGNORE_INDEX] * len(ids)
    inside = False
    for t, i in enumerate(ids):
        if inside:
            expected[t] = i
        if i == inst_end:
            inside = True
        elif i == eos:
            inside = False
    assert labels == expected
    # Each supervised run reads as " answer </s>" and ends on EOS; nothing else is supervised.
    runs = supervised_runs(labels)
    assert [pieces(tokenizer, r) for r in runs] == [f" {a} </s>" for _, a in PAIRS]
    assert all(r[-1] == eos for r in runs)
    assert sum(len(r) for r in runs) == enc.n_supervised
    # The audio placeholders sit in the first user turn and are never supervised.
    audio = [t for t, i in enumerate(ids) if i == fmt.audio_token_id]
    assert len(audio) == 5 and all(labels[t] == IGNORE_INDEX for t in audio)
    assert audio[0] < ids.index(inst_end)


def test_single_pair_and_no_system_prompt(tokenizer):
    fmt = ChatFormatter(tokenizer)
    enc = fmt.encode(build_messages(PAIRS[:1]), 2)
    assert enc.text == "<s>[INST] <|audio|>\nWhat is the key of this song? [/INST] The key is C minor. </s>"
    prefix = tokenizer("<s>[INST] <|audio|><|audio|>\n", add_special_tokens=False)["input_ids"]
    assert enc.input_ids[:len(prefix)] == prefix
    assert [pieces(tokenizer, r) for r in supervised_runs(enc.labels)] == [" The key is C minor. </s>"]


def test_nothing_supervised_is_an_error(tokenizer):
    tokenizer = load_tokenizer(tokenizer.name_or_path)
    # A template that drops assistant turns: no assistant text can be located.
    tokenizer.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(ChatFormatError):
        ChatFormatter(tokenizer).encode(build_messages(PAIRS[:1]))


def test_double_bos_is_an_error(tokenizer):
    tokenizer = load_tokenizer(tokenizer.name_or_path)
    tokenizer.chat_template = "{{ bos_token }}" + LLAMA2_CHAT_TEMPLATE
    with pytest.raises(ChatFormatError, match="two BOS"):
        ChatFormatter(tokenizer).encode(build_messages(PAIRS[:1]))


def test_missing_end_of_turn_is_an_error(tokenizer):
    tokenizer = load_tokenizer(tokenizer.name_or_path)
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE.replace("+ ' ' + eos_token", "")
    with pytest.raises(ChatFormatError, match="not closed"):
        ChatFormatter(tokenizer).encode(build_messages(PAIRS[:1]))


def test_special_token_text_in_a_message_is_refused(tokenizer):
    with pytest.raises(ChatFormatError, match="special token"):
        ChatFormatter(tokenizer).encode(build_messages([("Key?", "It is </s> C minor.")]))
    with pytest.raises(ChatFormatError, match="audio placeholder"):
        ChatFormatter(tokenizer).encode(build_messages([("Key?", "<|audio|>")]))


def test_a_token_across_the_answer_boundary_is_an_error(tokenizer):
    tok = load_tokenizer(tokenizer.name_or_path)
    # A vocabulary entry that glues the end of "[/INST]" to the first answer word.
    tok.add_tokens(["] The"])
    with pytest.raises(ChatFormatError, match="crosses the boundary"):
        ChatFormatter(tok).encode(build_messages(PAIRS[:1]))


def test_tokenizer_pad_is_not_eos_for_llama(tokenizer):
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert "<|audio|>" in tokenizer.get_vocab()


# ---------------------------------------------------------------------------------------------
# SmolLM2's own template (ChatML; its pad token is its EOS)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return smollm2_tokenizer_or_skip()


def test_smollm2_labels_token_by_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    fmt = ChatFormatter(tok)
    messages = build_messages(PAIRS, SYSTEM)
    enc = fmt.encode(messages, 3)
    assert enc.input_ids == list(tok.apply_chat_template(spelled(messages, 3), tokenize=True, return_dict=False))
    assert enc.text.startswith("<|im_start|>system\nYou are a music assistant.<|im_end|>\n<|im_start|>user\n"
                               "<|audio|>\nWhat is the key")
    assert enc.input_ids.count(fmt.audio_token_id) == 3
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end
    runs = supervised_runs(enc.labels)
    # Each answer, then <|im_end|>; the newline the template adds after it is not supervised.
    assert runs == [tok(a, add_special_tokens=False)["input_ids"] + [im_end] for _, a in PAIRS]
    newline_after = [enc.input_ids[t + 1] for t, x in enumerate(enc.labels[:-1])
                     if x == im_end and enc.labels[t + 1] == IGNORE_INDEX]
    assert len(newline_after) == len(PAIRS) and all(enc.labels[enc.input_ids.index(i)] == IGNORE_INDEX for i in newline_after)


def test_final_eos_supervised_when_pad_is_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # SmolLM2 pads with <|im_end|>
    fmt = ChatFormatter(tok)
    import numpy as np

    examples = []
    for n, pairs in ((2, PAIRS[:1]), (4, PAIRS[:2])):
        enc = fmt.encode(build_messages(pairs), n)
        examples.append({"key": f"k{n}", "input_ids": enc.input_ids, "labels": enc.labels,
                         "audio": np.zeros((n, 8), np.float16)})
    batch = collate(examples, tok.pad_token_id)
    short = batch["attention_mask"][0].sum().item()
    assert short < batch["input_ids"].shape[1]
    # The last supervised label of the short row is its final <|im_end|>, though pads have the same id.
    last_supervised = max(t for t in range(short) if batch["labels"][0, t] != IGNORE_INDEX)
    assert batch["labels"][0, last_supervised].item() == tok.eos_token_id
    assert (batch["input_ids"][0, short:] == tok.eos_token_id).all()
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()


# ---------------------------------------------------------------------------------------------
# Placeholder replacement and the loss


def make_batch(tokenizer, frames=(3, 6), dim=16, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    fmt = ChatFormatter(tokenizer)
    examples = []
    for i, n in enumerate(frames):
        enc = fmt.encode(build_messages(PAIRS[: i + 1], SYSTEM), n)
        examples.append({"key": str(i), "input_ids": enc.input_ids, "labels": enc.labels,
                         "audio": rng.standard_normal((n, dim)).astype("float32")})
    return collate(examples, tokenizer.pad_token_id)


def test_placeholders_replaced_by_projected_frames_in_order(lm_dir):
    model, tok = tiny_model(lm_dir)
    batch = make_batch(tok, frames=(3, 6))
    embeds = model.embed(batch["input_ids"], batch["audio"], batch["audio_frames"])
    table = model.lm.get_input_embeddings().weight
    for row, n in enumerate(batch["audio_frames"].tolist()):
        where = (batch["input_ids"][row] == model.audio_token_id).nonzero().flatten()
        assert len(where) == n
        projected = model.projector(batch["audio"][row, :n])
        torch.testing.assert_close(embeds[row, where], projected)
        others = [t for t in range(batch["input_ids"].shape[1]) if t not in set(where.tolist())]
        torch.testing.assert_close(embeds[row, others], table[batch["input_ids"][row, others]])


def test_placeholder_count_must_match_frames(lm_dir):
    model, tok = tiny_model(lm_dir)
    batch = make_batch(tok, frames=(3, 6))
    with pytest.raises(ValueError, match="placeholders"):
        model.embed(batch["input_ids"], batch["audio"], batch["audio_frames"] + torch.tensor([1, 0]))


def test_loss_is_on_assistant_tokens_only(lm_dir):
    model, tok = tiny_model(lm_dir)
    batch = make_batch(tok)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["audio"], batch["audio_frames"])
    logits, _ = model(*inputs)
    _, loss = model(*inputs, batch["labels"])
    # The loss, computed from the output layer at the supervised positions only, equals the mean
    # next-token cross entropy over exactly those positions of the full logits: no prompt position
    # carries a loss term.
    shift_labels = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shift_labels,
                                                  ignore_index=IGNORE_INDEX, reduction="none")
    mask = shift_labels != IGNORE_INDEX
    assert 0 < mask.sum() < mask.numel()
    torch.testing.assert_close(loss, per_token[mask].mean())
    torch.testing.assert_close(loss, model.lm(inputs_embeds=model.embed(*inputs[:1], *inputs[2:]),
                                              attention_mask=inputs[1], labels=batch["labels"]).loss)
    loss.backward()
    assert model.projector.weight.grad.abs().sum() > 0


def test_output_layer_at_supervised_positions_matches_the_families_own_logits(tmp_path):
    """A family whose causal-LM head changes the logits after the output layer (Gemma 2's
    soft-capping) gets the same logits from the supervised-positions path as from its own forward."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    lm = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                        final_logit_softcapping=3.0, attn_implementation="eager")).eval()
    model = LlarkModel(lm, torch.nn.Linear(8, 32), audio_token_id=63, config=LlarkConfig(lm_path="x", encoder_dim=8))
    embeds = torch.randn(2, 5, 32)
    full = lm(inputs_embeds=embeds).logits
    hidden = lm.get_decoder()(inputs_embeds=embeds).last_hidden_state
    assert full.abs().max() <= 3.0
    torch.testing.assert_close(model.output_logits(hidden), full)


def test_micro_batch_losses_over_the_step_token_count_add_up_to_the_per_token_mean(lm_dir):
    import numpy as np

    model, tok = tiny_model(lm_dir)
    fmt = ChatFormatter(tok)
    rng = np.random.default_rng(0)

    def example(key, answer, n):
        enc = fmt.encode(build_messages([("What is the key of this song?", answer)]), n)
        return {"key": key, "input_ids": enc.input_ids, "labels": enc.labels,
                "audio": rng.standard_normal((n, 16)).astype("float32")}

    short = [example("a", "Yes.", 3), example("b", "No.", 4)]
    long = [example("c", " ".join(a for _, a in PAIRS) * 3, 5), example("d", " ".join(q for q, _ in PAIRS) * 2, 2)]
    micro = [collate(short, tok.pad_token_id), collate(long, tok.pad_token_id)]
    assert micro[1]["supervised"] > 8 * micro[0]["supervised"]
    n_tokens = sum(b["supervised"] for b in micro)

    def grads(losses):
        model.zero_grad()
        sum(losses).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    def run(b, **kwargs):
        return model(b["input_ids"], b["attention_mask"], b["audio"], b["audio_frames"], b["labels"], **kwargs)[1]

    big = collate(short + long, tok.pad_token_id)
    expected = grads([run(big)])
    summed = grads([run(b, loss_denominator=n_tokens) for b in micro])
    torch.testing.assert_close(summed, expected, rtol=1e-4, atol=1e-7)
    equal_weights = grads([run(b) / len(micro) for b in micro])
    assert (equal_weights - expected).norm() > 0.1 * expected.norm()
    torch.testing.assert_close(sum(run(b, loss_denominator=n_tokens) for b in micro), run(big))


def test_padding_does_not_change_a_rows_loss(lm_dir):
    model, tok = tiny_model(lm_dir)
    model.eval()
    batch = make_batch(tok, frames=(3, 6))
    single = make_batch(tok, frames=(3,))
    with torch.no_grad():
        logits_b, _ = model(batch["input_ids"], batch["attention_mask"], batch["audio"], batch["audio_frames"])
        logits_s, _ = model(single["input_ids"], single["attention_mask"], single["audio"][:, :3], single["audio_frames"])
    n = single["input_ids"].shape[1]
    torch.testing.assert_close(logits_b[0, :n], logits_s[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Trainable modes


def grads_after_step(model, tok):
    batch = make_batch(tok)
    _, loss = model(batch["input_ids"], batch["attention_mask"], batch["audio"], batch["audio_frames"], batch["labels"])
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_projector_only_mode_with_gradient_checkpointing(lm_dir):
    model, tok = tiny_model(lm_dir)
    configure_training(model, "projector", gradient_checkpointing=True)
    model.train()
    assert model.trainable_counts() == {"projector": 16 * 64 + 64, "lm": 0}
    grads = grads_after_step(model, tok)
    assert grads["projector.weight"] is not None and grads["projector.weight"].abs().sum() > 0
    assert all(g is None for n, g in grads.items() if n.startswith("lm."))


def test_lora_mode_trains_adapters_and_projector(lm_dir):
    pytest.importorskip("peft")
    from llark.model.llark import LoraSettings

    model, tok = tiny_model(lm_dir)
    configure_training(model, "lora", LoraSettings(r=4, alpha=8, dropout=0.0), gradient_checkpointing=True)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "projector.weight" in trainable
    assert trainable - {"projector.weight", "projector.bias"} and all("lora_" in n for n in trainable
                                                                          if not n.startswith("projector."))
    grads = grads_after_step(model, tok)
    assert grads["projector.weight"].abs().sum() > 0
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert all(grads[n] is None for n, p in model.named_parameters() if not p.requires_grad)


def test_full_mode_trains_everything(lm_dir):
    model, tok = tiny_model(lm_dir)
    configure_training(model, "full", gradient_checkpointing=False)
    assert all(p.requires_grad for p in model.parameters())


def test_quantization_says_which_bitsandbytes_it_needs(monkeypatch):
    import types

    with pytest.raises(ModelConfigError, match="'4bit', '8bit'"):
        check_quantization("3bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(ModelConfigError, match=r"needs bitsandbytes>=0\.48: pip install"):
        check_quantization("4bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(__version__="0.43.3"))
    with pytest.raises(ModelConfigError, match="this environment has 0.43.3"):
        check_quantization("8bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(__version__="0.48.0.dev1"))
    check_quantization("4bit")


def test_4bit_language_model_loads_and_trains_lora_adapters_on_cpu(lm_dir):
    """bitsandbytes runs NF4 layers on CPU: the QLoRA path (quantized load, k-bit preparation, adapters) is the
    one a GPU runs."""
    from bitsandbytes.nn import Linear4bit

    model, tok = build_llark(LlarkConfig(lm_path=str(lm_dir), encoder_dim=8), dtype="float32", quantization="4bit",
                             attn_implementation="eager")
    assert isinstance(model.lm.model.layers[0].self_attn.q_proj, Linear4bit)
    with pytest.raises(ModelConfigError, match="only be trained with LoRA"):
        configure_training(model, "full", gradient_checkpointing=False)
    configure_training(model, "lora", LoraSettings(r=4), gradient_checkpointing=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or n.startswith("projector.") for n in trained)


def test_missing_model_directory_says_what_to_provide(tmp_path):
    with pytest.raises(ModelConfigError, match="config.json"):
        build_llark(LlarkConfig(lm_path=str(tmp_path / "nope"), encoder_dim=8))


# ---------------------------------------------------------------------------------------------
# Export and reload


def test_export_and_reload_give_the_same_model(lm_dir, tmp_path):
    model, tok = tiny_model(lm_dir)
    model.config.encoder = {"name": "features", "dim": 16}
    with torch.no_grad():
        model.projector.weight.mul_(3.0)
    export_pretrained(tmp_path / "export", model.lm, tok, model.config, projector_state(model))
    assert (tmp_path / "export" / "model.safetensors").stat().st_size > 10_000
    again, tok2, config = load_pretrained(tmp_path / "export", dtype="float32", attn_implementation="eager")
    assert config.encoder == {"name": "features", "dim": 16} and config.lm_path == "."
    assert len(tok2) == len(tok) and again.audio_token_id == model.audio_token_id
    batch = make_batch(tok)
    model.eval(), again.eval()
    with torch.no_grad():
        a, _ = model(batch["input_ids"], batch["attention_mask"], batch["audio"], batch["audio_frames"])
        b, _ = again(batch["input_ids"], batch["attention_mask"], batch["audio"], batch["audio_frames"])
    torch.testing.assert_close(a, b)
    # Generation from the reloaded model: a prompt ending with the generation prompt.
    fmt = ChatFormatter(tok2)
    prompt = torch.tensor([fmt.encode_prompt(build_messages([("Key?", "x")])[:1], 3)])
    out = again.generate(prompt, torch.zeros(1, 3, 16), torch.tensor([3]), max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and 1 <= out.shape[1] <= 4


def test_projector_shape_mismatch_on_load_is_an_error(lm_dir, tmp_path):
    model, tok = tiny_model(lm_dir)
    export_pretrained(tmp_path / "export", model.lm, tok, model.config, projector_state(model))
    cfg = (tmp_path / "export" / "llark_config.json")
    cfg.write_text(cfg.read_text().replace('"encoder_dim": 16', '"encoder_dim": 32'))
    with pytest.raises(ModelConfigError, match="do not fit"):
        load_pretrained(tmp_path / "export", dtype="float32")
