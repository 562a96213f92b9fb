from __future__ import annotations

from datetime import UTC, datetime, time, timedelta, timezone
from decimal import Decimal

import pytest

from pipeline.errors import JobFileError
from pipeline.job.load import parse_job
from pipeline.money.pricing import (
    OffPeak,
    Price,
    PriceOverride,
    Usage,
    builtin_price,
    cost,
    cost_parts,
    price_at,
    provider_of,
    resolve_price,
)

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


# -- off-peak windows ---------------------------------------------------------------------

HALF = Decimal("0.5")


def _at(hour: int, minute: int) -> datetime:
    return datetime(2026, 1, 5, hour, minute, tzinfo=UTC)


def test_deepseek_has_the_announced_off_peak_window_and_wavespeed_none() -> None:
    deepseek = builtin_price(DEEPSEEK, "deepseek-v4-flash")
    assert deepseek is not None
    assert deepseek.off_peak == OffPeak(start=time(16, 30), end=time(0, 30), discount=HALF)
    wavespeed = builtin_price(WAVESPEED, "deepseek/deepseek-v4-flash")
    assert wavespeed is not None
    assert wavespeed.off_peak is None
    assert price_at(wavespeed, _at(17, 0)) == wavespeed


@pytest.mark.parametrize(
    ("hour", "minute", "off_peak"),
    [
        (16, 29, False),
        (16, 30, True),
        (23, 59, True),
        (0, 0, True),
        (0, 29, True),
        (0, 30, False),
        (12, 0, False),
    ],
)
def test_a_window_that_wraps_midnight(hour: int, minute: int, off_peak: bool) -> None:
    price = builtin_price(DEEPSEEK, "deepseek-v4-flash")
    assert price is not None
    effective = price_at(price, _at(hour, minute))
    assert effective.off_peak is None
    factor = HALF if off_peak else Decimal(1)
    assert effective.input == price.input * factor
    assert effective.cached_input == price.cached_input * factor
    assert effective.output == price.output * factor


def test_a_window_within_one_day() -> None:
    window = OffPeak(start=time(1, 0), end=time(5, 0), discount=Decimal("0.25"))
    assert window.contains(time(1, 0))
    assert window.contains(time(4, 59))
    assert not window.contains(time(5, 0))
    assert not window.contains(time(0, 59))
    assert window.describe() == "01:00-05:00 UTC at 25%"


def test_price_at_converts_aware_times_to_utc_and_takes_naive_ones_as_utc() -> None:
    price = Price(
        input=Decimal(1),
        cached_input=Decimal(1),
        output=Decimal(2),
        off_peak=OffPeak(start=time(22, 0), end=time(2, 0), discount=HALF),
    )
    plus_two = timezone(timedelta(hours=2))
    assert price_at(price, datetime(2026, 1, 5, 1, 0, tzinfo=plus_two)).input == HALF  # 23:00
    assert price_at(price, datetime(2026, 1, 5, 3, 0, tzinfo=plus_two)).input == HALF  # 01:00
    assert price_at(price, datetime(2026, 1, 5, 23, 30, tzinfo=plus_two)).input == 1  # 21:30
    assert price_at(price, datetime(2026, 1, 5, 3, 0)).input == 1
    assert price_at(price, datetime(2026, 1, 5, 23, 0)).input == HALF


def test_off_peak_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="discount"):
        OffPeak(start=time(1), end=time(2), discount=Decimal(0))
    with pytest.raises(ValueError, match="discount"):
        OffPeak(start=time(1), end=time(2), discount=Decimal("1.5"))
    with pytest.raises(ValueError, match="same time"):
        OffPeak(start=time(1), end=time(1), discount=HALF)


def test_cost_parts_split_the_exact_cost() -> None:
    price = builtin_price(DEEPSEEK, "deepseek-v4-flash")
    assert price is not None
    usage = Usage(prompt_tokens=1_000_000, cached_tokens=400_000, completion_tokens=500_000)
    parts = cost_parts(usage, price)
    assert parts.uncached_input == Decimal("0.6") * Decimal("0.14")
    assert parts.cached_input == Decimal("0.4") * Decimal("0.0028")
    assert parts.output == Decimal("0.5") * Decimal("0.28")
    assert parts.total == cost(usage, price)


def test_override_window_replaces_the_tables() -> None:
    override = PriceOverride(
        off_peak_start=time(2, 0), off_peak_end=time(3, 0), off_peak_discount=Decimal("0.8")
    )
    price = resolve_price(DEEPSEEK, "deepseek-v4-flash", override)
    assert price is not None
    assert price.off_peak == OffPeak(start=time(2), end=time(3), discount=Decimal("0.8"))
    kept = resolve_price(DEEPSEEK, "deepseek-v4-flash", PriceOverride(output=Decimal(1)))
    assert kept is not None
    assert kept.off_peak is not None
    assert kept.off_peak.start == time(16, 30)


JOB = """
name = "x"
[input]
path = "in.parquet"
[request]
prompt = "{text}"
[output]
path = "out.parquet"
[pricing]
"""


def test_job_file_off_peak_keys() -> None:
    job = parse_job(
        JOB + 'off_peak_start = "16:30"\noff_peak_end = "00:30"\noff_peak_discount = 0.5\n'
    )
    assert job.pricing is not None
    assert job.pricing.off_peak_start == time(16, 30)
    assert job.pricing.off_peak_end == time(0, 30)
    assert job.pricing.off_peak_discount == HALF
    full = parse_job(
        JOB + 'off_peak_start = "00:00"\noff_peak_end = "23:59"\noff_peak_discount = 1\n'
    )
    assert full.pricing is not None
    assert full.pricing.off_peak_discount == 1


@pytest.mark.parametrize(
    ("lines", "key", "words"),
    [
        ('off_peak_start = "16:30"\noff_peak_discount = 0.5', "[pricing] off_peak_end", "together"),
        ('off_peak_end = "16:30"', "[pricing] off_peak_start", "together"),
        (
            'off_peak_start = "4pm"\noff_peak_end = "00:30"\noff_peak_discount = 0.5',
            "[pricing] off_peak_start",
            "HH:MM",
        ),
        (
            'off_peak_start = "16:30"\noff_peak_end = "24:00"\noff_peak_discount = 0.5',
            "[pricing] off_peak_end",
            "HH:MM",
        ),
        (
            'off_peak_start = "16:30"\noff_peak_end = "00:30"\noff_peak_discount = 0',
            "[pricing] off_peak_discount",
            "greater than 0",
        ),
        (
            'off_peak_start = "16:30"\noff_peak_end = "00:30"\noff_peak_discount = 1.5',
            "[pricing] off_peak_discount",
            "less than or equal to 1",
        ),
        (
            'off_peak_start = "16:30"\noff_peak_end = "16:30"\noff_peak_discount = 0.5',
            "[pricing] off_peak_end",
            "empty",
        ),
        ("off_peak_strat = 1", "[pricing] off_peak_strat", "off_peak_start"),
    ],
)
def test_job_file_off_peak_mistakes_name_the_key(lines: str, key: str, words: str) -> None:
    with pytest.raises(JobFileError) as info:
        parse_job(JOB + lines + "\n", "jobs/x.toml")
    assert info.value.key == key
    assert words in str(info.value)
    assert str(info.value).startswith(f"jobs/x.toml: {key}: ")
