"""The LLark model: language model + linear audio projector (llark.py), chat rendering and loss masking
(chat.py), the embedded default LM (smollm2.py) and the memory planner (memory.py)."""

from llark.model.chat import AUDIO_TOKEN, IGNORE_INDEX, ChatFormatError, ChatFormatter, build_messages
from llark.model.llark import (
    LlarkConfig, LlarkModel, ModelConfigError, build_llark, configure_training, export_pretrained,
    llark_llama2_7b_chat, llark_smollm2, load_language_model, load_pretrained, load_tokenizer,
)

__all__ = [
    "AUDIO_TOKEN", "IGNORE_INDEX", "ChatFormatError", "ChatFormatter", "build_messages", "LlarkConfig",
    "LlarkModel", "ModelConfigError", "build_llark", "configure_training", "export_pretrained",
    "llark_llama2_7b_chat", "llark_smollm2", "load_language_model", "load_pretrained", "load_tokenizer",
]
