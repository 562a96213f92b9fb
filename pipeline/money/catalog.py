"""Prices from the ``genai-prices`` package's bundled data, as the values this project uses.

`genai-prices <https://github.com/pydantic/genai-prices>`_ (Pydantic's price database for
LLM APIs) ships its whole table as Python data in the installed package. Only that bundled
snapshot is read here, through a :class:`~genai_prices.data_snapshot.DataSnapshot` of our own:
never the package's process-wide snapshot (which its ``UpdatePrices`` may have replaced with
one fetched over the network), and never ``UpdatePrices`` itself. Importing the package
imports its HTTP client's module but sends nothing; ``tests/test_prices.py`` checks that a
lookup opens no socket. The package is imported on first use (about 0.2 s), so a job priced
by the built-in table never pays for it.

What a genai-prices entry becomes (a :class:`CatalogPrice`):

- ``input_mtok``, ``cache_read_mtok``, ``output_mtok`` are the input, cached-input and output
  prices; an entry without an input or an output price has no price here (embeddings, audio
  and image models). Without ``cache_read_mtok`` cached input is charged as input.
- **Tiered prices** (by the prompt's length: Gemini, Claude, GPT-5.4 beyond 200,000 or
  272,000 tokens): the base tier, with a note and ``prompt_limit`` (the first tier's
  threshold) so the estimate can warn about longer prompts.
- **Dated prices** (a price that starts on a date): the one in effect at the given instant;
  ``since`` is its start date and a later scheduled change is noted.
- **Time-of-day prices**: one daily window in which every part costs the same fraction of the
  rest of the day's price becomes an off-peak window (DeepSeek's ``deepseek-chat``: half price
  from 16:30 to 00:30 UTC). Anything else (two windows, a surcharge at peak hours, parts at
  different fractions) becomes the day's highest price of each part, said in a note: a budget
  then never under-counts.
- Variants chosen by request options (OpenAI's ``service_tier``, batch processing) are not
  applied: the standard price is used. Cache writes, per-request fees and a separate
  reasoning price are not counted; a note names them (searches and audio, charged only when a
  request uses them, are not mentioned).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from genai_prices.data_snapshot import DataSnapshot
    from genai_prices.types import ModelInfo, ModelPrice, Provider

PACKAGE = "genai-prices"
_NOT_COUNTED_NAMES = {
    "cache_write_mtok": "cache writes",
    "cache_write_1h_mtok": "1-hour cache writes",
    "requests_kcount": "a fee per request",
    "output_reasoning_mtok": "a separate reasoning-token price",
}
"""Charges a chat request can incur that the three prices leave out (searches and audio are
charged only when a request uses those tools, which a batch job here does not)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CatalogPrice:
    """One genai-prices entry as flat USD-per-million prices (see the module docstring)."""

    provider: str
    """The genai-prices provider id (``openai``, ``deepseek``, ...)."""
    model: str
    """The genai-prices model id the model name matched."""
    input: Decimal
    cached_input: Decimal
    output: Decimal
    off_peak: tuple[time, time, Decimal] | None = None
    """A daily UTC window ``(start, end, fraction paid)``, as :class:`~.pricing.OffPeak`."""
    since: date | None = None
    """The date this price took effect, when the data says."""
    prompt_limit: int | None = None
    """The prices hold for prompts up to this many tokens (tiered prices); None: any."""
    notes: tuple[str, ...] = ()


def installed() -> bool:
    """Whether the genai-prices package is installed."""
    try:
        package_version(PACKAGE)
    except PackageNotFoundError:
        return False
    return True


@functools.cache
def version() -> str:
    """The installed genai-prices version (``"0.2.3"``)."""
    return package_version(PACKAGE)


@functools.cache
def _snapshot() -> DataSnapshot:
    """The package's bundled data in a snapshot of our own (never one fetched online)."""
    from genai_prices.data import providers
    from genai_prices.data_snapshot import DataSnapshot

    return DataSnapshot(providers=providers, from_auto_update=False)


def _providers() -> list[Provider]:
    return _snapshot().providers


