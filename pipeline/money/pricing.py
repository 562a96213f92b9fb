"""Pure: token usage times a price table gives a cost.

Prices are USD per million tokens, held as :class:`~decimal.Decimal` so that fractional
prices are exact; costs are computed from integer token counts. A model with no known price
costs ``None`` (unknown), never $0.

A price may have an off-peak window (:class:`OffPeak`): a daily UTC time range in which a
fraction of the price is paid. :func:`price_at` gives the flat price in effect at one instant;
:func:`cost` always takes a flat price (callers pass the effective one).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, time
from decimal import Decimal
from urllib.parse import urlsplit

MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceOverride:
    """USD per million tokens; ``None`` keeps the built-in table's value."""

    input: Decimal | None = None
    cached_input: Decimal | None = None
    output: Decimal | None = None
    off_peak_start: time | None = None
    """Start of a daily off-peak window (UTC); the three off_peak fields come together."""
    off_peak_end: time | None = None
    """End of the window (UTC, exclusive); earlier than the start: it wraps midnight."""
    off_peak_discount: Decimal | None = None
    """The fraction of the price paid off-peak (0.5: half price)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OffPeak:
    """A daily UTC window in which only ``discount`` of the price is paid.

    ``start`` is inclusive and ``end`` exclusive; a window whose end is earlier than its start
    wraps midnight (16:30-00:30 is 16:30 to 24:00 plus 00:00 to 00:30).
    """

    start: time
    end: time
    discount: Decimal
    """The fraction of the price paid off-peak (0.5: half price), 0 < discount <= 1."""

    def __post_init__(self) -> None:
        if not Decimal(0) < self.discount <= Decimal(1):
            raise ValueError(f"off-peak discount must be in (0, 1], got {self.discount}")
        if self.start == self.end:
            raise ValueError("an off-peak window must not start and end at the same time")
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("off-peak times are naive UTC times of day")

    def contains(self, moment: time) -> bool:
        """Whether the UTC time of day ``moment`` falls in the window."""
        moment = moment.replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end

    def describe(self) -> str:
        """``16:30-00:30 UTC at 50%``."""
        share = self.discount * 100
        shown = f"{share:f}".rstrip("0").rstrip(".")
        return f"{self.start:%H:%M}-{self.end:%H:%M} UTC at {shown}%"


@dataclass(frozen=True, slots=True, kw_only=True)
class Price:
    """USD per million tokens."""

    input: Decimal
    """Uncached (cache-miss) input tokens."""
    cached_input: Decimal
    """Input tokens served from the provider's prompt cache."""
    output: Decimal
    """Output tokens, reasoning tokens included."""
    off_peak: OffPeak | None = None
    """A daily window at a lower price, if the provider has one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CostParts:
    """USD cost of a usage, split by what is billed."""

    uncached_input: Decimal
    cached_input: Decimal
    output: Decimal

    @property
    def total(self) -> Decimal:
        return self.uncached_input + self.cached_input + self.output

    def to_dict(self) -> dict[str, str]:
        """JSON-ready, dollars as exact decimal strings."""
        return {
            "uncached_input": str(self.uncached_input),
            "cached_input": str(self.cached_input),
            "output": str(self.output),
        }

    def __add__(self, other: CostParts) -> CostParts:
        return CostParts(
            uncached_input=self.uncached_input + other.uncached_input,
            cached_input=self.cached_input + other.cached_input,
            output=self.output + other.output,
        )


ZERO_COST = CostParts(uncached_input=Decimal(0), cached_input=Decimal(0), output=Decimal(0))


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
    # DeepSeek's own API. The off-peak window is DeepSeek's *announced* schedule (half price
    # from 16:30 to 00:30 UTC); a job's [pricing] off_peak_* keys override it.
    ("deepseek", "deepseek-v4-flash"): Price(
        input=Decimal("0.14"),
        cached_input=Decimal("0.0028"),
        output=Decimal("0.28"),
        off_peak=OffPeak(start=time(16, 30), end=time(0, 30), discount=Decimal("0.5")),
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
    ``cached_input`` then defaults to ``input``. An override's off-peak window replaces the
    table's (``off_peak_discount = 1`` in effect removes it).
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
    off_peak = base.off_peak if base is not None else None
    if (
        override.off_peak_start is not None
        and override.off_peak_end is not None
        and override.off_peak_discount is not None
    ):
        off_peak = OffPeak(
            start=override.off_peak_start,
            end=override.off_peak_end,
            discount=override.off_peak_discount,
        )
    return Price(input=input_price, cached_input=cached, output=output_price, off_peak=off_peak)


def _utc_time(when: datetime) -> time:
    """The UTC time of day of ``when`` (a naive datetime is taken to be UTC)."""
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.time().replace(tzinfo=None)


def price_at(price: Price, when: datetime) -> Price:
    """The flat price in effect at the instant ``when`` (naive datetimes are UTC).

    Inside the off-peak window every part is multiplied by the discount. The result has no
    window of its own (``off_peak=None``), so it can be passed straight to :func:`cost`.
    """
    window = price.off_peak
    if window is None or not window.contains(_utc_time(when)):
        return replace(price, off_peak=None)
    return off_peak_price(price, window)


def off_peak_price(price: Price, window: OffPeak) -> Price:
    """``price`` with every part at the window's discount, as a flat price."""
    factor = window.discount
    return Price(
        input=price.input * factor,
        cached_input=price.cached_input * factor,
        output=price.output * factor,
    )


def cost_parts(usage: Usage, price: Price) -> CostParts:
    """Exact USD cost of ``usage`` at the flat ``price``, split into its three parts."""
    uncached = usage.prompt_tokens - usage.cached_tokens
    return CostParts(
        uncached_input=uncached * price.input / MILLION,
        cached_input=usage.cached_tokens * price.cached_input / MILLION,
        output=usage.completion_tokens * price.output / MILLION,
    )


def cost(usage: Usage, price: Price | None) -> Decimal | None:
    """Exact USD cost of ``usage`` at ``price``; ``None`` when the price is unknown."""
    if price is None:
        return None
    return cost_parts(usage, price).total
