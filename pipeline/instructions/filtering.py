"""Dropping question/answer pairs that break the rules the prompts set (the paper's §G.1.3).

Every pair is checked in this order; the first rule it breaks is its reason:

``empty``             the question or the answer is empty
``field_name``        the question or answer names a key of the JSON the writer was given
                      (``tempo_in_beats_per_minute_madmom``, ``genre_top``, anything with ``madmom``)
``mentions_metadata`` it refers to "metadata", "JSON" or "the provided/given data" (the writer must
                      speak as a listener)
``question_phrase``   the question contains a phrase of ``prompts/filters/question_phrases.txt``
``answer_phrase``     the answer contains a phrase of ``prompts/filters/answer_phrases.txt``
``duplicate``         the same question (ignoring case, spacing and punctuation) was kept before

Phrases match case-insensitively on whole words, with curly quotes read as straight ones. A
dropped pair is returned with its reason and the matching text (``detail``), never discarded.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable

REASONS = ("empty", "field_name", "mentions_metadata", "question_phrase", "answer_phrase", "duplicate")

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " "})
_METADATA = re.compile(
    r"(?<!\w)(meta[\s-]?data|json"
    r"|(?:the|this)\s+(?:provided|given|supplied)\s+(?:data|description|details|annotations?|information|fields?|tags|features|caption)"
    r")(?!\w)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class FilterSettings:
    question_phrases: tuple[str, ...]
    answer_phrases: tuple[str, ...]


_SPACES = re.compile(r"\s+")
_NOT_WORD = re.compile(r"[^\w]+")


def normalise(text: str) -> str:
    return _SPACES.sub(" ", text.translate(_QUOTES)).strip().lower()


@functools.lru_cache(maxsize=16)
def _phrase_pattern(phrases: tuple[str, ...]) -> re.Pattern | None:
    if not phrases:
        return None
    alternatives = sorted({normalise(p) for p in phrases if p.strip()}, key=len, reverse=True)
    body = "|".join(r"\s+".join(re.escape(w) for w in p.split(" ")) for p in alternatives)
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)")


@functools.lru_cache(maxsize=256)
def _names_pattern(names: frozenset[str]) -> re.Pattern:
    words = sorted({n.lower() for n in names if len(n) >= 3} | {"madmom"}, key=len, reverse=True)
    return re.compile(r"(?<![\w.])(?:" + "|".join(re.escape(w) for w in words) + r")(?![\w])", re.IGNORECASE)


def _question_key(question: str) -> str:
    return _NOT_WORD.sub(" ", normalise(question)).strip()


def filter_pairs(
    pairs: list[dict[str, str]], settings: FilterSettings, field_names: Iterable[str] = ()
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Split ``pairs`` into (kept, rejected); a rejected pair gains ``reason`` and ``detail``."""
    questions_re = _phrase_pattern(settings.question_phrases)
    answers_re = _phrase_pattern(settings.answer_phrases)
    names_re = _names_pattern(frozenset(field_names))
    kept, rejected, seen = [], [], set()
    for pair in pairs:
        question, answer = pair.get("question", ""), pair.get("answer", "")
        q, a = normalise(question), normalise(answer)
        reason, detail = None, ""
        if not q or not a:
            reason = "empty"
        elif m := names_re.search(q) or names_re.search(a):
            reason, detail = "field_name", m.group(0)
        elif m := _METADATA.search(q) or _METADATA.search(a):
            reason, detail = "mentions_metadata", m.group(0)
        elif questions_re is not None and (m := questions_re.search(q)):
            reason, detail = "question_phrase", m.group(0)
        elif answers_re is not None and (m := answers_re.search(a)):
            reason, detail = "answer_phrase", m.group(0)
        elif _question_key(question) in seen:
            reason = "duplicate"
        if reason is None:
            seen.add(_question_key(question))
            kept.append({"question": question.strip(), "answer": answer.strip()})
        else:
            rejected.append({"question": question, "answer": answer, "reason": reason, "detail": detail})
    return kept, rejected
