"""The LLark model: a chat language model plus a connector from audio frames to its embeddings.

Audio enters as precomputed encoder frames ``[frames, encoder_dim]`` (Jukebox layer 36 at 10 Hz in
the paper; the encoder itself is frozen and not part of this model). The connector (the paper's
one linear layer by default; an MLP or a window-level Q-Former, :mod:`llark.model.connectors`)
maps the frames to audio tokens of the language model's hidden size, which replace the input
embeddings of the audio placeholder tokens in the user turn (one placeholder per audio token,
``tokens_for(frames)`` of them; see :mod:`llark.model.chat`). Clips of different lengths share a
batch: ``audio`` is padded to the longest clip and ``audio_frames`` says how many frames of each
row are real. The connector is called ``projector`` throughout (its weights are
``projector.safetensors``).

Builders on two levels: :func:`build_llark` takes a :class:`LlarkConfig`; the named builders fix a
model: :func:`llark_llama2_7b_chat` (the paper: Llama-2-7b-chat, 4800 → 4096 projector) and
:func:`llark_smollm2` (the embedded default, SmolLM2-135M-Instruct). Tests build a tiny random
Llama with :func:`write_tiny_llama`.

An exported model is a Hugging Face directory (``save_pretrained`` with safetensors) plus
``projector.safetensors`` and ``llark_config.json``; :func:`load_pretrained` rebuilds it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llark.errors import LlarkConfigError
from llark.model.chat import AUDIO_TOKEN, IGNORE_INDEX
from llark.model.connectors import (ConnectorConfigError, audio_to, audio_tokens, build_connector, check_connector,
                                    mix_layers)

log = logging.getLogger(__name__)

LLARK_CONFIG = "llark_config.json"
PROJECTOR_FILE = "projector.safetensors"
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelConfigError(LlarkConfigError):
    """A model that cannot be built as asked; the message says what to provide."""


@dataclass
class LlarkConfig:
    """What rebuilds a LLark model; saved as ``llark_config.json`` beside an exported model."""

    lm_path: str
    encoder_dim: int
    audio_token: str = AUDIO_TOKEN
    end_of_turn: str | None = None  # the token closing an assistant turn; None: the tokenizer's EOS
    system_prompt: str | None = None
    # The encoder.json identity the projector was trained on; a list of them (each with its "key", the
    # name the connector knows it by) for a connector of several encoders.
    encoder: dict[str, Any] | list[dict[str, Any]] | None = None
    frame_pool: int = 1  # encoder frames averaged before the connector (see pool_frames)
    connector: dict[str, Any] = field(default_factory=lambda: {"name": "linear"})  # see llark.model.connectors
    audio_states: int | None = None  # hidden states per frame (--layers all), mixed by the connector's layer_mix
    format_version: int = FORMAT_VERSION

    def audio_tokens(self, frames: int) -> int:
        """Placeholders (audio tokens) for ``frames`` pooled frames."""
        return audio_tokens(self.connector, frames)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "LlarkConfig":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format_version") != FORMAT_VERSION:
            raise ModelConfigError(f"{path}: format_version {data.get('format_version')}, this llark reads {FORMAT_VERSION}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelConfigError(f"{path}: unknown fields {unknown}")
        try:
            data["connector"] = check_connector(data.get("connector"))
        except ConnectorConfigError as exc:
            raise ModelConfigError(f"{path}: {exc}") from None
        return cls(**data)


def pool_frames(frames: np.ndarray, pool: int) -> np.ndarray:
    """``[frames, dim]`` (or ``[frames, states, dim]``) averaged over consecutive groups of ``pool``
    frames (the last group may be shorter): ``ceil(frames / pool)`` audio tokens. ``pool`` 1 returns
    the frames unchanged.

    The paper feeds Jukebox frames at 10 Hz (250 tokens for 25 s); a small CPU model learns from far
    fewer audio tokens per example, and every token of the sequence costs compute.
    """
    if pool < 1:
        raise ModelConfigError(f"frame_pool must be >= 1, got {pool}")
    if pool == 1:
        return frames
    n, rest = frames.shape[0], frames.shape[1:]
    full = n // pool * pool
    pooled = frames[:full].astype(np.float32).reshape(-1, pool, *rest).mean(axis=1)
    if full < n:
        pooled = np.concatenate([pooled, frames[full:].astype(np.float32).mean(axis=0, keepdims=True)])
    return pooled.astype(frames.dtype)


class LlarkModel(nn.Module):
    """``lm`` (a Hugging Face causal LM, possibly PEFT-wrapped) and ``projector`` (encoder_dim → hidden)."""

    def __init__(self, lm: nn.Module, projector: nn.Linear, audio_token_id: int, config: LlarkConfig):
        super().__init__()
        self.lm = lm
        self.projector = projector
        self.audio_token_id = int(audio_token_id)
        self.config = config

    def embed(self, input_ids: torch.Tensor, audio: torch.Tensor, audio_frames: torch.Tensor) -> torch.Tensor:
        """Token embeddings with each row's placeholders replaced, in order, by its audio tokens."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        placeholders = input_ids == self.audio_token_id
        # The connector runs for every batch, even one without audio, so that every rank issues the
        # same collectives under ZeRO-3.
        dtype = next(self.projector.parameters()).dtype
        tokens = self.projector(mix_layers(self.projector, audio_to(audio, dtype)), audio_frames)
        wanted = self.projector.token_counts(audio_frames)
        real = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < wanted[:, None].to(tokens.device)
        counts = placeholders.sum(dim=1)
        if not torch.equal(counts.to(wanted.device), wanted):
            raise ValueError(f"audio placeholders per row {counts.tolist()} != audio tokens {wanted.tolist()}")
        return embeds.masked_scatter(placeholders.unsqueeze(-1), tokens[real].to(embeds.dtype))

    def forward(self, input_ids, attention_mask, audio, audio_frames, labels=None, loss_denominator=None):
        """Without labels ``(logits, None)``: the logits at every position. With labels ``(None, loss)``.

        The loss is the next-token cross entropy summed over the supervised labels and divided by
        ``loss_denominator`` (None: their count, i.e. the mean over this batch's supervised tokens).
        Training passes the supervised-token count of the whole optimizer step, so that micro-batches
        add up to the per-token mean of the global batch. The output layer runs only at the
        positions that predict a supervised label: a chat sample supervises its answer, a few tokens
        of its length, and the ``[batch, length, vocab]`` logits are the largest tensor of the step.
        """
        embeds = self.embed(input_ids, audio, audio_frames)
        if labels is None:
            return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits, None
        hidden = self.lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        supervised = targets != IGNORE_INDEX
        logits = self.output_logits(hidden[supervised]).float()
        loss = F.cross_entropy(logits, targets[supervised], reduction="sum")
        return None, loss / (supervised.sum().clamp(min=1) if loss_denominator is None else loss_denominator)

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The language model's output layer on final hidden states, with the logit soft-capping
        that some families (Gemma 2 and 3) apply after it."""
        logits = self.lm.get_output_embeddings()(hidden)
        cap = getattr(self.lm.config.get_text_config(), "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    @torch.no_grad()
    def generate(self, input_ids, audio, audio_frames, attention_mask=None, **kwargs) -> torch.Tensor:
        """New token ids after the prompt (left-pad prompts of different lengths)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.lm.generate(
            inputs_embeds=self.embed(input_ids, audio, audio_frames), attention_mask=attention_mask, **kwargs
        )

    def trainable_counts(self) -> dict[str, int]:
        # Under ZeRO-3 a partitioned parameter's numel() is 0; ds_numel is its full size.
        count = lambda ps: sum(getattr(p, "ds_numel", p.numel()) for p in ps if p.requires_grad)  # noqa: E731
        return {"projector": count(self.projector.parameters()), "lm": count(self.lm.parameters())}


