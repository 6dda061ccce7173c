"""``torch.compile`` for training, the way torchtune does it: each transformer decoder layer of the LM is
compiled on its own (``layer.compile()``), not the whole model.

The layers are where the compute is, and they are what compiles well: one block's graph, reused by
every layer of the same shape (dynamo guards on the module's type and attributes, not on which layer it
is), so the compile time is that of one or two layers whatever the depth. The llark wrapper around the
LM stays eager: the audio splicing (``masked_scatter`` of the projected frames) and the loss at the
supervised positions only (boolean indexing, a data-dependent shape) would each break a whole-model
graph. ``layer.compile()`` leaves the module tree and its parameter names as they are (unlike
``torch.compile(module)``, which wraps it in an ``OptimizedModule`` whose keys start with ``_orig_mod.``),
so checkpoints, LoRA merging and the export see the same model as without it.
"""

from __future__ import annotations

import logging

from torch import nn

from llark.model.llark import ModelConfigError

log = logging.getLogger(__name__)


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a Hugging Face causal LM (``model.layers`` for Llama, Qwen2,
    Qwen3, Gemma 2, Mistral, Phi-3 and most others), also under a PEFT wrapper."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # PEFT: the HF model, adapters injected
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return layers
    # Another name: the longest list of modules of one class (the blocks), wherever it is.
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and len({type(block) for block in m}) == 1]
    if not lists:
        raise ModelConfigError(f"model.compile: found no list of decoder layers in {type(base).__name__} to "
                               "compile; set model.compile: false")
    return max(lists, key=len)


def is_quantized(lm: nn.Module) -> bool:
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def compile_decoder_layers(lm: nn.Module, backend: str = "inductor", **options) -> nn.ModuleList:
    """Compile each decoder layer of ``lm`` in place (``options``: ``torch.compile``'s, e.g. ``mode``);
    the layers returned. Call it after the trainable parts are set (LoRA adapters injected, gradient
    checkpointing on: the checkpoint then wraps the compiled block's forward) and before DeepSpeed
    wraps the model. The first forward and backward of each new input shape compile; later ones reuse."""
    if is_quantized(lm):
        raise ModelConfigError("model.compile: a 4-bit/8-bit (bitsandbytes) language model cannot be compiled; "
                               "set model.compile: false")
    layers = decoder_layers(lm)
    for layer in layers:
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(backend=backend, **options)
    return layers


def is_compiled(layer: nn.Module) -> bool:
    return getattr(layer, "_compiled_call_impl", None) is not None
