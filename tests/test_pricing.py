from __future__ import annotations

from decimal import Decimal

import pytest

from pipeline.jobspec import PriceOverride
from pipeline.pricing import Usage, builtin_price, cost, provider_of, resolve_price

WAVESPEED = "https://llm.wavespeed.ai/v1"
DEEPSEEK = "https://api.deepseek.com"


def test_wavespeed_flash_price() -> None:
    price = builtin_price(WAVESPEED, "deepseek/deepseek-v4-flash")
    assert price is not None
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000)
    assert cost(usage, price) == Decimal("0.51")


def test_deepseek_prices_cache_hits_separately() -> None:
    price = builtin_price(DEEPSEEK, "deepseek-v4-flash")
    usage = Usage(prompt_tokens=1_000_000, cached_tokens=400_000, completion_tokens=500_000)
    expected = Decimal("0.6") * Decimal("0.14") + Decimal("0.4") * Decimal("0.0028")
    expected += Decimal("0.5") * Decimal("0.28")
    assert cost(usage, price) == expected


def test_reasoning_tokens_are_billed_as_output_through_completion_tokens() -> None:
    price = builtin_price(WAVESPEED, "deepseek/deepseek-v4-flash")
    with_reasoning = Usage(prompt_tokens=10, completion_tokens=110, reasoning_tokens=100)
    assert cost(with_reasoning, price) == Decimal(10 * 17 + 110 * 34) / Decimal(100_000_000)


def test_unknown_model_costs_unknown_not_zero() -> None:
    assert builtin_price(WAVESPEED, "some/other-model") is None
    assert builtin_price("https://example.com/v1", "deepseek/deepseek-v4-flash") is None
    assert cost(Usage(prompt_tokens=5), None) is None


def test_loopback_uses_the_model_id_alone() -> None:
    assert provider_of("http://127.0.0.1:8123/v1") == "local"
    assert provider_of("http://localhost:8123/v1") == "local"
    assert builtin_price("http://127.0.0.1:1/v1", "deepseek-v4-flash") == builtin_price(
        DEEPSEEK, "deepseek-v4-flash"
    )


def test_job_override_replaces_parts_of_the_table() -> None:
    price = resolve_price(WAVESPEED, "deepseek/deepseek-v4-flash", PriceOverride(output=Decimal(1)))
    assert price is not None
    assert price.input == Decimal("0.17")
    assert price.output == Decimal(1)


def test_job_override_prices_an_unknown_model() -> None:
    override = PriceOverride(input=Decimal("0.5"), output=Decimal("1.5"))
    price = resolve_price("https://example.com/v1", "x", override)
    assert price is not None
    assert price.cached_input == Decimal("0.5")
    assert resolve_price("https://example.com/v1", "x", PriceOverride(input=Decimal(1))) is None


@pytest.mark.parametrize("tokens", [0, 1, 7, 999_999, 10**9])
def test_cost_is_exact_for_integer_tokens(tokens: int) -> None:
    price = builtin_price(WAVESPEED, "deepseek/deepseek-v4-flash")
    assert cost(Usage(prompt_tokens=tokens), price) == Decimal(tokens) * Decimal("0.17") / 10**6


def test_usage_adds_up() -> None:
    a = Usage(prompt_tokens=1, completion_tokens=2, cached_tokens=3, reasoning_tokens=4)
    assert a + a == Usage(prompt_tokens=2, completion_tokens=4, cached_tokens=6, reasoning_tokens=8)