# ---------------------------------------------------------------------------------------------
# Loading the parts


VOCAB_MULTIPLE = 64


def load_tokenizer(path: str | os.PathLike, audio_token: str = AUDIO_TOKEN):
    """The model's own fast tokenizer, with the audio placeholder added and a pad token that is not EOS.

    Llama 2 has no pad token; padding with EOS would let a mask built from ``ids == pad`` hide the
    final EOS. Labels here are built from spans and padding from lengths, but the tokenizer is also
    used for generation, so pad is set to ``unk`` (LLaVA's choice) or a new ``<|pad|>`` token.
    """
    from transformers import AutoTokenizer

    if not any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ModelConfigError(f"{path} has no tokenizer (tokenizer.json, tokenizer_config.json): copy the chat "
                               "model's own tokenizer files beside its config.json")
    tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    if audio_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [audio_token]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


BITSANDBYTES_MIN = (0, 48)  # the first release whose 4-bit and 8-bit layers also run on CPU


def check_quantization(quantization: str | None) -> None:
    """4-bit/8-bit loading needs bitsandbytes; say so before any weight is read.

    bitsandbytes >= 0.48 runs its 4-bit (NF4) and 8-bit layers on CPU too, slowly: QLoRA is meant for
    one GPU, and CPU runs it only to check a configuration (and in the tests).
    """
    if quantization is None:
        return
    if quantization not in ("4bit", "8bit"):
        raise ModelConfigError(f"quantization must be '4bit', '8bit' or null, got {quantization!r}")
    needed = ".".join(map(str, BITSANDBYTES_MIN))
    if not torch.cuda.is_available():
        # On CPU it announces at import that an optional faster kernel package is absent.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise ModelConfigError(
            f"quantization={quantization!r} (QLoRA) needs bitsandbytes>={needed}: pip install 'llark[gpu]'"
        ) from None
    version = tuple(int(x) for x in re.findall(r"\d+", bitsandbytes.__version__)[:2])
    if version < BITSANDBYTES_MIN:
        raise ModelConfigError(f"quantization={quantization!r} needs bitsandbytes>={needed}, this environment has "
                               f"{bitsandbytes.__version__}: pip install -U 'bitsandbytes>={needed}'")
    if not torch.cuda.is_available():
        log.warning("quantization=%s on CPU: bitsandbytes runs it, slowly; QLoRA is meant for one GPU", quantization)


