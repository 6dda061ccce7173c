"""What a chat template does, found by rendering it: which format it writes, whether it has a system
role, which token closes an assistant turn, and whether it has a thinking switch.

Backbones differ in ways a trainer must not leave to hand configuration:

- Gemma's and Mistral v0.1's templates raise on a system message; the system prompt then goes at
  the top of the first user turn (:meth:`TemplateTraits.fold_system`).
- The token that ends an assistant turn is not always the config's EOS: Llama 3 closes turns with
  ``<|eot_id|>`` (its EOS is ``<|end_of_text|>``), Gemma with ``<end_of_turn>``, Phi-3 with
  ``<|end|>``. It is read from the template: the first special token after an assistant's text.
- Qwen3's template writes an empty ``<think></think>`` block into the generation prompt only when
  ``enable_thinking=False``; a music model answers directly, so that switch is set off for every
  rendering, in training and at inference alike.

The probes below are rendered once per formatter; nothing here depends on a family's name, which is
only reported (``family``) so that an error can say which template it is about.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SYSTEM_PROBE = "System probe text."
ANSWER_PROBE = "Answer probe text."
QUESTION_PROBE = "Question probe text?"

# Markers of the formats in use, for naming a template in messages (the first that matches).
FAMILY_MARKERS = (
    ("<|start_header_id|>", "Llama 3"),
    ("<start_of_turn>", "Gemma"),
    ("<|im_start|>", "ChatML (Qwen, SmolLM2)"),
    ("<|end|>", "Phi-3"),
    ("<<SYS>>", "Llama 2"),
    ("[INST]", "Mistral"),
)


class TemplateRenderError(Exception):
    """The template raised while rendering (its own ``raise_exception``, a jinja error, a bad value)."""


def template_family(template: str | None) -> str:
    for marker, family in FAMILY_MARKERS:
        if template and marker in template:
            return family
    return "custom"


def render_template(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                    **kwargs: Any) -> str:
    """``apply_chat_template`` to text; whatever the template raises becomes a TemplateRenderError."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    except Exception as exc:  # jinja's TemplateError, raise_exception(), or a template's own TypeError
        raise TemplateRenderError(f"{type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class TemplateTraits:
    family: str
    system_role: bool
    end_of_turn: str | None  # None: no special token follows an assistant's text
    render_kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self, tokenizer) -> str:
        source = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        return f"the {self.family} chat template of {source}"

    def fold_system(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``messages`` with a leading system message moved to the top of the first user turn when the
        template has no system role; unchanged otherwise."""
        if self.system_role or not messages or messages[0]["role"] != "system":
            return messages
        system, rest = messages[0]["content"], list(messages[1:])
        if rest and rest[0]["role"] == "user":
            rest[0] = {**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}
        return rest


def inspect_template(tokenizer, reserved: list[str]) -> TemplateTraits:
    """The traits of ``tokenizer.chat_template``; ``reserved`` are the special tokens' strings (the audio
    placeholder left out), longest first. Raises TemplateRenderError when even a plain user/assistant
    exchange does not render."""
    family = template_family(tokenizer.chat_template)
    user = [{"role": "user", "content": QUESTION_PROBE}]
    kwargs: dict[str, Any] = {}
    plain = render_template(tokenizer, user, add_generation_prompt=True)
    try:
        if render_template(tokenizer, user, add_generation_prompt=True, enable_thinking=False) != plain:
            kwargs["enable_thinking"] = False
    except TemplateRenderError:
        pass
    try:
        with_system = render_template(tokenizer, [{"role": "system", "content": SYSTEM_PROBE}, *user],
                                      add_generation_prompt=True, **kwargs)
        system_role = SYSTEM_PROBE in with_system
    except TemplateRenderError:
        system_role = False
    exchange = render_template(tokenizer, [*user, {"role": "assistant", "content": ANSWER_PROBE}], **kwargs)
    after = exchange.find(ANSWER_PROBE)
    end_of_turn = None
    if after >= 0:
        tail = exchange[after + len(ANSWER_PROBE):]
        found = [(tail.find(t), t) for t in reserved if t and tail.find(t) >= 0]
        if found:
            end_of_turn = min(found, key=lambda x: (x[0], -len(x[1])))[1]
    return TemplateTraits(family=family, system_role=system_role, end_of_turn=end_of_turn, render_kwargs=kwargs)
