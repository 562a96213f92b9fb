"""Pure: token usage times a price table gives a cost.

Prices are USD per million tokens, held as :class:`~decimal.Decimal` so that fractional
prices are exact; costs are computed from integer token counts. A model with no known price
costs ``None`` (unknown), never $0.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from urllib.parse import urlsplit

from pipeline.jobspec import PriceOverride

MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True, kw_only=True)
class Price:
    """USD per million tokens."""

    input: Decimal
    """Uncached (cache-miss) input tokens."""
    cached_input: Decimal
    """Input tokens served from the provider's prompt cache."""
    output: Decimal
    """Output tokens, reasoning tokens included."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Token counts of one or more billed responses."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
        )


ZERO_USAGE = Usage()

# (provider, model) -> price. Provider is derived from the endpoint's host name.
BUILTIN_PRICES: Mapping[tuple[str, str], Price] = {
    # WaveSpeedAI: one input price; its cache-hit discount is not published, so cached
    # input is charged as uncached input (a conservative upper bound).
    ("wavespeed", "deepseek/deepseek-v4-flash"): Price(
        input=Decimal("0.17"), cached_input=Decimal("0.17"), output=Decimal("0.34")
    ),
    # DeepSeek's own API.
    ("deepseek", "deepseek-v4-flash"): Price(
        input=Decimal("0.14"), cached_input=Decimal("0.0028"), output=Decimal("0.28")
    ),
}

_HOST_PROVIDERS = {
    "llm.wavespeed.ai": "wavespeed",
    "api.wavespeed.ai": "wavespeed",
    "api.deepseek.com": "deepseek",
}


def provider_of(base_url: str) -> str | None:
    """The provider behind an endpoint: a known name, ``"local"`` for loopback, or None."""
    host = (urlsplit(base_url).hostname or "").lower()
    if host in _HOST_PROVIDERS:
        return _HOST_PROVIDERS[host]
    if host == "localhost":
        return "local"
    try:
        return "local" if ipaddress.ip_address(host).is_loopback else None
    except ValueError:
        return None


def builtin_price(base_url: str, model: str) -> Price | None:
    """The built-in price for a model at an endpoint.

    The built-in local server simulates the provider whose model id the job names, so on a
    loopback address the model id alone selects the price.
    """
    provider = provider_of(base_url)
    if provider == "local":
        matches = [price for (_, name), price in BUILTIN_PRICES.items() if name == model]
        return matches[0] if len(matches) == 1 else None
    if provider is None:
        return None
    return BUILTIN_PRICES.get((provider, model))


def resolve_price(base_url: str, model: str, override: PriceOverride | None) -> Price | None:
    """The price a job pays: the built-in table, with the job's ``[pricing]`` on top.

    An override that gives ``input`` and ``output`` prices a model the table lacks;
    ``cached_input`` then defaults to ``input``.
    """
    base = builtin_price(base_url, model)
    if override is None:
        return base
    input_price = override.input
    if input_price is None and base is not None:
        input_price = base.input
    output_price = override.output
    if output_price is None and base is not None:
        output_price = base.output
    if input_price is None or output_price is None:
        return None
    cached = override.cached_input
    if cached is None:
        cached = base.cached_input if base is not None else input_price
    return Price(input=input_price, cached_input=cached, output=output_price)


def cost(usage: Usage, price: Price | None) -> Decimal | None:
    """Exact USD cost of ``usage`` at ``price``; ``None`` when the price is unknown."""
    if price is None:
        return None
    uncached = usage.prompt_tokens - usage.cached_tokens
    micro = (
        uncached * price.input
        + usage.cached_tokens * price.cached_input
        + usage.completion_tokens * price.output
    )
    return micro / MILLION
