"""Reading question/answer pairs out of a chat model's reply.

The prompts ask for a bare JSON list of ``{"question", "answer"}`` objects; replies drift from
that, and this module accepts what can be trusted:

- code fences (```` ```json ... ``` ````), and text before or after the JSON;
- a single object instead of a list, or a list wrapped in an object (``{"pairs": [...]}``);
- other spellings of the two keys (``Question``, ``q``/``a``, ``response``), numbers as answers;
- a reply cut off mid-way (the token limit): the complete objects before the cut are kept.

A reply with no usable pair raises ``UnusableReply``; the caller keeps the raw reply with it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import PipelineError

_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?")
_QUESTION_KEYS = ("question", "q", "query", "instruction", "prompt")
_ANSWER_KEYS = ("answer", "a", "response", "output", "reply")
_WRAPPER_KEYS = ("pairs", "qa_pairs", "qa", "questions", "conversation", "data", "items", "results")
_MAX_STARTS = 64  # bracket positions tried before giving up on a reply
_decoder = json.JSONDecoder()


class UnusableReply(PipelineError):
    """A reply from which no question/answer pair could be read."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class ParsedReply:
    pairs: list[dict[str, str]]
    salvaged: bool = False  # part of the reply was unreadable (cut off or malformed) and left out
    problems: list[str] = field(default_factory=list)


def parse_reply(text: str | None) -> ParsedReply:
    if text is None or not text.strip():
        raise UnusableReply("empty_reply", "the reply is empty")
    body = _without_fences(text)
    problems: list[str] = []
    pos, tried = _next_start(body, 0), 0
    if pos < 0:
        raise UnusableReply("no_json", "the reply holds no JSON list or object")
    while pos >= 0 and tried < _MAX_STARTS:
        tried += 1
        try:
            value, end = _decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            pairs = _salvage(body, pos, problems)
            if pairs:
                return ParsedReply(pairs=pairs, salvaged=True, problems=problems or ["the reply was cut off"])
            pos = _next_start(body, pos + 1)
            continue
        pairs = _pairs_from(value, problems)
        if pairs:
            return ParsedReply(pairs=pairs, salvaged=bool(problems), problems=problems)
        pos = _next_start(body, end)
    detail = "; ".join(problems) if problems else "the JSON is incomplete or malformed"
    raise UnusableReply("no_pairs", f"no question/answer pair could be read ({detail})")


def _next_start(body: str, pos: int) -> int:
    """Where the next JSON list or object may begin, or -1."""
    found = [i for i in (body.find("[", pos), body.find("{", pos)) if i >= 0]
    return min(found) if found else -1


def _without_fences(text: str) -> str:
    """The text inside the first code fence when there is one (an unclosed fence runs to the end)."""
    match = _FENCE.search(text)
    if not match:
        return text
    rest = text[match.end():]
    end = rest.find("```")
    return rest if end < 0 else rest[:end]


def _pairs_from(value: Any, problems: list[str]) -> list[dict[str, str]]:
    if isinstance(value, dict):
        pair = _pair(value)
        if pair is not None:
            return [pair]
        for key in list(value):
            if str(key).lower() in _WRAPPER_KEYS and isinstance(value[key], list):
                return _pairs_from(value[key], problems)
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) == 1:
            return _pairs_from(lists[0], problems)
        problems.append("an object without a question and an answer")
        return []
    if isinstance(value, list):
        pairs = []
        for element in value:
            pair = _pair(element) if isinstance(element, dict) else None
            if pair is None:
                problems.append(f"a list element that is not a question/answer object: {_preview(element)}")
            else:
                pairs.append(pair)
        return pairs
    problems.append(f"a JSON {type(value).__name__} where a list was expected")
    return []


def _pair(obj: dict) -> dict[str, str] | None:
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    question = next((lowered[k] for k in _QUESTION_KEYS if k in lowered), None)
    answer = next((lowered[k] for k in _ANSWER_KEYS if k in lowered), None)
    question, answer = _text(question), _text(answer)
    if question is None or answer is None:
        return None
    return {"question": question, "answer": answer}


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(value)
    return None


def _salvage(body: str, start: int, problems: list[str]) -> list[dict[str, str]]:
    """The complete objects of a list that breaks off (or goes wrong) after them; ``start`` is the
    list's ``[`` or the ``{`` of an object wrapping it."""
    list_start = start if body[start] == "[" else body.find("[", start)
    if list_start < 0:
        return []
    pos, objects = list_start + 1, []
    while True:
        while pos < len(body) and body[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(body) or body[pos] != "{":
            break
        try:
            obj, pos = _decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            problems.append("the reply breaks off inside an object")
            break
        objects.append(obj)
    if not objects:
        return []
    return _pairs_from(objects, problems)


def _preview(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"