@functools.cache
def data_date(today: date) -> date | None:
    """The newest date on which a price in the bundled data changed, up to ``today``: the
    data is at least this recent (the package records no date of its own)."""
    from genai_prices.types import StartDateConstraint

    dates: list[date] = []
    for provider in _providers():
        for model in provider.models:
            constraints: list[Any] = []
            if isinstance(model.prices, list):
                constraints += [c.constraint for c in model.prices]
            constraints += [v.constraint for v in model.price_variants or ()]
            dates += [
                c.start_date
                for c in constraints
                if isinstance(c, StartDateConstraint) and c.start_date <= today
            ]
    return max(dates, default=None)


def provider_for_url(base_url: str) -> str | None:
    """The genai-prices provider whose API address ``base_url`` is (None: none is)."""
    try:
        return _snapshot().find_provider(None, None, base_url).id
    except LookupError:
        return None


def provider_ids() -> list[str]:
    return [provider.id for provider in _providers()]


def _find(model: str, provider: str | None) -> tuple[Provider, ModelInfo] | None:
    """The entry for ``model``: at ``provider``, or (None) by the model id alone, where a
    ``provider/`` prefix that names a genai-prices provider selects it."""
    snapshot = _snapshot()
    if provider is None and "/" in model:
        prefix, _, rest = model.partition("/")
        if prefix.lower() in provider_ids():
            provider, model = prefix.lower(), rest
    try:
        return snapshot.find_provider_model(model, None, provider, None)
    except LookupError:
        return None


def lookup(model: str, *, provider: str | None, when: datetime) -> CatalogPrice | None:
    """The genai-prices price of ``model`` at ``provider`` (None: by the model id alone) in
    effect at ``when``; None when the data has no usable price for it."""
    found = _find(model, provider)
    if found is None:
        return None
    return convert(found[0], found[1], when)


def entries(provider: str | None, when: datetime) -> Iterator[CatalogPrice]:
    """Every usable price of ``provider`` (None: of every provider), in the data's order."""
    for item in _providers():
        if provider is not None and item.id != provider:
            continue
        for model in item.models:
            price = convert(item, model, when)
            if price is not None:
                yield price


def near_misses(model: str, provider: str | None, *, count: int = 3) -> list[str]:
    """Model ids close to ``model`` (of ``provider``, or of every provider)."""
    ids = sorted(
        {
            m.id
            for item in _providers()
            if provider is None or item.id == provider
            for m in item.models
        }
    )
    return difflib.get_close_matches(model.lower(), ids, n=count, cutoff=0.6)


# ---------------------------------------------------------------------------------------
# From a genai-prices entry to flat prices.


def _utc_naive(moment: time) -> time:
    if moment.tzinfo is None:
        return moment
    return datetime.combine(date(1970, 1, 1), moment).astimezone(UTC).time()


def _time_windows(model: ModelInfo) -> list[tuple[time, time]]:
    from genai_prices.types import TimeOfDateConstraint

    if not isinstance(model.prices, list):
        return []
    return [
        (_utc_naive(c.constraint.start_time), _utc_naive(c.constraint.end_time))
        for c in model.prices
        if isinstance(c.constraint, TimeOfDateConstraint)
    ]


def _dates(model: ModelInfo, when: datetime) -> tuple[date | None, date | None]:
    """The start date of the dated price in effect at ``when``, and the next change's."""
    from genai_prices.types import StartDateConstraint

    if not isinstance(model.prices, list):
        return None, None
    starts = [
        c.constraint.start_date
        for c in model.prices
        if isinstance(c.constraint, StartDateConstraint)
    ]
    day = when.astimezone(UTC).date() if when.tzinfo is not None else when.date()
    past = [start for start in starts if start <= day]
    future = [start for start in starts if start > day]
    return (max(past) if past else None), (min(future) if future else None)


Parts = tuple[Decimal, Decimal | None, Decimal]
"""Input, cached input (None: not priced), output."""


def _flat(value: Any) -> tuple[Decimal | None, int | None]:
    """A price and, when it is tiered, the first tier's threshold (its base tier is used)."""
    from genai_prices.types import TieredPrices

    if isinstance(value, TieredPrices):
        limit = min((tier.start for tier in value.tiers), default=None)
        return value.base, limit
    if isinstance(value, Decimal):
        return value, None
    return None, None


def _parts(prices: ModelPrice) -> tuple[Parts | None, int | None]:
    input_price, limit_in = _flat(prices.input_mtok)
    cached, limit_cached = _flat(prices.cache_read_mtok)
    output, limit_out = _flat(prices.output_mtok)
    if input_price is None or output is None:
        return None, None
    limits = [x for x in (limit_in, limit_cached, limit_out) if x is not None]
    return (input_price, cached, output), (min(limits) if limits else None)


