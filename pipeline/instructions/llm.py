"""The language-model writers' runtime: building requests, the reply cache, the cost cap, the API.

A request is the system prompt of the clip's (dataset, family) and one user message holding the
clip's JSON, nothing else: text from the datasets can only ever be the content of that JSON, so
an instruction hidden in a track description cannot change what is asked (the system prompt
also says the JSON is data). Before a request is sent its reply is looked up in the cache; when
one is sent, the worst case of its cost is reserved against ``--max-cost`` first, and the reply
is appended to the cache as soon as it arrives, before it is parsed.

``mode`` is ``openai`` (send requests now, with bounded concurrency) or ``openai-batch`` (never
send: replies come from batches collected into the cache beforehand; an item without one is
deferred, or fails with its batch error).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

from pipeline.instructions.async_executor import Deferred
from pipeline.instructions.cache import CachedReply, CacheKey, ReplyCache
from pipeline.instructions.chat import ChatClient, Redactor
from pipeline.instructions.costs import RESERVE_FACTOR, BudgetExhausted, CostBudget, PriceTable, estimate_prompt_tokens, estimate_tokens
from pipeline.instructions.parsing import UnusableReply, parse_reply
from pipeline.instructions.prompts import PromptSet
from pipeline.instructions.stage import WriterSettings
from pipeline.runner import ItemError


@dataclass(frozen=True)
class PreparedRequest:
    item_id: str
    clip_id: str
    task_family: str
    model: str
    prompt_version: str
    body: dict
    estimated_input_tokens: int
    max_output_tokens: int
    sha256: str

    @property
    def key(self) -> CacheKey:
        return CacheKey(self.clip_id, self.task_family, self.model, self.prompt_version)


def build_request(row: dict, settings: WriterSettings, system_prompt: str, prompt_version: str) -> PreparedRequest:
    family = row["task_family"]
    model = settings.models[family]
    user = json.dumps(row["metadata"], ensure_ascii=False)
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]
    body: dict = {"model": model, "messages": messages, "max_tokens": settings.max_output_tokens[family]}
    if settings.temperature is not None:
        body["temperature"] = settings.temperature
    # The prompt version stands for the system prompt's text (it is a digest of it).
    fingerprint = json.dumps([model, prompt_version, body["max_tokens"], settings.temperature])
    digest = hashlib.sha256(f"{fingerprint}\n{user}".encode("utf-8")).hexdigest()
    return PreparedRequest(
        item_id=row["id"], clip_id=row["clip_id"], task_family=family, model=model, prompt_version=prompt_version,
        body=body, estimated_input_tokens=estimate_prompt_tokens(messages),
        max_output_tokens=settings.max_output_tokens[family], sha256=digest,
    )


@dataclass
class RuntimeStats:
    cache_hits: int = 0
    sent: int = 0
    answered: int = 0
    stale_cache_hits: int = 0  # cached reply for the same key, made from a different request
    cost_usd: float = 0.0


@dataclass
class LLMRuntime:
    settings: WriterSettings
    prompt_set: PromptSet
    cache: ReplyCache
    prices: PriceTable
    budget: CostBudget
    mode: str  # "openai" or "openai-batch"
    redactor: Redactor
    client_factory: Callable[[], ChatClient] | None = None
    reask_unusable: bool = False
    batch_failures: dict[str, str] = field(default_factory=dict)  # item id -> why its batch request failed
    stats: RuntimeStats = field(default_factory=RuntimeStats)
    _client: ChatClient | None = None
    _prompts: dict = field(default_factory=dict)

    def request_for(self, row: dict) -> PreparedRequest:
        dataset, family = row["dataset"], row["task_family"]
        if not self.prompt_set.has_prompt(dataset, family):
            raise ItemError("no_prompt", f"there is no {family} prompt for dataset {dataset!r} in {self.prompt_set.root}")
        if (dataset, family) not in self._prompts:
            self._prompts[(dataset, family)] = (self.prompt_set.system_prompt(dataset, family),
                                                self.prompt_set.prompt_version(dataset, family))
        system_prompt, version = self._prompts[(dataset, family)]
        return build_request(row, self.settings, system_prompt, version)

    def cached_reply(self, request: PreparedRequest) -> CachedReply | None:
        reply = self.cache.get(request.key)
        if reply is None:
            return None
        if self.reask_unusable and not usable(reply.text):
            return None
        return reply

    async def reply_for(self, request: PreparedRequest) -> CachedReply:
        reply = self.cached_reply(request)
        if reply is not None:
            self.stats.cache_hits += 1
            self.stats.stale_cache_hits += reply.request_sha256 != request.sha256
            return reply
        if self.mode == "openai-batch":
            if request.item_id in self.batch_failures:
                raise ItemError("batch_request_failed", self.batch_failures[request.item_id])
            raise Deferred("awaiting_batch_reply")
        return await self._ask(request)

    async def _ask(self, request: PreparedRequest) -> CachedReply:
        price = self.prices.price(request.model)
        worst = price.cost(RESERVE_FACTOR * request.estimated_input_tokens, request.max_output_tokens)
        try:
            reserved = self.budget.reserve(worst)
        except BudgetExhausted as exc:
            raise Deferred("max_cost", str(exc)) from None

        def before_retry(kind: str) -> None:
            nonlocal reserved
            if kind in ("timeout", "connection"):
                # The server may have done (and billed) the work of the attempt that got no answer.
                self.budget.settle(reserved, reserved)
                reserved = 0.0
                reserved = self.budget.reserve(worst)

        if self._client is None:
            self._client = self.client_factory()
        self.stats.sent += 1
        try:
            answer = await self._client.complete(request.body, before_retry=before_retry)
        except BudgetExhausted as exc:
            raise Deferred("max_cost", str(exc)) from None
        except BaseException:
            self.budget.release(reserved)
            raise
        input_tokens = answer.prompt_tokens if answer.prompt_tokens is not None else request.estimated_input_tokens
        output_tokens = answer.completion_tokens if answer.completion_tokens is not None else estimate_tokens(answer.text)
        cost = price.cost(input_tokens, output_tokens)
        self.budget.settle(reserved, cost)
        self.stats.answered += 1
        self.stats.cost_usd += cost
        return self.cache.put(request.key, CachedReply(
            text=self.redactor.secrets_only(answer.text), finish_reason=answer.finish_reason, backend="openai",
            prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
            cost_usd=round(cost, 8), request_sha256=request.sha256,
        ))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        self.cache.close()


def usable(text: str) -> bool:
    try:
        parse_reply(text)
        return True
    except UnusableReply:
        return False
