"""Token estimates, prices and the cost cap.

Token counts before sending are estimates: no tokenizer is downloaded at run time (tiktoken fetches
its BPE files from the network), so a text counts ``ceil(characters / 4)`` tokens, OpenAI's rule of
thumb for English with its GPT tokenizers, plus 4 tokens per chat message and 3 for the reply's
priming. JSON full of numbers tokenizes more densely than prose, so estimates of the input can run
low by a quarter or so; the cost cap therefore reserves ``RESERVE_FACTOR`` times the input estimate
plus the full output token limit for every request in flight, and replaces the reservation with the
cost of the tokens the server reports once the reply is in.

Prices are USD per million tokens, from ``prompts/model_prices.yaml`` (overridable per model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.errors import PipelineError
from pipeline.runner import StageConfigError

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY_PRIMING = 3
RESERVE_FACTOR = 1.5
TOKEN_ESTIMATE_NOTE = (
    f"token counts are estimates (characters / {CHARS_PER_TOKEN}, no tokenizer is downloaded); "
    "costs of replies received are computed from the token counts the server reports"
)


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def estimate_prompt_tokens(messages: list[dict]) -> int:
    return sum(TOKENS_PER_MESSAGE + estimate_tokens(m.get("content") or "") for m in messages) + TOKENS_PER_REPLY_PRIMING


@dataclass(frozen=True)
class ModelPrice:
    input_per_million: float
    output_per_million: float

    def cost(self, input_tokens: float, output_tokens: float, discount: float = 1.0) -> float:
        return discount * (input_tokens * self.input_per_million + output_tokens * self.output_per_million) / 1e6


class PriceTable:
    def __init__(self, prices: dict[str, ModelPrice], batch_discount: float, source: str):
        self.prices, self.batch_discount, self.source = prices, batch_discount, source

    @classmethod
    def load(cls, path: Path, overrides: dict[str, ModelPrice] | None = None) -> "PriceTable":
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise StageConfigError(f"--prices: cannot read {path}: {exc}") from None
        prices = {}
        for model, entry in (data.get("models") or {}).items():
            try:
                prices[str(model)] = ModelPrice(float(entry["input"]), float(entry["output"]))
            except (TypeError, KeyError, ValueError):
                raise StageConfigError(f"--prices: {path}: model {model} needs numeric 'input' and 'output'") from None
        discount = float(data.get("batch_discount", 0.5))
        prices.update(overrides or {})
        return cls(prices, discount, str(path))

    def price(self, model: str) -> ModelPrice:
        if model not in self.prices:
            raise StageConfigError(
                f"--price: no price for model {model!r} in {self.source}; give one with "
                f"--price {model}=INPUT,OUTPUT (USD per million tokens; {model}=0,0 for a server of your own)"
            )
        return self.prices[model]


def parse_price(text: str) -> tuple[str, ModelPrice]:
    """``MODEL=INPUT,OUTPUT`` (USD per million tokens) -> (model, price)."""
    model, sep, numbers = text.rpartition("=")
    try:
        if not sep or not model:
            raise ValueError
        inp, out = (float(x) for x in numbers.split(","))
        if inp < 0 or out < 0 or not (math.isfinite(inp) and math.isfinite(out)):
            raise ValueError
    except ValueError:
        raise StageConfigError(f"--price expects MODEL=INPUT,OUTPUT with non-negative USD per million tokens, got {text!r}") from None
    return model, ModelPrice(inp, out)


class BudgetExhausted(PipelineError):
    """Sending this request could take the run past --max-cost."""


class CostBudget:
    """Spent and reserved USD for this run, against an optional cap.

    ``reserve`` before a request (raises ``BudgetExhausted`` when the worst case would pass the cap;
    from then on every further reservation fails too, so the run stops sending rather than
    squeezing small requests in), ``settle`` when the reply is in, ``release`` when the request
    was not billed.
    """

    def __init__(self, max_usd: float | None):
        self.max_usd = max_usd
        self.spent = 0.0
        self.reserved = 0.0
        self.closed = False

    def reserve(self, usd: float) -> float:
        if self.max_usd is not None and (self.closed or self.spent + self.reserved + usd > self.max_usd + 1e-12):
            self.closed = True
            raise BudgetExhausted(
                f"a request reserving ${usd:.4f} would pass --max-cost ${self.max_usd:.2f} "
                f"(spent ${self.spent:.4f}, ${self.reserved:.4f} in flight)"
            )
        self.reserved += usd
        return usd

    def settle(self, reserved: float, actual: float) -> None:
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += actual

    def release(self, reserved: float) -> None:
        self.reserved = max(0.0, self.reserved - reserved)
