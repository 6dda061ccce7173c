"""Tiny random stand-ins for the chat backbones llark trains: for each family a tokenizer trained here
(byte-level BPE with the family's split pattern, or a SentencePiece-style BPE with byte fallback), its
special tokens, a chat template in that family's format, and a random model of its architecture,
written as a Hugging Face directory. Nothing is downloaded; the templates are written here, after
each family's published format.

What each family does differently, and what the tests expect of it:

============  ===========================  ===========  ===================  ===============
family        architecture                 system role  turn ends with       EOS
============  ===========================  ===========  ===================  ===============
llama3        LlamaForCausalLM             yes          ``<|eot_id|>``       <|end_of_text|>
qwen2         Qwen2ForCausalLM             yes (a default one when none)  ``<|im_end|>``
qwen3         Qwen3ForCausalLM             yes, thinking switch          ``<|im_end|>``
gemma2        Gemma2ForCausalLM (softcap)  no (raises)  ``<end_of_turn>``    <eos>
mistral       MistralForCausalLM           no (raises)  ``</s>``             </s>
phi3          Phi3ForCausalLM (fused qkv)  yes          ``<|end|>``          <|endoftext|>
============  ===========================  ===========  ===================  ===============
"""

from __future__ import annotations

import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fixtures_train import ANSWERS, QUESTIONS

# Llama 3's and Qwen2's pre-tokenizer patterns (Qwen2 splits digits one by one).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% set loop_messages = messages[1:] %}{% else %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen3: the answer after the last user turn carries a (here empty) thinking block; the generation
# prompt writes the empty block only when thinking is switched off.
QWEN3_TEMPLATE = (
    "{% set ns = namespace(last_user=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' and loop.index0 > ns.last_user %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Backbone:
    family: str
    architecture: str  # the transformers config class
    template: str
    bos: str | None
    eos: str
    end_of_turn: str
    system_role: bool
    special: tuple[str, ...]  # special tokens besides bos/eos/unk/pad (in tokenizer.json only, as Llama 3 has them)
    byte_level: str | None = None  # the split pattern of a byte-level BPE; None: SentencePiece-style
    unk: str | None = None
    pad: str | None = None
    added: tuple[str, ...] = ()  # added, not special (Qwen3's <think>)
    config: dict = field(default_factory=dict)


BACKBONES = {
    b.family: b for b in (
        Backbone("llama3", "LlamaConfig", LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", True,
                 ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), byte_level=LLAMA3_SPLIT),
        Backbone("qwen2", "Qwen2Config", QWEN2_TEMPLATE, None, "<|im_end|>", "<|im_end|>", True,
                 ("<|im_start|>",), byte_level=QWEN2_SPLIT, pad="<|endoftext|>", config={"tie_word_embeddings": True}),
        Backbone("qwen3", "Qwen3Config", QWEN3_TEMPLATE, None, "<|im_end|>", "<|im_end|>", True,
                 ("<|im_start|>",), byte_level=QWEN2_SPLIT, pad="<|endoftext|>", added=("<think>", "</think>"),
                 config={"head_dim": 8}),
        Backbone("gemma2", "Gemma2Config", GEMMA_TEMPLATE, "<bos>", "<eos>", "<end_of_turn>", False,
                 ("<start_of_turn>", "<end_of_turn>"), unk="<unk>", pad="<pad>",
                 config={"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 64,
                         "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
        Backbone("mistral", "MistralConfig", MISTRAL_TEMPLATE, "<s>", "</s>", "</s>", False, (), unk="<unk>",
                 config={"sliding_window": None}),
        Backbone("phi3", "Phi3Config", PHI3_TEMPLATE, "<s>", "<|endoftext|>", "<|end|>", True,
                 ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), unk="<unk>",
                 config={"original_max_position_embeddings": 4096}),
    )
}


def _corpus() -> list[str]:
    lines = []
    for i in range(300):
        lines.append(f"{QUESTIONS[i % len(QUESTIONS)]} {ANSWERS[(i * 7) % len(ANSWERS)]}")
        lines.append(f"You are a music assistant. {ANSWERS[i % len(ANSWERS)]} system user assistant model")
        # Turns as templates lay them out, so that the tokenizer learns merges of newlines.
        lines.append(f"user\n\n{QUESTIONS[i % len(QUESTIONS)]}\n\nassistant\n\n{ANSWERS[i % len(ANSWERS)]}\n\n")
    return lines


def train_tokenizer(backbone: Backbone, split: str | None = "family", vocab_size: int = 700):
    """The family's tokenizer, trained on a few hundred music Q/A strings. ``split`` overrides a byte-level
    family's pre-tokenizer pattern (``"gpt2"``: GPT-2's, which splits ``"\\n\\nThe"`` as ``"\\n"``, ``"\\nThe"``)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = [t for t in (backbone.bos, backbone.eos, backbone.unk, backbone.pad) if t]
    special = list(dict.fromkeys(base + list(backbone.special)))
    if backbone.byte_level:
        tok = Tokenizer(models.BPE())
        if split == "gpt2":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(backbone.byte_level), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token=backbone.unk, byte_fallback=True, fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
        special += [f"<0x{b:02X}>" for b in range(256)]
        alphabet = list(string.printable.strip() + "▁")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    if backbone.added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in backbone.added])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=backbone.bos, eos_token=backbone.eos,
                                   unk_token=backbone.unk, pad_token=backbone.pad)
    fast.chat_template = backbone.template
    return fast


def write_backbone(family: str, out_dir: Path, hidden: int = 32, layers: int = 2, seed: int = 0,
                   split: str | None = "family") -> Path:
    """A tiny random model of ``family`` with its tokenizer and template, as a Hugging Face directory."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    backbone = BACKBONES[family]
    tokenizer = train_tokenizer(backbone, split)
    config_class = getattr(transformers, backbone.architecture)
    settings = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=4096, tie_word_embeddings=False,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    settings.update(backbone.config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_class(**settings))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


_WRITTEN: dict[tuple[str, str | None], Path] = {}


def backbone_dir(family: str, split: str | None = "family") -> Path:
    """One directory per family and test session."""
    if (family, split) not in _WRITTEN:
        _WRITTEN[(family, split)] = write_backbone(family, Path(tempfile.mkdtemp(prefix=f"llark-{family}-")),
                                                   split=split)
    return _WRITTEN[(family, split)]
