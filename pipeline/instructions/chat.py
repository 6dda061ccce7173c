"""Chat completions through the official ``openai`` client (>= 1), with our own retry policy.

The client's built-in retries are switched off (``max_retries=0``) so that every attempt is
visible here: counted, logged, charged against the cost cap when it may have been billed, and
spaced by one policy:

- 429, 408, 409 and 5xx answers, timeouts and connection errors are retried, up to
  ``max_attempts`` attempts in all;
- the wait honours the server's ``Retry-After`` / ``retry-after-ms`` header (capped at
  ``max_retry_after_s``), otherwise it is exponential with jitter, and a ``Retry-After`` pauses
  every request of the run, not only the one that got it;
- 401/403 (the key is refused) and 404 (wrong model or base URL) stop the whole run
  (``RequestsRefused``): every other request would fail the same way;
- other 4xx answers fail the one item.

The API key is read from an environment variable and handed to the client only; every message
that leaves this module goes through a ``Redactor`` that removes it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Awaitable, Callable

from pipeline.runner import ItemError, StageConfigError

log = logging.getLogger("llark")
OPENAI_BASE_URL = "https://api.openai.com/v1"
_RETRY_STATUS = {408, 409, 429}
_FATAL_STATUS = {401, 403, 404}


class RequestsRefused(StageConfigError):
    """An answer that every other request would also get (a refused key, an unknown model)."""


class Redactor:
    """Removes secrets (the API key, bearer tokens, OpenAI-style keys even when masked) from text."""

    _PATTERNS = (
        re.compile(r"\bsk-[A-Za-z0-9_\-*.]{3,}"),
        re.compile(r"(?i)(bearer\s+)[A-Za-z0-9_\-.~+/=*]{4,}"),
    )

    def __init__(self, secrets: list[str] | tuple[str, ...] = ()):
        self.secrets = tuple(sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        """For messages (errors, logs): the secrets and anything shaped like a key."""
        if not isinstance(text, str):
            return text
        text = self.secrets_only(text)
        text = self._PATTERNS[0].sub("[redacted]", text)
        return self._PATTERNS[1].sub(r"\1[redacted]", text)

    def secrets_only(self, text: str) -> str:
        """For model replies, which are data: only the secrets themselves, nothing else touched."""
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text


class RedactingLogFilter(logging.Filter):
    """Installed on the log handlers while the stage runs: no log line can carry the key."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.redactor(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.redactor(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


@dataclass(frozen=True)
class ClientSettings:
    base_url: str = OPENAI_BASE_URL
    timeout_s: float = 120.0
    max_attempts: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_retry_after_s: float = 300.0
    concurrency: int = 16


# The HTTP connection pool checks every open connection each time it hands one out, so its cost
# per request grows with the number of connections; past this many requests in flight the
# requests are spread over several clients, each with its own pool.
CONNECTIONS_PER_CLIENT = 16


@dataclass
class ChatReply:
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass
class ClientStats:
    requests: int = 0  # attempts sent
    answered: int = 0
    retries: Counter = field(default_factory=Counter)


class ChatClient:
    def __init__(self, settings: ClientSettings, api_key: str, redactor: Redactor):
        import openai
        from openai import AsyncOpenAI

        self._openai = openai
        self.settings = settings
        self.redactor = redactor
        self.stats = ClientStats()
        self._resume_at = 0.0
        shards = max(1, -(-settings.concurrency // CONNECTIONS_PER_CLIENT))
        self._clients = [AsyncOpenAI(api_key=api_key, base_url=settings.base_url, max_retries=0, timeout=settings.timeout_s)
                         for _ in range(shards)]
        self._next = 0

    async def complete(
        self, body: dict, before_retry: Callable[[str], Awaitable[None] | None] | None = None
    ) -> ChatReply:
        """Send one chat completion request (``body``: model, messages, ...); retry as above.

        ``before_retry(kind)`` is called before each new attempt with the kind of the failure
        that caused it (``rate_limited``, ``server_error``, ``timeout``, ``connection``); it may
        raise to give up (the cost cap does).
        """
        openai = self._openai
        client = self._clients[self._next]
        self._next = (self._next + 1) % len(self._clients)
        attempt = 0
        while True:
            attempt += 1
            await self._wait_for_resume()
            self.stats.requests += 1
            try:
                # The client's generic POST: same transport, auth, timeouts and error classes as
                # chat.completions.create, without its per-request type transformation of the
                # body and model construction of the reply (a third of the CPU per request).
                response = await client.post("/chat/completions", body=body, cast_to=object)
            except openai.APITimeoutError:
                kind, delay, detail = "timeout", None, f"no answer within {self.settings.timeout_s:g} s"
            except openai.APIConnectionError as exc:
                kind, delay, detail = "connection", None, self.redactor(str(exc))
            except openai.APIStatusError as exc:
                status = exc.status_code
                detail = self.redactor(f"HTTP {status}: {_message(exc)}")
                if status in _FATAL_STATUS:
                    what = "the API key was refused" if status in (401, 403) else "the model or the URL was not found"
                    raise RequestsRefused(f"{what} by {self.settings.base_url} ({detail}); stopping the run") from None
                if status not in _RETRY_STATUS and status < 500:
                    raise ItemError("api_rejected_request", detail) from None
                kind = "rate_limited" if status == 429 else "server_error"
                delay = _retry_after(exc)
                if delay is not None:
                    delay = min(delay, self.settings.max_retry_after_s)
                    self._resume_at = max(self._resume_at, time.monotonic() + delay)
            else:
                self.stats.answered += 1
                return _reply(response)
            if attempt >= self.settings.max_attempts:
                raise ItemError(f"api_{kind}", f"gave up after {attempt} attempts; last: {detail}")
            self.stats.retries[kind] += 1
            if delay is None:
                delay = random.uniform(0.5, 1.0) * min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** (attempt - 1))
                log.debug("attempt %d failed (%s: %s); retrying in %.2f s", attempt, kind, detail, delay)
                await asyncio.sleep(delay)
            else:
                log.debug("attempt %d failed (%s); the server asked to wait %.2f s", attempt, detail, delay)
            if before_retry is not None:
                waited = before_retry(kind)
                if asyncio.iscoroutine(waited):
                    await waited

    async def _wait_for_resume(self) -> None:
        wait = self._resume_at - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.close()


def _reply(response: dict) -> ChatReply:
    if not isinstance(response, dict):
        raise ItemError("api_bad_reply", f"the server's reply is not a JSON object: {str(response)[:200]}")
    choices = response.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    usage = response.get("usage") if isinstance(response.get("usage"), dict) else {}
    return ChatReply(
        text=(choice.get("message") or {}).get("content") or "",
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
    )


def _message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:500]
    return str(getattr(exc, "message", exc))[:500]


def _retry_after(exc) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), else None."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    try:
        if headers.get("retry-after-ms") is not None:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