def _at(model: ModelInfo, day: date, moment: time) -> ModelPrice:
    return model.get_prices(datetime.combine(day, moment, tzinfo=UTC))


def _scaled(high: Parts, low: Parts) -> Decimal | None:
    """The fraction ``f`` with ``low == high * f`` part by part (exactly), if 0 < f < 1."""
    reference = high[0] if high[0] else high[2]
    if not reference:
        return None
    fraction = (low[0] if high[0] else low[2]) / reference
    if not Decimal(0) < fraction < Decimal(1):
        return None
    for a, b in zip(high, low, strict=True):
        if (a is None) != (b is None):
            return None
        if a is not None and b is not None and a * fraction != b:
            return None
    return fraction


def _circular_run(flags: Sequence[bool]) -> tuple[int, int] | None:
    """``(first, last)`` indexes of the one circular run of True in ``flags`` (None: not
    exactly one run)."""
    n = len(flags)
    starts = [i for i in range(n) if flags[i] and not flags[i - 1]]
    if len(starts) != 1:
        return None
    first = starts[0]
    last = first
    while flags[(last + 1) % n] and (last + 1) % n != first:
        last = (last + 1) % n
    return first, last


@dataclass(frozen=True, slots=True)
class _Day:
    parts: Parts
    limit: int | None
    off_peak: tuple[time, time, Decimal] | None
    note: str | None


def _day(model: ModelInfo, day: date) -> _Day | None:
    """The model's prices over one UTC day: flat, flat with one off-peak window, or the
    day's highest (with a note)."""
    windows = _time_windows(model)
    bounds = sorted({time(0), *(t for w in windows for t in w)})
    segments = [_parts(_at(model, day, moment)) for moment in bounds]
    parts = [p for p, _ in segments]
    if any(p is None for p in parts):
        return None
    known = [p for p in parts if p is not None]
    limits = [limit for _, limit in segments if limit is not None]
    limit = min(limits) if limits else None
    distinct = list(dict.fromkeys(known))
    if len(distinct) == 1:
        return _Day(distinct[0], limit, None, None)
    if len(distinct) == 2:
        high, low = sorted(distinct, key=lambda p: (p[2], p[0]), reverse=True)
        fraction = _scaled(high, low)
        run = _circular_run([p == low for p in known])
        if fraction is not None and run is not None:
            first, last = run
            end = bounds[(last + 1) % len(bounds)]
            return _Day(high, limit, (bounds[first], end, fraction), None)
    highest: Parts = (
        max(p[0] for p in known),
        None if any(p[1] is None for p in known) else max(p[1] or Decimal(0) for p in known),
        max(p[2] for p in known),
    )
    note = (
        "its prices change by time of day in a way one off-peak window cannot show: the "
        "day's highest price is used"
    )
    return _Day(highest, limit, None, note)


def convert(provider: Provider, model: ModelInfo, when: datetime) -> CatalogPrice | None:
    """``model``'s price at ``provider`` in effect on ``when``'s UTC day (None: unusable)."""
    day = when.astimezone(UTC).date() if when.tzinfo is not None else when.date()
    found = _day(model, day)
    if found is None:
        return None
    input_price, cached, output = found.parts
    notes: list[str] = []
    if found.note:
        notes.append(found.note)
    if cached is None:
        cached = input_price
        notes.append("no cached-input price: cached input is charged as input")
    if found.limit is not None:
        notes.append(
            f"tiered: prompts over {found.limit:,} tokens cost more; the base tier is used"
        )
    standard = _at(model, day, time(12))
    others = [
        name for key, name in _NOT_COUNTED_NAMES.items() if getattr(standard, key, None) is not None
    ]
    if others:
        notes.append("not counted: " + ", ".join(others))
    since, upcoming = _dates(model, when)
    if upcoming is not None:
        notes.append(f"genai-prices lists a new price from {upcoming:%Y-%m-%d}")
    return CatalogPrice(
        provider=provider.id,
        model=model.id,
        input=input_price,
        cached_input=cached,
        output=output,
        off_peak=found.off_peak,
        since=since,
        prompt_limit=found.limit,
        notes=tuple(notes),
    )
