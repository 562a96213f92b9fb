"""Pure: token usage times a price table gives a cost.

Prices are USD per million tokens, held as :class:`~decimal.Decimal` so that fractional
prices are exact; costs are computed from integer token counts. A model with no known price
costs ``None`` (unknown), never $0.

A price may have an off-peak window (:class:`OffPeak`): a daily UTC time range in which a
fraction of the price is paid. :func:`price_at` gives the flat price in effect at one instant;
:func:`cost` always takes a flat price (callers pass the effective one).

Where a job's price comes from, first match wins (:func:`quote_price`):

1. the job's ``[pricing]`` table or the command line's ``--price`` (a :class:`PriceOverride`;
   the parts it leaves out come from 2 or 3);
2. the built-in table (:data:`BUILTIN_PRICES`): WaveSpeedAI's prices and DeepSeek's own API
   with its off-peak window;
3. the ``genai-prices`` package's bundled data (:mod:`pipeline.money.catalog`), for every
   provider and model it knows.

The endpoint's host picks the provider (``api.deepseek.com`` is DeepSeek, ``api.openai.com``
OpenAI, and every API address genai-prices knows); on a loopback address (the built-in
server) the model id alone picks the price, as a ``provider/`` prefix does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

from pipeline.money import catalog

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
    origin: str = "job [pricing]"
    """Where the override was given, for people: ``job [pricing]`` or ``--price``."""
    batch_discount: Decimal | None = None
    """The fraction of the price paid in provider batch mode (0.5: half price); see
    :mod:`pipeline.money.batch`."""

    def over(self, other: PriceOverride | None) -> PriceOverride:
        """This override on top of ``other``: each part given here wins."""
        if other is None:
            return self

        def pick(name: str) -> Any:
            mine = getattr(self, name)
            return mine if mine is not None else getattr(other, name)

        window = self.off_peak_start is not None
        return PriceOverride(
            input=pick("input"),
            cached_input=pick("cached_input"),
            output=pick("output"),
            off_peak_start=self.off_peak_start if window else other.off_peak_start,
            off_peak_end=self.off_peak_end if window else other.off_peak_end,
            off_peak_discount=self.off_peak_discount if window else other.off_peak_discount,
            origin=f"{self.origin} over {other.origin}",
            batch_discount=pick("batch_discount"),
        )


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
BUILTIN_AS_OF = date(2026, 11, 29)
"""When the built-in table's prices were taken from the providers' price pages."""
BUILTIN = "built-in table"

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


@dataclass(frozen=True, slots=True, kw_only=True)
class Quote:
    """A price and where it comes from."""

    price: Price
    source: str
    """``job [pricing]``, ``--price``, ``built-in table`` or ``genai-prices 0.2.3``; an
    override that leaves parts out reads ``--price over genai-prices 0.2.3``."""
    as_of: date | None = None
    date_kind: str | None = None
    """``checked`` (the built-in table's date) or ``since`` (the price took effect then)."""
    provider: str | None = None
    """The provider the table matched (ours or genai-prices' id)."""
    model: str | None = None
    """The model id the table matched (may differ from the job's: a dated alias)."""
    notes: tuple[str, ...] = ()
    """What the price leaves out or simplifies (tiers, fees not counted)."""
    prompt_limit: int | None = None
    """The price holds for prompts up to this many tokens (tiered prices)."""

    @property
    def date_text(self) -> str:
        """``checked 2026-11-29``, ``since 2026-09-10`` or ``-``."""
        if self.as_of is None:
            return "-"
        return f"{self.date_kind or 'as of'} {self.as_of:%Y-%m-%d}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; prices as exact decimal strings."""
        window = self.price.off_peak
        return {
            "source": self.source,
            "date": None if self.as_of is None else f"{self.as_of:%Y-%m-%d}",
            "date_kind": self.date_kind,
            "provider": self.provider,
            "model": self.model,
            "input": str(self.price.input),
            "cached_input": str(self.price.cached_input),
            "output": str(self.price.output),
            "off_peak": None
            if window is None
            else {
                "start": f"{window.start:%H:%M}",
                "end": f"{window.end:%H:%M}",
                "discount": str(window.discount),
            },
            "prompt_limit": self.prompt_limit,
            "notes": list(self.notes),
        }


def catalog_source() -> str:
    """``genai-prices 0.2.3``."""
    return f"{catalog.PACKAGE} {catalog.version()}"


def _builtin_quote(base_url: str, model: str) -> Quote | None:
    price = builtin_price(base_url, model)
    if price is None:
        return None
    return next(q for q in builtin_quotes() if q.model == model and q.price == price)


def catalog_provider(base_url: str) -> str | None:
    """The genai-prices provider for an endpoint; None on loopback (the model id decides)
    and for hosts it does not know."""
    if provider_of(base_url) == "local":
        return None
    return catalog.provider_for_url(base_url)


def catalog_quote(found: catalog.CatalogPrice) -> Quote:
    """A genai-prices entry as a quote."""
    window = None
    if found.off_peak is not None:
        start, end, fraction = found.off_peak
        window = OffPeak(start=start, end=end, discount=fraction)
    return Quote(
        price=Price(
            input=found.input,
            cached_input=found.cached_input,
            output=found.output,
            off_peak=window,
        ),
        source=catalog_source(),
        as_of=found.since,
        date_kind="since" if found.since is not None else None,
        provider=found.provider,
        model=found.model,
        notes=found.notes,
        prompt_limit=found.prompt_limit,
    )


def builtin_quotes() -> list[Quote]:
    """Every price of the built-in table."""
    return [
        Quote(
            price=price,
            source=BUILTIN,
            as_of=BUILTIN_AS_OF,
            date_kind="checked",
            provider=provider,
            model=model,
        )
        for (provider, model), price in BUILTIN_PRICES.items()
    ]


def _catalog_quote(base_url: str, model: str, when: datetime) -> Quote | None:
    local = provider_of(base_url) == "local"
    provider = None if local else catalog.provider_for_url(base_url)
    if provider is None and not local:
        return None
    found = catalog.lookup(model, provider=provider, when=when)
    return None if found is None else catalog_quote(found)


def _now() -> datetime:
    return datetime.now(UTC)


def table_quotes(base_url: str, model: str, *, when: datetime | None = None) -> list[Quote]:
    """The tables' prices for ``model`` at ``base_url``, the winner first: the built-in
    table, then genai-prices (at ``when``, default now)."""
    moment = when or _now()
    found = [_builtin_quote(base_url, model), _catalog_quote(base_url, model, moment)]
    return [quote for quote in found if quote is not None]


def apply_override(base: Quote | None, override: PriceOverride) -> Quote | None:
    """``override`` on top of a table's price (see :func:`resolve_price`); the source says
    ``--price over genai-prices 0.2.3`` when the table still gives a part."""
    price = base.price if base is not None else None
    input_price = override.input
    if input_price is None and price is not None:
        input_price = price.input
    output_price = override.output
    if output_price is None and price is not None:
        output_price = price.output
    if input_price is None or output_price is None:
        return None
    cached = override.cached_input
    if cached is None:
        cached = price.cached_input if price is not None else input_price
    window = override.off_peak_start is not None
    off_peak = price.off_peak if price is not None else None
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
    merged = Price(input=input_price, cached_input=cached, output=output_price, off_peak=off_peak)
    given = (override.input, override.cached_input, override.output)
    if base is None or (
        all(part is not None for part in given) and (window or base.price.off_peak is None)
    ):
        return Quote(price=merged, source=override.origin)
    return replace(base, price=merged, source=f"{override.origin} over {base.source}")


def quote_price(
    base_url: str, model: str, override: PriceOverride | None, *, when: datetime | None = None
) -> Quote | None:
    """The price a job pays and where it comes from (None: no price is known).

    The job's ``[pricing]`` (or ``--price``) wins over the built-in table, which wins over
    genai-prices; see :func:`resolve_price` for how an override's parts combine.
    """
    # The built-in table wins: genai-prices (~0.1 s to load) is read only when it has no price.
    base = _builtin_quote(base_url, model) or _catalog_quote(base_url, model, when or _now())
    if override is None:
        return base
    return apply_override(base, override)


def resolve_price(base_url: str, model: str, override: PriceOverride | None) -> Price | None:
    """The price a job pays: the tables' (built-in, then genai-prices), with the job's
    ``[pricing]`` on top.

    An override that gives ``input`` and ``output`` prices a model no table has;
    ``cached_input`` then defaults to ``input``. Parts an override leaves out come from the
    table. An override's off-peak window replaces the table's (``off_peak_discount = 1`` in
    effect removes it).
    """
    quote = quote_price(base_url, model, override)
    return None if quote is None else quote.price


PRICE_KEYS = ("input", "cached_input", "output")


def parse_price(text: str) -> PriceOverride:
    """``input=0.15,output=0.60[,cached_input=0.075]`` (USD per million tokens), as given to
    ``--price``. Raises ValueError with a message for a person."""
    values: dict[str, Decimal] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in PRICE_KEYS:
            raise ValueError(
                f"{item.strip() or '(empty)'!r} is not KEY=USD; the keys are input, "
                "cached_input and output (USD per million tokens), like "
                "input=0.15,output=0.60"
            )
        if key in values:
            raise ValueError(f"{key} is given twice")
        try:
            number = Decimal(value)
        except InvalidOperation:
            number = Decimal("NaN")
        if not number.is_finite() or number < 0:
            raise ValueError(f"{key}={value!r} is not a price (a number of USD, 0 or more)")
        values[key] = number
    missing = [key for key in ("input", "output") if key not in values]
    if missing:
        raise ValueError(
            f"{' and '.join(missing)} missing: give at least input and output, like "
            "input=0.15,output=0.60"
        )
    return PriceOverride(
        input=values["input"],
        cached_input=values.get("cached_input"),
        output=values["output"],
        origin="--price",
    )


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


def price_now(price: Price) -> Price:
    """:func:`price_at` the current instant (the clock tests pin: ``_now``)."""
    return price_at(price, _now())


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
