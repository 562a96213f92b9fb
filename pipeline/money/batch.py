"""Pure: what a request costs in provider batch mode (an OpenAI-style Batch API).

Providers with a Batch API bill its requests at a fraction of the online price (OpenAI:
half, "50% cost discount" on its pricing page). The fraction comes from, first match wins:

1. the job's ``[pricing] batch_discount`` (or ``--price``'s override of it);
2. :data:`BATCH_DISCOUNTS`, by the endpoint's provider: OpenAI's published half price, and
   the built-in server's (loopback), which implements the Batch API and imitates OpenAI's
   discount;
3. nothing: the provider has no known batch price (WaveSpeedAI and DeepSeek have no Batch
   API at all). A batch run then costs rows at the online price, an upper bound, and says so.

A batch price has no off-peak window: batches are billed at the batch price whenever they
run.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from urllib.parse import urlsplit

from pipeline.money.pricing import Price, PriceOverride, provider_of

BATCH_DISCOUNTS: Mapping[str, Decimal] = {
    "openai": Decimal("0.5"),
    "local": Decimal("0.5"),
}
"""The fraction of the online price a provider's Batch API bills, by provider."""
_HOSTS = {"api.openai.com": "openai"}


def batch_provider(base_url: str) -> str | None:
    """The provider whose batch price applies at ``base_url`` (``openai``, ``local``)."""
    host = (urlsplit(base_url).hostname or "").lower()
    return _HOSTS.get(host) or provider_of(base_url)


def batch_discount(base_url: str, override: PriceOverride | None) -> Decimal | None:
    """The fraction of the online price paid in batch mode; None when it is not known."""
    if override is not None and override.batch_discount is not None:
        return override.batch_discount
    provider = batch_provider(base_url)
    return None if provider is None else BATCH_DISCOUNTS.get(provider)


def batch_price(price: Price | None, discount: Decimal | None) -> Price | None:
    """The flat price of a batch request: ``price`` times ``discount`` (the online price
    when the discount is unknown: an upper bound); None when the price is unknown."""
    if price is None:
        return None
    factor = Decimal(1) if discount is None else discount
    return Price(
        input=price.input * factor,
        cached_input=price.cached_input * factor,
        output=price.output * factor,
    )
