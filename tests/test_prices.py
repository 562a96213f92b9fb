"""Prices for the models people use: genai-prices under the built-in table and [pricing],
``pipeline prices``, ``--price``, and OpenAI token counts with tiktoken (offline only)."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price

from pipeline.cli.commands import cli
from pipeline.money import catalog
from pipeline.money.pricing import (
    BUILTIN_AS_OF,
    OffPeak,
    PriceOverride,
    Usage,
    builtin_price,
    cost,
    parse_price,
    price_at,
    quote_price,
    resolve_price,
    table_quotes,
)
from pipeline.rows import openai_tokens, tokens
from pipeline.server.process import server_stats

OPENAI = "https://api.openai.com/v1"
DEEPSEEK = "https://api.deepseek.com"
GOOGLE = "https://generativelanguage.googleapis.com/v1beta/openai/"
LOOPBACK = "http://127.0.0.1:8000/v1"
GENAI = f"genai-prices {catalog.version()}"
NOON = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def invoke(*args: str | Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


# -- genai-prices: the models people use have prices now ------------------------------------


def test_gpt_4o_mini_and_deepseek_chat_are_priced_by_genai_prices() -> None:
    mini = quote_price(OPENAI, "gpt-4o-mini", None)
    assert mini is not None
    assert mini.source == GENAI
    assert (mini.provider, mini.model) == ("openai", "gpt-4o-mini")
    assert (mini.price.input, mini.price.cached_input, mini.price.output) == (
        Decimal("0.15"),
        Decimal("0.075"),
        Decimal("0.6"),
    )
    chat = quote_price(DEEPSEEK, "deepseek-chat", None)
    assert chat is not None
    assert chat.source == GENAI
    assert chat.price.input > 0
    assert chat.price.cached_input < chat.price.input


@pytest.mark.parametrize(
    ("base_url", "model", "provider"),
    [(OPENAI, "gpt-4o-mini", "openai"), (DEEPSEEK, "deepseek-chat", "deepseek")],
)
@pytest.mark.parametrize("hour", [3, 12, 20])
def test_costs_equal_what_genai_prices_itself_computes(
    base_url: str, model: str, provider: str, hour: int
) -> None:
    """Same usage, same instant: our exact cost equals genai-prices' own calculation
    (deepseek-chat's off-peak hours included, through our off-peak window)."""
    when = NOON.replace(hour=hour)
    price = resolve_price(base_url, model, None)
    assert price is not None
    ours = cost(
        Usage(prompt_tokens=10_000, cached_tokens=3_000, completion_tokens=2_500),
        price_at(price, when),
    )
    theirs = calc_price(
        GenaiUsage(input_tokens=10_000, cache_read_tokens=3_000, output_tokens=2_500),
        model,
        provider_id=provider,
        genai_request_timestamp=when,
    ).total_price
    assert ours == theirs


def test_a_daily_half_price_window_becomes_an_off_peak_window() -> None:
    price = resolve_price(DEEPSEEK, "deepseek-chat", None)
    assert price is not None
    assert price.off_peak is not None
    assert price.off_peak.discount == Decimal("0.5")
    assert price.off_peak.contains(datetime(2026, 1, 1, 20, 0).time())
    assert not price.off_peak.contains(datetime(2026, 1, 1, 12, 0).time())


def test_the_endpoint_picks_the_provider_and_loopback_uses_the_model_id() -> None:
    assert resolve_price(LOOPBACK, "gpt-4o-mini", None) == resolve_price(
        OPENAI, "gpt-4o-mini", None
    )
    assert resolve_price(LOOPBACK, "openai/gpt-4o-mini", None) == resolve_price(
        OPENAI, "gpt-4o-mini", None
    )
    # A dated alias matches the model it names.
    dated = quote_price(OPENAI, "gpt-4o-mini-2024-07-18", None)
    assert dated is not None
    assert dated.model == "gpt-4o-mini"
    # A host no table knows has no price (a self-hosted model is not OpenAI's price).
    assert resolve_price("https://llm.example.com/v1", "gpt-4o-mini", None) is None
    assert resolve_price(OPENAI, "no-such-model-anywhere", None) is None


def test_tiered_prices_use_the_base_tier_and_say_so() -> None:
    quote = quote_price(GOOGLE, "gemini-2.5-pro", None)
    assert quote is not None
    assert quote.prompt_limit == 200_000
    assert any("tiered" in note and "200,000" in note for note in quote.notes)
    short = calc_price(
        GenaiUsage(input_tokens=1_000, output_tokens=1_000), "gemini-2.5-pro", provider_id="google"
    ).total_price
    assert cost(Usage(prompt_tokens=1_000, completion_tokens=1_000), quote.price) == short


def test_time_of_day_prices_one_window_cannot_show_take_the_days_highest() -> None:
    quote = quote_price(DEEPSEEK, "deepseek-v4-pro", None)
    assert quote is not None
    assert quote.price.off_peak is None
    assert any("highest" in note for note in quote.notes)
    hourly = [
        calc_price(
            GenaiUsage(input_tokens=1_000_000, output_tokens=0),
            "deepseek-v4-pro",
            provider_id="deepseek",
            genai_request_timestamp=datetime.now(UTC).replace(hour=h, minute=30),
        ).total_price
        for h in range(24)
    ]
    assert quote.price.input == max(hourly)
    assert len(set(hourly)) > 1


# -- precedence: [pricing] > built-in table > genai-prices ----------------------------------


def test_the_built_in_table_wins_over_genai_prices() -> None:
    quotes = table_quotes(DEEPSEEK, "deepseek-v4-flash")
    assert [q.source for q in quotes] == ["built-in table", GENAI]
    winner = quote_price(DEEPSEEK, "deepseek-v4-flash", None)
    assert winner is not None
    assert winner.price == builtin_price(DEEPSEEK, "deepseek-v4-flash")
    assert winner.as_of == BUILTIN_AS_OF
    assert winner.price.off_peak == OffPeak(
        start=datetime(2026, 1, 1, 16, 30).time(),
        end=datetime(2026, 1, 1, 0, 30).time(),
        discount=Decimal("0.5"),
    )


def test_pricing_wins_over_both_tables() -> None:
    whole = PriceOverride(input=Decimal(1), cached_input=Decimal("0.5"), output=Decimal(2))
    cases = [
        # The built-in table still gives DeepSeek's off-peak window, and the source says so.
        (DEEPSEEK, "deepseek-v4-flash", "job [pricing] over built-in table"),
        (OPENAI, "gpt-4o-mini", "job [pricing]"),
    ]
    for base_url, model, source in cases:
        quote = quote_price(base_url, model, whole)
        assert quote is not None
        assert (quote.price.input, quote.price.cached_input, quote.price.output) == (
            Decimal(1),
            Decimal("0.5"),
            Decimal(2),
        )
        assert quote.source == source
        table = table_quotes(base_url, model)[0].price
        assert quote.price.off_peak == table.off_peak
    # Parts the override leaves out come from the table that would have won, and say so.
    part = quote_price(OPENAI, "gpt-4o-mini", PriceOverride(output=Decimal(9)))
    assert part is not None
    assert part.source == f"job [pricing] over {GENAI}"
    assert (part.price.input, part.price.output) == (Decimal("0.15"), Decimal(9))


def test_price_flag_wins_over_the_jobs_pricing() -> None:
    job = PriceOverride(input=Decimal(5), output=Decimal(6))
    flag = parse_price("input=0.15,output=0.60,cached_input=0.075")
    merged = flag.over(job)
    assert (merged.input, merged.cached_input, merged.output) == (
        Decimal("0.15"),
        Decimal("0.075"),
        Decimal("0.60"),
    )
    assert merged.origin == "--price over job [pricing]"
    quote = quote_price("https://llm.example.com/v1", "mine", merged)
    assert quote is not None
    assert quote.price.input == Decimal("0.15")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("input=0.15", "output missing"),
        ("input=abc,output=1", "not a price"),
        ("input=-1,output=1", "not a price"),
        ("input=nan,output=1", "not a price"),
        ("inptu=1,output=1", "not KEY=USD"),
        ("0.15,0.60", "not KEY=USD"),
        ("input=1,input=2,output=1", "twice"),
        ("", "not KEY=USD"),
    ],
)
def test_parse_price_rejects_nonsense(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_price(text)


# -- pipeline prices ---------------------------------------------------------------------------


def test_prices_command_names_the_source_and_the_date() -> None:
    code, out, _ = invoke("prices", "gpt-4o-mini")
    assert code == 0, out
    assert "$0.15 per million tokens" in out
    assert f"source       {GENAI} (openai: gpt-4o-mini)" in out
    newest = catalog.data_date(datetime.now(UTC).date())
    assert newest is not None
    assert f"newest price change is of {newest:%Y-%m-%d}" in out
    code, out, _ = invoke("prices", "deepseek-v4-flash", "--base-url", DEEPSEEK)
    assert code == 0, out
    assert "source       built-in table (deepseek: deepseek-v4-flash)" in out
    assert f"date         checked {BUILTIN_AS_OF:%Y-%m-%d}" in out
    assert f"overrides    {GENAI}:" in out


def test_prices_command_json_and_a_job_files_pricing(tmp_path: Path) -> None:
    code, out, _ = invoke("prices", "gpt-4o-mini", "--base-url", OPENAI, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["price"]["source"] == GENAI
    assert data["price"]["output"] == "0.6"
    assert data["genai_prices"]["version"] == catalog.version()
    assert data["genai_prices"]["updated_online"] is False
    job = tmp_path / "job.toml"
    job.write_text(
        textwrap.dedent(
            """
            name = "x"
            [input]
            path = "in.parquet"
            [request]
            base_url = "https://api.openai.com/v1"
            model = "gpt-4o-mini"
            prompt = "{text}"
            [output]
            path = "out.parquet"
            [pricing]
            input = 0.1
            cached_input = 0.05
            output = 0.4
            """
        )
    )
    code, out, _ = invoke("prices", "--job", job, "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["price"]["source"] == "job [pricing]"
    assert data["price"]["input"] == "0.1"
    assert [q["source"] for q in data["wins_over"]] == [GENAI]


def test_prices_command_says_did_you_mean() -> None:
    code, out, err = invoke("prices", "gpt-4o-mnii")
    assert code == 1
    assert out == ""
    assert "no price is known for 'gpt-4o-mnii'" in err
    assert "Did you mean gpt-4o-mini" in err


def test_prices_command_lists_a_providers_prices() -> None:
    code, out, _ = invoke("prices", "--base-url", DEEPSEEK)
    assert code == 0
    lines = out.splitlines()
    flash = [line for line in lines if line.startswith("deepseek  deepseek-v4-flash")]
    assert len(flash) == 1  # the built-in table's, not genai-prices' too
    assert "built-in table" in flash[0]
    assert any(line.startswith("deepseek  deepseek-chat") and GENAI in line for line in lines)
    code, _, err = invoke("prices", "--base-url", "https://llm.example.com/v1")
    assert code == 1
    assert "no price table knows" in err


# -- --price on run and estimate ----------------------------------------------------------------

MODEL = "acme/tiny-1"  # no table prices it: only --price can


def write_batch(path: Path, rows: int) -> Path:
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "max_tokens": 16,
                "messages": [{"role": "user", "content": f"Label review number {i}."}],
            },
        }
        for i in range(rows)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return write_batch(tmp_path / "batch.jsonl", 40)


KEY = {"OPENAI_API_KEY": "sk-test"}


def test_price_gives_a_bare_batch_file_costs_and_a_budget(
    batch: Path, tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=1, served_models=(MODEL,))
    code, _, err = invoke("run", batch, "--base-url", base, "--max-cost", "1", env=KEY)
    assert code == 2
    assert "needs a price" in err
    assert server_stats(base)["requests_total"] == 0

    out = tmp_path / "priced.parquet"
    price = "input=0.15,output=0.60"
    code, _, err = invoke(
        "run", batch, "--base-url", base, "--output", out, "--price", price, "--max-cost", "1",
        env=KEY,
    )  # fmt: skip
    assert code == 0, err
    table = pl.read_parquet(out)
    assert table.height == 40
    for row in table.iter_rows(named=True):
        expected = (
            Decimal(row["prompt_tokens"]) * Decimal("0.15")
            + Decimal(row["completion_tokens"]) * Decimal("0.60")
        ) / 1_000_000
        assert row["cost_usd"] == pytest.approx(float(expected), rel=1e-12)
        assert row["cost_usd"] > 0


def budget_run(
    batch: Path, base: str, cap: Decimal, *in_flight: str
) -> tuple[int, str, int, Decimal]:
    """Run ``batch`` at $1/$2 per million under ``cap``: exit code, stderr, requests the
    server saw, and the job's spend."""
    code, _, err = invoke(
        "run", batch, "--base-url", base, *in_flight, "--price", "input=1,output=2",
        "--max-cost", str(cap), env=KEY,
    )  # fmt: skip
    sent = server_stats(base)["requests_total"]
    status_code, out, _ = invoke("status", batch, "--json")
    assert status_code == 0, out
    spent = Decimal(json.loads(out[out.index("{") :])["spent"]["cost_usd"])
    return code, err, sent, spent


# A request costs its prompt (~13 tokens) and up to 16 output tokens at $1/$2 per million:
# about $0.00003-0.000045; a cap of $0.0002 lets a few through and stops the rest.
CAP = Decimal("0.0002")


def test_price_budget_stops_a_bare_batch_file(
    batch: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=1, served_models=(MODEL,))
    code, err, sent, spent = budget_run(batch, base, CAP, "--max-in-flight", "1")
    assert code == 4, err
    assert "stopped at the budget" in err
    assert 0 < sent < 40
    assert spent > CAP / 2


def test_price_budget_is_never_passed_by_a_bare_batch_file(
    batch: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=1, served_models=(MODEL,))
    code, err, _, spent = budget_run(batch, base, CAP)
    assert code == 4, err
    assert spent <= CAP


@pytest.mark.parametrize("command", ["run", "estimate", "prices"])
@pytest.mark.parametrize("value", ["input=0.15", "input=x,output=1", "cheap"])
def test_a_bad_price_is_one_line_and_exit_code_2(batch: Path, command: str, value: str) -> None:
    args: list[str | Path] = [command]
    # Nothing listens there: the flag is refused before anything is sent.
    args += (
        ["gpt-4o-mini"] if command == "prices" else [batch, "--base-url", "http://127.0.0.1:9/v1"]
    )
    code, out, err = invoke(*args, "--price", value, env=KEY)
    assert code == 2
    assert out == ""
    assert err.startswith(f"error: --price {value!r}: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_estimate_uses_the_price_flag(batch: Path) -> None:
    code, out, _ = invoke("estimate", batch, "--price", "input=1,output=2", "--json")
    assert code == 0, out
    data = json.loads(out[out.index("{") :])
    assert data["cost_usd"]["price"]["input"] == "1"
    assert data["cost_usd"]["price_source"]["source"] == "--price"
    code, out, _ = invoke("estimate", batch, "--json")
    data = json.loads(out[out.index("{") :])
    assert data["cost_usd"]["price"] is None


# -- token counts: tiktoken offline, or the heuristic, labelled ------------------------------

COOKBOOK = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on "
        "opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]


@pytest.mark.parametrize(
    ("model", "encoding", "prompt_tokens"),
    [
        ("gpt-4o-mini", "o200k_base", 124),
        ("gpt-4o", "o200k_base", 124),
        ("gpt-4", "cl100k_base", 129),
    ],
)
def test_openai_chat_counts_equal_what_the_api_reported(
    model: str, encoding: str, prompt_tokens: int
) -> None:
    """OpenAI's cookbook ("How to count tokens with tiktoken") sent these messages to the API,
    which reported 124 prompt tokens for gpt-4o and gpt-4o-mini, 129 for gpt-4."""
    assert tokens.count_method(model) == tokens.CountMethod("tiktoken", encoding)
    assert tokens.count_method(model).label == f"exact (tiktoken {encoding})"
    body = {"model": model, "messages": COOKBOOK}
    assert tokens.count_prompt_tokens([body]) == [prompt_tokens]


def test_encoding_constants_are_tiktokens_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our split patterns and special tokens are exactly what tiktoken's constructors give:
    fed the same verified file through its cache, so nothing is downloaded."""
    from tiktoken_ext import openai_public  # type: ignore[import-untyped]

    for name, spec in openai_tokens.SPECS.items():
        found = openai_tokens.find_file(name)
        assert found is not None
        cached = tmp_path / hashlib.sha1(spec.url.encode()).hexdigest()
        cached.write_bytes(found.data)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    for name, spec in openai_tokens.SPECS.items():
        theirs = getattr(openai_public, name)()
        ours = openai_tokens.encoding(name)
        assert ours is not None
        assert theirs["pat_str"] == spec.pat_str == ours._pat_str
        assert theirs["special_tokens"] == spec.special_tokens == ours._special_tokens
        assert theirs["mergeable_ranks"] == ours._mergeable_ranks


@pytest.fixture
def no_shipped_encodings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No package ships the encodings and tiktoken's cache is an empty folder (returned)."""

    def clear() -> None:
        for cached in (
            openai_tokens.encoding,
            openai_tokens.missing_reason,
            tokens.count_method,
        ):
            cached.cache_clear()

    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setattr(openai_tokens, "DATA_PACKAGE", "no_such_package_here")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    clear()
    yield cache
    monkeypatch.undo()
    clear()


def test_without_an_offline_encoding_openai_models_get_the_heuristic_labelled(
    no_shipped_encodings: Path,
) -> None:
    method = tokens.count_method("gpt-4o-mini")
    assert method.kind == "heuristic"
    assert method.reason is not None
    assert "no offline copy of tiktoken's o200k_base" in method.reason
    body = {"model": "gpt-4o-mini", "messages": COOKBOOK}
    assert tokens.count_prompt_tokens([body]) == [tokens.heuristic_prompt_tokens(body)]


def test_tiktokens_cache_is_used_and_a_corrupt_file_is_not(no_shipped_encodings: Path) -> None:
    spec = openai_tokens.SPECS["o200k_base"]
    cached = no_shipped_encodings / hashlib.sha1(spec.url.encode()).hexdigest()
    cached.write_bytes(b"not the encoding")
    assert openai_tokens.find_file("o200k_base") is None
    real = gzip.decompress(_shipped("o200k_base").read_bytes())
    cached.write_bytes(real)
    found = openai_tokens.find_file("o200k_base")
    assert found is not None
    assert found.where == "tiktoken cache"
    assert tokens.count_method("gpt-4o-mini") == tokens.CountMethod("tiktoken", "o200k_base")


def _shipped(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("bpe_openai")
    assert spec is not None
    assert spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.tiktoken.gz"


def estimate_json(*args: str | Path) -> dict[str, Any]:
    code, out, err = invoke("estimate", *args, "--json")
    assert code == 0, err
    data: dict[str, Any] = json.loads(out[out.index("{") :])
    return data


def test_estimate_says_tiktoken_or_heuristic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": COOKBOOK, "max_tokens": 10}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    openai_file = tmp_path / "openai.jsonl"
    openai_file.write_text(json.dumps(line) + "\n")
    data = estimate_json(openai_file, "--base-url", OPENAI)
    assert data["token_count"] == "exact (tiktoken o200k_base)"
    assert data["input_tokens"]["total"] == 124
    assert data["cost_usd"]["price_source"]["source"] == GENAI
    assert not [w for w in data["warnings"] if "heuristic" in w]

    llama = tmp_path / "llama.jsonl"
    other = {**line, "body": {**body, "model": "meta-llama/Llama-3.1-8B"}}
    llama.write_text(json.dumps(other) + "\n")
    data = estimate_json(llama)
    assert data["token_count"] == "heuristic"
    assert any("estimate (heuristic)" in w for w in data["warnings"])


def test_estimate_labels_the_fallback_when_no_encoding_is_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_shipped_encodings: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": COOKBOOK, "max_tokens": 10},
    }
    path = tmp_path / "openai.jsonl"
    path.write_text(json.dumps(line) + "\n")
    data = estimate_json(path)
    assert data["token_count"] == "heuristic"
    assert any("o200k_base" in note for note in data["input_tokens"]["count_notes"])
    assert any("no offline copy" in w for w in data["warnings"])


# -- no network: neither a price lookup nor an OpenAI token count opens a socket --------------

NO_NETWORK = """
import sys

def refuse(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.__new__"):
        raise RuntimeError(f"network used: {event} {args!r}")

sys.addaudithook(refuse)
from pipeline.money.pricing import resolve_price, table_quotes
from pipeline.rows import tokens
assert resolve_price("https://api.openai.com/v1", "gpt-4o-mini", None) is not None
assert len(table_quotes("https://api.deepseek.com", "deepseek-v4-flash")) == 2
body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
assert tokens.count_method("gpt-4o-mini").kind == "tiktoken"
print(tokens.count_prompt_tokens([body])[0])
"""


def test_prices_and_openai_counts_use_no_network() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_NETWORK], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 3 + 1 + 1 + 3  # framing, "user", "hello", reply priming