def load_language_model(
    path: str | os.PathLike, dtype: str = "bfloat16", quantization: str | None = None,
    attn_implementation: str | None = "sdpa",
):
    """A causal LM from a local Hugging Face directory (nothing is downloaded)."""
    from transformers import AutoModelForCausalLM

    path = check_model_dir(path)
    check_quantization(quantization)
    if dtype not in DTYPES:
        raise ModelConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=DTYPES[dtype], bnb_4bit_quant_storage=DTYPES[dtype])
            if quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True)
        )
        # The quantized weights are made on the device they load to: this rank's GPU, or the CPU.
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        kwargs["device_map"] = {"": device}
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except ValueError as exc:
        # Some architectures (Gemma 2's soft-capped attention) have no SDPA kernel in transformers.
        if kwargs.get("attn_implementation") != "sdpa" or "does not support an attention implementation" not in str(exc):
            raise
        log.info("%s: no SDPA attention for this architecture, using eager attention", path)
        kwargs["attn_implementation"] = "eager"
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def check_model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelConfigError(
            f"{path} is not a Hugging Face model directory (no config.json). Point model.lm_path at a local "
            "copy, e.g. Llama-2-7b-chat-hf downloaded once with `huggingface-cli download "
            "meta-llama/Llama-2-7b-chat-hf --local-dir DIR`, or use 'smollm2' for the embedded default."
        )
    return path


def resolve_lm_path(lm_path: str) -> Path:
    """``smollm2`` names the embedded default (converted once into the cache); anything else is a path."""
    if lm_path == "smollm2":
        from llark.model.smollm2 import smollm2_dir

        return smollm2_dir()
    return Path(lm_path)


def build_llark(
    config: LlarkConfig, dtype: str = "bfloat16", quantization: str | None = None,
    attn_implementation: str | None = "sdpa", projector_state: dict[str, torch.Tensor] | None = None,
):
    """Tokenizer and model from a config: the LM from ``config.lm_path``, a new (or given) projector."""
    path = resolve_lm_path(config.lm_path)
    check_model_dir(path)
    tokenizer = load_tokenizer(path, config.audio_token)
    lm = load_language_model(path, dtype, quantization, attn_implementation)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        # A multiple of 64 keeps the embedding and output matrices on the GPU's fast tile sizes.
        lm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=VOCAB_MULTIPLE)
    hidden = lm.get_input_embeddings().embedding_dim
    try:
        projector = build_connector(config.connector, config.encoder_dim, hidden, dtype=DTYPES[dtype],
                                    device=lm.get_input_embeddings().weight.device, states=config.audio_states)
    except (ConnectorConfigError, ValueError) as exc:
        raise ModelConfigError(str(exc)) from None
    if projector_state is not None:
        load_projector_state(projector, projector_state)
    model = LlarkModel(lm, projector, tokenizer.convert_tokens_to_ids(config.audio_token), config)
    return model, tokenizer


