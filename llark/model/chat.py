"""Chat rendering and assistant-only loss masking, with the language model's own chat template.

One conversation becomes one string (the tokenizer's ``chat_template``, e.g. Llama 2's
``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>``) and that string is
tokenized **once** (``add_special_tokens=False``: the template already holds BOS). The supervised
part of each assistant turn is found as a character span of the rendered string, and a token is
supervised when its character offsets lie inside a span (a token that crosses a span's edge is an
error: the template and the tokenizer would not keep prompt and answer apart). Nothing is re-tokenized per round, so the
labels cannot drift from the input ids (the "tokenization mismatch" that silently zeroes samples
in LLaVA-style trainers).

The span of an assistant turn starts where the template's generation prompt ends (the text the
model sees before it must answer: ``render(turns before it, add_generation_prompt=True)``) and ends
after the turn's end token (Llama 2: ``</s>``; ChatML: ``<|im_end|>``), so the model learns to stop.
What the template adds after that token (ChatML's newline) is not supervised.

The audio enters the first user turn as one added special token (:data:`AUDIO_TOKEN`), followed by
a newline and the question. After tokenization that one id is repeated once per audio frame (the
same ids as tokenizing ``n_frames`` copies, since a special token is matched on its own, but
without rendering and tokenizing hundreds of copies); the model replaces their input embeddings
with the projected encoder frames.

The template's traits (:mod:`llark.model.chat_template`) are read when a formatter is made: a
template without a system role gets the system prompt at the top of the first user turn, and the
end-of-turn token is the one the template writes after an answer, unless one is configured.

Errors, never warnings: a conversation with no supervised token, a template whose rendering of a
shorter conversation is not a prefix of the longer one, a double BOS, a turn whose end token is
missing, message text that holds a special token's string, a template that raises, and a prompt
that tokenizes differently on its own (as inference feeds it) than inside the training text (a
byte-level BPE can merge the generation prompt's last characters with the answer's first).
:meth:`ChatFormatter.check` renders a whole conversation at start, so that a template that cannot
work fails the run before any weight loads, naming the template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from llark.errors import LlarkError
from llark.model.chat_template import TemplateRenderError, inspect_template, render_template

AUDIO_TOKEN = "<|audio|>"
IGNORE_INDEX = -100
RENDER_CACHE_SIZE = 4096  # renderings a formatter keeps (oldest dropped first)


class ChatFormatError(LlarkError, ValueError):
    """A conversation that cannot be turned into a correctly supervised training example."""


@dataclass(frozen=True)
class EncodedChat:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not supervised
    text: str
    spans: list[tuple[int, int]]  # character spans of the supervised text

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def audio_user_content(question: str, audio_token: str = AUDIO_TOKEN) -> str:
    """The first user turn: the audio placeholder, a newline, then the question."""
    return audio_token + "\n" + question.strip()


def build_messages(
    pairs: Sequence[tuple[str, str]], system_prompt: str | None = None, audio_token: str = AUDIO_TOKEN,
) -> list[dict[str, str]]:
    """Chat messages for question/answer rounds about one clip; the audio goes in the first user turn."""
    if not pairs:
        raise ChatFormatError("a conversation needs at least one question/answer pair")
    messages: list[dict[str, str]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt.strip()})
    for i, (question, answer) in enumerate(pairs):
        user = audio_user_content(question, audio_token) if i == 0 else question.strip()
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": answer.strip()})
    return messages


class ChatFormatter:
    """Render messages with the tokenizer's own template and label the assistant tokens.

    ``end_of_turn`` is the token that closes an assistant turn in the template; by default the first
    special token the template writes after an answer (Llama 3: ``<|eot_id|>``; Gemma:
    ``<end_of_turn>``), else the tokenizer's EOS.
    """

    def __init__(self, tokenizer, end_of_turn: str | None = None, audio_token: str = AUDIO_TOKEN):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatFormatError(
                f"tokenizer {type(tokenizer).__name__} has no chat_template: use the chat model's own "
                "tokenizer (e.g. Llama-2-7b-chat-hf), not the base model's"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ChatFormatError("loss masking needs a fast tokenizer (character offsets); load it with use_fast=True")
        self.tokenizer = tokenizer
        # Strings that must not appear in message text: they would tokenize as control tokens.
        # Llama 3's header and turn tokens are special in tokenizer.json only, not in the special-token map.
        special = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()
                                                       if t.special}
        self._reserved = sorted({t for t in special if t} - {audio_token}, key=len, reverse=True)
        self._rendered: dict[tuple, str] = {}
        self._read_template()
        self.end_of_turn = end_of_turn or self.traits.end_of_turn or tokenizer.eos_token
        if not self.end_of_turn:
            raise ChatFormatError("the tokenizer has no EOS token; set end_of_turn to the token that ends a turn")
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(self.end_of_turn)
        self.audio_token = audio_token
        self.audio_token_id = tokenizer.convert_tokens_to_ids(audio_token)
        if self.audio_token_id is None or self.audio_token_id == tokenizer.unk_token_id:
            raise ChatFormatError(f"the audio placeholder {audio_token!r} is not a token of this tokenizer; "
                                  "load the tokenizer with llark.model.load_tokenizer")
        self.bos_id = tokenizer.bos_token_id

    def _read_template(self) -> None:
        self._rendered, self._rendered_with = {}, self.tokenizer.chat_template
        try:
            self.traits = inspect_template(self.tokenizer, self._reserved)
        except TemplateRenderError as exc:
            raise ChatFormatError(f"the chat template of {self.tokenizer.name_or_path or 'this tokenizer'} does not "
                                  f"render a plain user/assistant exchange: {exc}") from None

    @property
    def template(self) -> str:
        """The template, named for messages: its format and where it comes from."""
        return self.traits.describe(self.tokenizer)

    def conversation(self, pairs: Sequence[tuple[str, str]], system_prompt: str | None = None) -> list[dict[str, str]]:
        """The training messages for ``pairs`` (the system prompt folded in where the template has no system role)."""
        return self.traits.fold_system(build_messages(pairs, system_prompt, self.audio_token))

    def prompt(self, question: str, system_prompt: str | None = None) -> list[dict[str, str]]:
        """The messages inference sends for one question about a clip: the training conversation's first turn."""
        messages = [{"role": "system", "content": system_prompt.strip()}] if system_prompt else []
        messages.append({"role": "user", "content": audio_user_content(question, self.audio_token)})
        return self.traits.fold_system(messages)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages``. Renderings are kept, a bounded number: a dataset's
        questions repeat, and every example also renders its prompt (a prefix of the conversation)."""
        if self.tokenizer.chat_template is not self._rendered_with:
            self._read_template()
        try:
            key = (add_generation_prompt, *(tuple(m.items()) for m in messages))
            text = self._rendered.get(key)
        except TypeError:  # unhashable content (e.g. a list of parts): rendered every time
            key, text = None, None
        if text is None:
            try:
                text = render_template(self.tokenizer, messages, add_generation_prompt, **self.traits.render_kwargs)
            except TemplateRenderError as exc:
                raise ChatFormatError(f"{self.template} raised: {exc}") from None
            if key is not None:
                if len(self._rendered) >= RENDER_CACHE_SIZE:
                    del self._rendered[next(iter(self._rendered))]
                self._rendered[key] = text
        return text

    def _check_text(self, messages: list[dict[str, Any]]) -> None:
        for i, m in enumerate(messages):
            content = m["content"]
            if m["role"] != "user" or i > 1:
                if self.audio_token in content:
                    raise ChatFormatError(f"message {i} ({m['role']}) holds the audio placeholder {self.audio_token!r}")
            for token in self._reserved:
                if token in content:
                    raise ChatFormatError(f"message {i} ({m['role']}) holds the special token {token!r} as text")

    def spans(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each assistant turn's supervised text."""
        self._check_text(messages)
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            if not full.startswith(prompt):
                raise ChatFormatError(
                    f"{self.template} is not prefix-stable at message {i}: the prompt for that answer (the turns "
                    "before it and the generation prompt) is not the start of the whole conversation's text, so "
                    "the model would be trained on a context it is never asked in"
                )
            content_at = full.find(message["content"], len(prompt)) if message["content"] else len(prompt)
            if content_at < 0 or any(t in full[len(prompt):content_at] for t in self._reserved):
                raise ChatFormatError(f"assistant message {i} does not follow its generation prompt in the rendered "
                                      "template")
            content_end = content_at + len(message["content"])
            end_at = full.find(self.end_of_turn, content_end)
            if end_at < 0 or any(t in full[content_end:end_at] for t in self._reserved):
                raise ChatFormatError(f"assistant turn {i} is not closed by {self.end_of_turn!r} in the template; "
                                      "set end_of_turn to the token that closes a turn")
            spans.append((len(prompt), end_at + len(self.end_of_turn)))
        return full, spans

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode(self, messages: list[dict[str, Any]], n_frames: int = 1) -> EncodedChat:
        """Token ids and labels (IGNORE_INDEX outside assistant spans) from one tokenization, with the
        audio placeholder repeated ``n_frames`` times."""
        if n_frames < 1:
            raise ChatFormatError(f"an audio clip needs at least one frame, got {n_frames}")
        text, spans = self.spans(messages)
        ids, offsets = self._tokenize(text)
        labels = [IGNORE_INDEX] * len(ids)
        s = 0
        for t, (a, b) in enumerate(offsets):
            while s < len(spans) and spans[s][1] <= a:
                s += 1
            if s == len(spans) or b <= spans[s][0] or b <= a:
                continue
            if a < spans[s][0] or b > spans[s][1]:
                # Part prompt, part answer: the prompt the model sees at inference would end elsewhere.
                raise ChatFormatError(
                    f"token {self.tokenizer.convert_ids_to_tokens(ids[t])!r} (characters {a}-{b}) crosses the "
                    f"boundary of the assistant text at {spans[s]}; the template and tokenizer do not keep turns "
                    "apart")
            labels[t] = ids[t]
        encoded = EncodedChat(input_ids=ids, labels=labels, text=text, spans=spans)
        self._check(encoded)
        self._check_prompts_are_prefixes(encoded)
        return self._expand_audio(encoded, n_frames)

    def _check_prompts_are_prefixes(self, enc: EncodedChat) -> None:
        """Each answer's prompt, tokenized on its own as inference tokenizes it, must be the start of the
        training ids; otherwise the model is trained on one token sequence and asked with another."""
        for turn, (start, _) in enumerate(enc.spans):
            prompt, _ = self._tokenize(enc.text[:start])
            if enc.input_ids[:len(prompt)] == prompt:
                continue
            k = next((i for i, (a, b) in enumerate(zip(prompt, enc.input_ids)) if a != b), min(len(prompt), len(enc.input_ids)))
            lo = max(0, k - 2)
            show = lambda ids: ",".join(repr(t) for t in self.tokenizer.convert_ids_to_tokens(ids))  # noqa: E731
            raise ChatFormatError(
                f"answer {turn}'s prompt tokenizes differently on its own (as inference feeds it) than inside the "
                f"training text: training {show(enc.input_ids[lo:k + 2])}, inference {show(prompt[lo:k + 2])}; "
                f"the tokenizer merges across the end of the generation prompt of {self.template}, so the model "
                "would be trained on one token sequence and asked with another")

    def _expand_audio(self, enc: EncodedChat, n_frames: int) -> EncodedChat:
        where = [t for t, i in enumerate(enc.input_ids) if i == self.audio_token_id]
        if len(where) != 1:
            raise ChatFormatError(f"expected one audio placeholder in the conversation, found {len(where)}")
        t = where[0]
        return EncodedChat(
            input_ids=enc.input_ids[:t] + [self.audio_token_id] * n_frames + enc.input_ids[t + 1:],
            labels=enc.labels[:t] + [IGNORE_INDEX] * n_frames + enc.labels[t + 1:], text=enc.text, spans=enc.spans)

    def check(self, system_prompt: str | None = None, multi_turn: bool = False) -> None:
        """A dry run at start: render, tokenize and label a whole conversation as training will, and the
        prompt as inference will; ChatFormatError naming the template and the problem."""
        pairs = [("What is the key of this song?", "The key is C minor."),
                 ("And its tempo?", "About 120 beats per minute.")]
        try:
            encoded = self.encode(self.conversation(pairs[:1], system_prompt), n_frames=2)
            prompt = self.encode_prompt(self.prompt(pairs[0][0], system_prompt), n_frames=2)
        except ChatFormatError as exc:
            raise ChatFormatError(f"the chat template check failed: {exc}") from None
        if multi_turn:
            try:
                self.encode(self.conversation(pairs, system_prompt), n_frames=2)
            except ChatFormatError as exc:
                raise ChatFormatError(f"multi-turn conversations cannot be trained with this template (data."
                                      f"conversation: pair, one question per example, can): {exc}") from None
        if encoded.input_ids[:len(prompt)] != prompt:
            raise ChatFormatError(f"{self.template}: the prompt inference builds is not the start of the training "
                                  "conversation (the system prompt or the audio turn differ)")

    def encode_prompt(self, messages: list[dict[str, Any]], n_frames: int = 1) -> list[int]:
        """Token ids of a conversation ending with a user turn, ready for generation."""
        self._check_text(messages)
        ids, _ = self._tokenize(self.render(messages, add_generation_prompt=True))
        self._check_bos(ids)
        t = ids.index(self.audio_token_id)
        return ids[:t] + [self.audio_token_id] * n_frames + ids[t + 1:]

    def _check_bos(self, ids: list[int]) -> None:
        if self.bos_id is not None and len(ids) > 1 and ids[0] == self.bos_id and ids[1] == self.bos_id:
            raise ChatFormatError("the token ids start with two BOS tokens")

    def _check(self, enc: EncodedChat) -> None:
        self._check_bos(enc.input_ids)
        if enc.n_supervised == 0:
            raise ChatFormatError("no token is supervised in this conversation (no assistant text after tokenization)")
        # Each span must end on the end-of-turn token, and that token must be supervised.
        ends = 0
        for t in range(len(enc.labels)):
            last = enc.labels[t] != IGNORE_INDEX and (t + 1 == len(enc.labels) or enc.labels[t + 1] == IGNORE_INDEX)
            if last:
                if enc.labels[t] != self.end_of_turn_id:
                    raise ChatFormatError(
                        f"a supervised run ends on token {enc.labels[t]} "
                        f"({self.tokenizer.convert_ids_to_tokens(enc.labels[t])!r}), not on {self.end_of_turn!r}"
                    )
                ends += 1
        if ends != len(enc.spans):
            raise ChatFormatError(f"{len(enc.spans)} assistant turns but {ends} supervised runs")