def llark_llama2_7b_chat(lm_path: str, **kwargs):
    """The paper's model: Llama-2-7b-chat and a 4800 → 4096 projector (Jukebox-5B layer 36 frames)."""
    model, tokenizer = build_llark(LlarkConfig(lm_path=lm_path, encoder_dim=4800), **kwargs)
    if model.projector.out_features != 4096:
        raise ModelConfigError(f"{lm_path} has hidden size {model.projector.out_features}, Llama-2-7b has 4096")
    return model, tokenizer


def llark_smollm2(encoder_dim: int = 128, **kwargs):
    """The embedded default: SmolLM2-135M-Instruct (hidden 576) and a projector from ``encoder_dim``
    (128: the weight-free ``features`` encoder)."""
    return build_llark(LlarkConfig(lm_path="smollm2", encoder_dim=encoder_dim), **kwargs)


def write_tiny_llama(out_dir: str | os.PathLike, tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4,
                     seed: int = 0) -> Path:
    """A small random Llama (same architecture as Llama 2) with ``tokenizer``, as a model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    out_dir = Path(out_dir)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def standardise_projector(projector: nn.Module, mean: np.ndarray, std: np.ndarray, token_std: float,
                          seed: int = 0) -> None:
    """Initialise the connector so that frames with the given per-dimension ``mean`` and ``std`` come
    out as audio tokens centred, with the spread ``token_std`` of the LM's own token embeddings.

    PyTorch's default init ignores the frames' scale: unnormalised encoder outputs (Jukebox
    activations, log-mel energies) then land orders of magnitude away from the token embeddings,
    and the frozen LM reads every clip as the same out-of-range input, which a projector-only stage
    is slow to undo. Each connector's ``initialise`` standardises the frames at its input layer
    (a random projection of the standardised frames) and scales its output layer to ``token_std``.
    """
    try:
        projector.initialise(mean, std, token_std, seed)
    except ValueError as exc:
        raise ModelConfigError(str(exc)) from None


def token_embedding_std(lm: nn.Module) -> float:
    return float(lm.get_input_embeddings().weight.detach().float().std())


# ---------------------------------------------------------------------------------------------
# Trainable parts


@dataclass
class LoraSettings:
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: list(LORA_TARGETS))  # or "all-linear"


def enable_checkpointing(lm: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def lora_targets(lm: nn.Module, names: list[str] | str) -> list[str] | str:
    """``names`` checked against ``lm``'s linear layers: each must name one (Phi-3 fuses q/k/v into
    ``qkv_proj`` and gate/up into ``gate_up_proj``); ``"all-linear"`` is every linear layer but the output."""
    if names == "all-linear":
        return names
    output = lm.get_output_embeddings()
    present = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear) and m is not output})
    missing = [n for n in names if n not in present]
    if missing:
        raise ModelConfigError(f"model.lora.target_modules: {missing} are not linear layers of {type(lm).__name__}; "
                               f"it has {present} (or use 'all-linear')")
    return list(names)


def configure_training(model: LlarkModel, mode: str, lora: LoraSettings | None = None,
                       gradient_checkpointing: bool = True) -> None:
    """``full``: projector and LM; ``projector``: the LM frozen; ``lora``: projector and LoRA adapters."""
    if mode not in ("full", "projector", "lora"):
        raise ModelConfigError(f"train mode must be full, projector or lora, got {mode!r}")
    quantized = getattr(model.lm, "is_loaded_in_4bit", False) or getattr(model.lm, "is_loaded_in_8bit", False)
    if quantized and mode != "lora":
        raise ModelConfigError("a 4-bit/8-bit language model can only be trained with LoRA (mode: lora)")
    if gradient_checkpointing:
        # Non-reentrant checkpointing keeps gradients flowing to the projector when the LM is frozen.
        enable_checkpointing(model.lm)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        lora = lora or LoraSettings()
        targets = lora_targets(model.lm, lora.target_modules)
        if quantized:
            model.lm = prepare_model_for_kbit_training(model.lm, use_gradient_checkpointing=False)
        model.lm = get_peft_model(model.lm, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
            task_type="CAUSAL_LM", bias="none"))
    else:
        for p in model.lm.parameters():
            p.requires_grad_(mode == "full")
    for p in model.projector.parameters():
        p.requires_grad_(True)
    if mode != "full" and gradient_checkpointing:
        model.lm.enable_input_require_grads()


# ---------------------------------------------------------------------------------------------
# Saving and loading


def projector_state(model: LlarkModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.projector.state_dict().items()}


def load_projector_state(projector: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        raise ModelConfigError(f"connector weights {found} do not fit the connector {expected}")
    dtype = next(projector.parameters()).dtype
    projector.load_state_dict({k: v.to(dtype) for k, v in state.items()})


def save_projector(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def read_projector(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def export_pretrained(
    out_dir: str | os.PathLike, lm: nn.Module, tokenizer, config: LlarkConfig,
    projector: dict[str, torch.Tensor], lm_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a loadable model directory: the LM (safetensors), tokenizer, projector and llark_config.json.

    ``lm`` is a plain HF model (merge LoRA adapters first); ``lm_state`` overrides its own state dict
    (ZeRO-3 gathers the full weights into one).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out_dir, state_dict=lm_state, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    save_projector(projector, out_dir / PROJECTOR_FILE)
    exported = LlarkConfig(**{**asdict(config), "lm_path": "."})
    (out_dir / LLARK_CONFIG).write_text(exported.to_json(), encoding="utf-8")
    return out_dir


def merge_adapters_into_full_precision(peft_lm: nn.Module, lm_path: str | os.PathLike, dtype: str) -> nn.Module:
    """A plain LM: the base weights read again from ``lm_path`` unquantized, with ``peft_lm``'s LoRA adapters
    merged in.

    Merging into 4-bit or 8-bit weights would round the adapters' update away and leave a model that only
    loads with bitsandbytes; QLoRA trains against the quantized base, but the model it exports is the
    full-precision base plus that update. The token embeddings and the output layer (never quantized,
    resized for the audio and pad tokens) are copied from the trained model.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapters = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(peft_lm).items()}
    trained = peft_lm.get_base_model()
    base = load_language_model(lm_path, dtype, quantization=None)
    base.resize_token_embeddings(trained.get_input_embeddings().num_embeddings, mean_resizing=False)
    with torch.no_grad():
        for mine, theirs in ((base.get_input_embeddings(), trained.get_input_embeddings()),
                             (base.get_output_embeddings(), trained.get_output_embeddings())):
            mine.weight.copy_(theirs.weight.to(mine.weight.dtype).cpu())
    lora_config = peft_lm.peft_config["default"]
    merged = get_peft_model(base, lora_config)
    outcome = set_peft_model_state_dict(merged, adapters)
    missing = [k for k in outcome.missing_keys if "lora_" in k]
    if missing or outcome.unexpected_keys:
        raise ModelConfigError(f"the LoRA adapters do not fit the base model at {lm_path}: missing {missing[:3]}, "
                               f"unexpected {list(outcome.unexpected_keys)[:3]}")
    return merged.merge_and_unload()


def load_pretrained(path: str | os.PathLike, dtype: str = "bfloat16", attn_implementation: str | None = "sdpa",
                    quantization: str | None = None):
    """``(model, tokenizer, config)`` from a directory written by :func:`export_pretrained`; ``quantization``
    loads its LM in 4 or 8 bits (QLoRA on top of an exported model)."""
    path = Path(path)
    for name in (LLARK_CONFIG, PROJECTOR_FILE, "config.json"):
        if not (path / name).is_file():
            raise ModelConfigError(f"{path} is not an exported LLark model: {name} is missing")
    config = LlarkConfig.from_file(path / LLARK_CONFIG)
    model, tokenizer = build_llark(
        LlarkConfig(**{**asdict(config), "lm_path": str(path)}), dtype=dtype, quantization=quantization,
        attn_implementation=attn_implementation, projector_state=read_projector(path / PROJECTOR_FILE))
    model.config = config
    return model, tokenizer, config
