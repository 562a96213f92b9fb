"""The built-in server: its pure logic, then the real thing over HTTP on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pyarrow.parquet as pq
import pytest
from test_simulate import answer_conforms

from pipeline import run_job_report
from pipeline.errors import ProviderError
from pipeline.rows import tokens
from pipeline.server.command import serve_command
from pipeline.server.faults import ServerOutcome, always_rejected, body_digest, draw_fault
from pipeline.server.options import API_KEY_ENV, ServerOptions
from pipeline.server.process import LocalServer, reset_server_stats, server_argv, server_stats
from pipeline.server.ratelimit import RateLimiter, format_duration
from pipeline.server.requests import (
    ChatRequest,
    InvalidRequest,
    parse_chat_request,
    prompt_token_ids,
    reply_seed,
)
from pipeline.server.simulate import make_reply, reply_pieces, vocabulary
from pipeline.server.stats import ServerStats

MODEL = "deepseek-v4-flash"
DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")


def chat_body(text: str, *, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def request_of(body: dict[str, Any]) -> ChatRequest:
    return parse_chat_request(json.dumps(body).encode())


# ---------------------------------------------------------------------------------------------
# Pure logic


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0004, "1ms"),
        (0.12, "120ms"),
        (1, "1s"),
        (8.64, "8.64s"),
        (360, "6m0s"),
        (3725.5, "1h2m5.5s"),
    ],
)
def test_format_duration_writes_openai_durations(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_request_bucket_refills_over_sixty_seconds() -> None:
    limiter = RateLimiter(rpm=2, tpm=0, now=0.0)
    first = limiter.admit(10, 0.0)
    assert first.allowed
    assert dict(first.headers)[b"x-ratelimit-remaining-requests"] == b"1"
    assert dict(first.headers)[b"x-ratelimit-reset-requests"] == b"30s"
    assert limiter.admit(10, 0.0).allowed
    refused = limiter.admit(10, 0.0)
    assert not refused.allowed
    assert (refused.limited_by, refused.retry_after_s) == ("requests", 30)
    assert not limiter.admit(10, 29.0).allowed
    assert limiter.admit(10, 30.0).allowed


def test_token_bucket_charges_prompt_plus_max_tokens() -> None:
    limiter = RateLimiter(rpm=0, tpm=1000, now=0.0)
    first = limiter.admit(600, 0.0)
    headers = dict(first.headers)
    assert headers[b"x-ratelimit-remaining-tokens"] == b"400"
    assert headers[b"x-ratelimit-reset-tokens"] == b"36s"
    assert b"x-ratelimit-limit-requests" not in headers  # rpm is off
    refused = limiter.admit(600, 0.0)
    assert (refused.allowed, refused.limited_by, refused.retry_after_s) == (False, "tokens", 12)
    assert limiter.admit(600, 12.0).allowed


def test_a_one_second_window_holds_one_second_of_the_minute() -> None:
    limiter = RateLimiter(rpm=6000, tpm=0, now=0.0, window_s=1.0)  # 100 at once, 100 per s
    granted = [limiter.admit(10, 0.0) for _ in range(101)]
    assert [d.allowed for d in granted] == [True] * 100 + [False]
    assert dict(granted[0].headers)[b"x-ratelimit-limit-requests"] == b"6000"  # per minute
    assert dict(granted[99].headers)[b"x-ratelimit-remaining-requests"] == b"0"
    assert (granted[100].limited_by, granted[100].retry_after_s) == ("requests", 1)
    assert limiter.admit(10, 0.01).allowed  # 100 per second: one more every 10 ms
    assert not limiter.admit(10, 0.01).allowed
    # Within the minute (6,000) but over the second: the default window would allow it.
    per_minute = RateLimiter(rpm=6000, tpm=0, now=0.0)
    assert all(per_minute.admit(10, 0.0).allowed for _ in range(101))


def test_the_rate_window_must_be_within_a_minute() -> None:
    with pytest.raises(ValueError, match="rate_window_s"):
        ServerOptions(rate_window_s=0)
    with pytest.raises(ValueError, match="window_s"):
        RateLimiter(rpm=10, tpm=0, now=0.0, window_s=61)


def test_fault_probabilities_add_up_in_order() -> None:
    options = ServerOptions(fault_500=0.1, fault_drop=0.2)
    assert draw_fault(options, 0.05) is ServerOutcome.SERVER_ERROR
    assert draw_fault(options, 0.1) is ServerOutcome.DROP
    assert draw_fault(options, 0.299) is ServerOutcome.DROP
    assert draw_fault(options, 0.31) is None
    assert draw_fault(ServerOptions(), 0.0) is None


def test_fault_400_rejects_a_fixed_fraction_of_bodies() -> None:
    bodies = [json.dumps(chat_body(f"row {i}")).encode() for i in range(4000)]
    rejected = [always_rejected(body_digest(body, seed=7), 0.25) for body in bodies]
    assert 0.22 < sum(rejected) / len(bodies) < 0.28
    again = [always_rejected(body_digest(body, seed=7), 0.25) for body in bodies]
    assert rejected == again
    assert rejected != [always_rejected(body_digest(b, seed=8), 0.25) for b in bodies]


def test_stats_histogram_counts_sends_per_body() -> None:
    stats = ServerStats()
    for key in (b"a", b"b", b"a", b"a", b"c", b"c"):
        stats.record_send(key)
    snapshot = stats.snapshot()
    assert snapshot["distinct_requests"] == 3
    assert snapshot["max_sends_per_request"] == 3
    assert snapshot["sends_histogram"] == {"1": 1, "2": 1, "3": 1}
    assert stats.try_enter(2)
    assert stats.try_enter(2)
    assert not stats.try_enter(2)
    stats.leave()
    stats.reset()
    assert stats.snapshot()["sends_histogram"] == {}
    assert stats.snapshot()["max_in_flight_seen"] == 1  # one request is still in flight


def test_every_reply_piece_is_one_token() -> None:
    vocab = vocabulary()
    pieces = [*vocab.words, *vocab.starters, *vocab.openers, vocab.period, vocab.comma]
    assert set(tokens.count_text_tokens(pieces)) == {1}
    assert len(vocab.words) > 100


def test_reply_token_counts_equal_real_tokenization() -> None:
    options = ServerOptions()
    vocab = vocabulary()
    rng = random.Random(1)
    replies = []
    for i in range(300):
        body = chat_body(f"question {i} (json)", max_tokens=rng.choice([1, 2, 5, 17, 64, 300]))
        if i % 3 == 0:
            body["thinking"] = {"type": "disabled"}
        if i % 5 == 0:
            body["response_format"] = {"type": "json_object"}
        request = request_of(body)
        reply = make_reply(request, random.Random(i), options, vocab)
        replies.append((request, reply))
    texts = [text for _, r in replies for text in (r.content, r.reasoning or "")]
    counts = tokens.count_text_tokens(texts)
    for index, (request, reply) in enumerate(replies):
        assert (reply.content_tokens, reply.reasoning_tokens) == tuple(
            counts[2 * index : 2 * index + 2]
        )
        assert reply.completion_tokens <= request.max_tokens
        if reply.finish_reason == "length":
            assert reply.completion_tokens == request.max_tokens
    reasons = Counter(reply.finish_reason for _, reply in replies)
    assert reasons["length"] > 20
    assert reasons["stop"] > 20


def test_reply_text_reads_as_sentences() -> None:
    text = "".join(reply_pieces(random.Random(3), vocabulary(), 40))
    assert text[0].isupper()
    assert text.endswith(".")
    assert tokens.count_text_tokens([text]) == [40]


def test_reply_seed_depends_on_model_messages_and_seed() -> None:
    request = request_of(chat_body("hello"))
    assert reply_seed(request, 0) == reply_seed(request_of(chat_body("hello")), 0)
    assert reply_seed(request, 0) != reply_seed(request, 1)
    assert reply_seed(request, 0) != reply_seed(request_of(chat_body("hello!")), 0)
    assert reply_seed(request, 0) != reply_seed(request_of(chat_body("hello", model="x")), 0)


@pytest.mark.parametrize(
    "body",
    [
        chat_body("plain"),
        chat_body("no thinking", thinking={"type": "disabled"}),
        chat_body("effort", reasoning_effort="max"),
        {
            "model": "deepseek/deepseek-v4-flash",
            "messages": [
                {"role": "system", "content": "You label reviews."},
                {"role": "user", "content": [{"type": "text", "text": "Great phone"}]},
                {"role": "assistant", "content": "positive"},
                {"role": "user", "content": "And this one: 不好用 😞"},
            ],
        },
        chat_body("an estimate for other models", model="gpt-4o-mini"),
    ],
)
def test_prompt_tokens_equal_the_clients_count(body: dict[str, Any]) -> None:
    count, ids = prompt_token_ids(request_of(body))
    assert count == tokens.count_prompt_tokens([body])[0]
    assert (ids is None) == (body["model"] == "gpt-4o-mini")


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{not json", None),
        (b"[]", None),
        (json.dumps({"model": MODEL}).encode(), "messages"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model"),
        (json.dumps({"model": MODEL, "messages": []}).encode(), "messages"),
        (json.dumps({"model": MODEL, "messages": ["hi"]}).encode(), "messages[0]"),
        (json.dumps(chat_body("x", max_tokens=0)).encode(), "max_tokens"),
        (json.dumps(chat_body("x", max_completion_tokens="9")).encode(), "max_completion_tokens"),
        (json.dumps(chat_body("x", stream=True)).encode(), "stream"),
    ],
)
def test_invalid_bodies_are_refused(raw: bytes, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_chat_request(raw)
    assert caught.value.param == param


def test_thinking_defaults_follow_the_model() -> None:
    assert request_of(chat_body("x")).thinking
    assert not request_of(chat_body("x", model="gpt-4o-mini")).thinking
    assert request_of(chat_body("x", model="gpt-4o-mini", reasoning_effort="high")).thinking
    assert not request_of(chat_body("x", thinking={"type": "disabled"})).thinking


@pytest.mark.parametrize(
    "changes",
    [
        {"fault_500": 1.5},
        {"fault_500": 0.6, "fault_drop": 0.6},
        {"profile": "anthropic"},
        {"latency_ms": -1},
        {"reasoning_min_tokens": 10, "reasoning_max_tokens": 5},
    ],
)
def test_options_are_validated(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(changes)).split("_")[0]):
        ServerOptions(**changes)


def test_server_argv_round_trips_through_the_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    options = ServerOptions(
        profile="openai", rpm=5, fault_drop=0.25, reject_substring="-x y", api_key="sk-secret"
    )
    argv = server_argv(options)
    assert "sk-secret" not in " ".join(argv)
    assert "sk-secret" not in repr(options)
    args = serve_command.make_context("serve", ["--port", "0", *argv]).params
    fields = dataclasses.fields(ServerOptions)
    parsed = ServerOptions(**{f.name: args[f.name] for f in fields})
    assert parsed == dataclasses.replace(options, api_key="")


# ---------------------------------------------------------------------------------------------
# Over HTTP: one shared default server


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    local = LocalServer(ServerOptions(latency_ms=1, keepalive_after_ms=1000))
    local.start()
    yield local
    local.stop()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as http:
        yield http


def post(client: httpx.Client, base_url: str, body: dict[str, Any]) -> httpx.Response:
    return client.post(f"{base_url}/chat/completions", json=body)


def test_models_lists_the_model_ids(server: LocalServer, client: httpx.Client) -> None:
    reply = client.get(f"{server.base_url}/models")
    assert reply.status_code == 200
    ids = [model["id"] for model in reply.json()["data"]]
    assert ids == ["deepseek/deepseek-v4-flash", "deepseek-v4-flash", "gpt-4o-mini"]


def test_reply_has_openai_shape_and_exact_prompt_tokens(
    server: LocalServer, client: httpx.Client
) -> None:
    bodies = [
        chat_body("Classify: the battery died after a week."),
        {**chat_body("Same without thinking."), "thinking": {"type": "disabled"}},
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a colour."},
            ],
        },
    ]
    for body in bodies:
        reply = post(client, server.base_url, body)
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "application/json"
        data = reply.json()
        assert data["id"].startswith("chatcmpl-")
        assert (data["object"], data["model"]) == ("chat.completion", body["model"])
        assert isinstance(data["created"], int)
        usage = data["usage"]
        assert usage["prompt_tokens"] == tokens.count_prompt_tokens([body])[0]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        message = data["choices"][0]["message"]
        assert message["role"] == "assistant"
        reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
        assert ("reasoning_content" in message) == (reasoning > 0)
        assert (
            usage["prompt_cache_hit_tokens"] + usage["prompt_cache_miss_tokens"]
            == (usage["prompt_tokens"])
        )
    assert (reasoning, "reasoning_content" in message) == (0, False)  # gpt-4o-mini: no thinking


def test_replies_are_deterministic(server: LocalServer, client: httpx.Client) -> None:
    body = chat_body("Tell me about determinism.", max_tokens=80)
    first, second = (post(client, server.base_url, body).json() for _ in range(2))
    other = post(client, server.base_url, chat_body("Tell me about chance.", max_tokens=80))
    assert first["choices"] == second["choices"]
    assert first["usage"]["completion_tokens"] == second["usage"]["completion_tokens"]
    assert first["id"] != second["id"]
    assert other.json()["choices"][0]["message"] != first["choices"][0]["message"]


def test_thinking_shares_the_budget(server: LocalServer, client: httpx.Client) -> None:
    data = post(client, server.base_url, chat_body("Think hard.", max_tokens=16)).json()
    choice, usage = data["choices"][0], data["usage"]
    assert (choice["finish_reason"], choice["message"]["content"]) == ("length", "")
    assert usage["completion_tokens"] == usage["completion_tokens_details"]["reasoning_tokens"]
    assert usage["completion_tokens"] == 16
    assert tokens.count_text_tokens([choice["message"]["reasoning_content"]]) == [16]


def test_replies_follow_max_tokens_exactly(server: LocalServer, client: httpx.Client) -> None:
    reasons: Counter[str] = Counter()
    for i in range(20):
        body = chat_body(f"Review {i}: fine.", max_tokens=40, thinking={"type": "disabled"})
        data = post(client, server.base_url, body).json()
        content = data["choices"][0]["message"]["content"]
        completion = data["usage"]["completion_tokens"]
        assert tokens.count_text_tokens([content]) == [completion]
        assert 12 <= completion <= 40  # at least reply_min_fraction (0.3) of the budget
        reasons[data["choices"][0]["finish_reason"]] += 1
        if data["choices"][0]["finish_reason"] == "length":
            assert completion == 40
    assert reasons == Counter({"stop": 20})  # truncate_rate is 0 by default


def test_some_replies_run_past_max_tokens_at_truncate_rate(
    local_server: Callable[..., str],
) -> None:
    base_url = local_server(truncate_rate=0.5, latency_ms=0)
    reasons: Counter[str] = Counter()
    with httpx.Client() as client:
        for i in range(40):
            body = chat_body(f"Review {i}: fine.", max_tokens=40, thinking={"type": "disabled"})
            data = post(client, base_url, body).json()
            reason = data["choices"][0]["finish_reason"]
            reasons[reason] += 1
            if reason == "length":
                assert data["usage"]["completion_tokens"] == 40
    assert 8 <= reasons["length"] <= 32
    assert reasons["stop"] >= 8


def test_json_mode_answers_a_json_object(server: LocalServer, client: httpx.Client) -> None:
    body = chat_body(
        "Label it in JSON.", response_format={"type": "json_object"}, thinking={"type": "disabled"}
    )
    data = post(client, server.base_url, body).json()
    answer = json.loads(data["choices"][0]["message"]["content"])
    assert answer["label"] in {"positive", "negative", "neutral", "mixed"}
    content = data["choices"][0]["message"]["content"]
    assert tokens.count_text_tokens([content]) == [data["usage"]["completion_tokens"]]


def test_prompt_cache_hits_a_repeated_long_prefix(
    server: LocalServer, client: httpx.Client
) -> None:
    prefix = "You are a careful annotator. " * 40  # about 240 tokens
    first = post(client, server.base_url, chat_body(prefix + "Row one."))
    second = post(client, server.base_url, chat_body(prefix + "Row two, longer."))
    assert first.json()["usage"]["prompt_cache_hit_tokens"] == 0
    usage = second.json()["usage"]
    hit = usage["prompt_cache_hit_tokens"]
    assert hit > 0
    assert hit % 64 == 0
    assert hit <= usage["prompt_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == hit
    assert usage["prompt_cache_miss_tokens"] == usage["prompt_tokens"] - hit
    other = post(client, server.base_url, chat_body(prefix + "Row three.", model="gpt-4o-mini"))
    assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_invalid_requests_get_openai_error_bodies(
    server: LocalServer, client: httpx.Client
) -> None:
    url = f"{server.base_url}/chat/completions"
    cases = [
        client.post(url, content=b"{oops", headers={"content-type": "application/json"}),
        client.post(url, json={"model": MODEL}),
        client.post(url, json=chat_body("x", stream=True)),
    ]
    for reply in cases:
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
    assert cases[1].json()["error"]["param"] == "messages"
    assert cases[2].json()["error"]["message"] == (
        "streaming is not supported by the built-in server"
    )
    root = server.base_url.removesuffix("/v1")
    assert client.post(f"{root}/chat/completions", json=chat_body("no prefix")).status_code == 200
    missing = client.get(f"{root}/v1/nothing")
    assert missing.status_code == 404
    assert "error" in missing.json()


def test_stats_count_sends_per_identical_body(server: LocalServer, client: httpx.Client) -> None:
    server.reset_stats()
    once = chat_body("sent once")
    thrice = chat_body("sent three times")
    for body in (thrice, once, thrice, thrice):
        assert post(client, server.base_url, body).status_code == 200
    post(client, server.base_url, {"model": MODEL})
    stats = server.stats()
    assert stats["requests_total"] == 5
    assert (stats["ok"], stats["400"]) == (4, 1)
    assert stats["distinct_requests"] == 3
    assert stats["max_sends_per_request"] == 3
    assert stats["sends_histogram"] == {"1": 2, "3": 1}
    assert stats["in_flight"] == 0
    assert (
        stats["prompt_tokens_total"]
        == 3 * tokens.count_prompt_tokens([thrice])[0] + (tokens.count_prompt_tokens([once])[0])
    )
    reset_server_stats(server.base_url)
    assert server_stats(server.base_url)["requests_total"] == 0


# ---------------------------------------------------------------------------------------------
# Over HTTP: the DeepSeek-like limits and keep-alive lines


@pytest.fixture(scope="module")
def capped_server() -> Iterator[LocalServer]:
    local = LocalServer(ServerOptions(latency_ms=300, max_concurrency=4))
    local.start()
    yield local
    local.stop()


async def _fire(base_url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    replies: list[httpx.Response] = []
    limits = httpx.Limits(max_connections=len(bodies))
    async with (
        httpx.AsyncClient(timeout=10, limits=limits) as http,
        anyio.create_task_group() as tg,
    ):
        for body in bodies:

            async def one(body: dict[str, Any] = body) -> None:
                replies.append(await http.post(f"{base_url}/chat/completions", json=body))

            tg.start_soon(one)
    return replies


def test_hidden_concurrency_cap_answers_429_without_headers(capped_server: LocalServer) -> None:
    capped_server.reset_stats()
    bodies = [chat_body(f"concurrent {i}", max_tokens=8) for i in range(12)]
    replies = anyio.run(_fire, capped_server.base_url, bodies)
    statuses = Counter(reply.status_code for reply in replies)
    assert statuses == {200: 4, 429: 8}
    for reply in replies:
        if reply.status_code == 429:
            assert reply.json()["error"]["type"] == "rate_limit_error"
            assert "retry-after" not in reply.headers
            assert not [name for name in reply.headers if name.startswith("x-ratelimit")]
    stats = capped_server.stats()
    assert (stats["max_in_flight_seen"], stats["429"], stats["ok"]) == (4, 8, 4)


def test_slow_replies_send_blank_lines_before_the_json(
    capped_server: LocalServer, client: httpx.Client
) -> None:
    body = chat_body("slow one", max_tokens=8)
    arrivals: list[tuple[float, bytes]] = []
    started = time.monotonic()
    with client.stream("POST", f"{capped_server.base_url}/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "application/json"
        arrivals.extend((time.monotonic() - started, chunk) for chunk in reply.iter_raw())
    raw = b"".join(chunk for _, chunk in arrivals)
    blank_lines = len(raw) - len(raw.lstrip(b"\n"))
    assert blank_lines >= 4  # 300 ms of latency, one line every 50 ms
    assert json.loads(raw)["choices"][0]["finish_reason"] in {"stop", "length"}
    assert arrivals[0][1].startswith(b"\n")
    assert arrivals[-1][0] - arrivals[0][0] > 0.15  # the first line came well before the JSON


# ---------------------------------------------------------------------------------------------
# Over HTTP: the OpenAI-like limits


def test_openai_profile_sends_rate_headers_and_retry_after(
    local_server: Callable[..., str], client: httpx.Client
) -> None:
    base_url = local_server(profile="openai", rpm=5, tpm=5000, latency_ms=1)
    first = post(client, base_url, chat_body("small", max_tokens=20))
    assert first.status_code == 200
    usage = first.json()["usage"]
    assert "prompt_cache_hit_tokens" not in usage
    assert "cached_tokens" in usage["prompt_tokens_details"]
    headers = first.headers
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-limit-tokens"]) == (
        "5",
        "5000",
    )
    assert headers["x-ratelimit-remaining-requests"] == "4"
    assert int(headers["x-ratelimit-remaining-tokens"]) == 5000 - usage["prompt_tokens"] - 20
    assert DURATION.match(headers["x-ratelimit-reset-requests"])
    assert DURATION.match(headers["x-ratelimit-reset-tokens"])

    too_many_tokens = post(client, base_url, chat_body("big", max_tokens=4980))
    assert too_many_tokens.status_code == 429
    assert too_many_tokens.json()["error"]["type"] == "tokens"
    assert int(too_many_tokens.headers["retry-after"]) >= 1

    remaining = [post(client, base_url, chat_body(f"small {i}", max_tokens=20)) for i in range(4)]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in remaining] == [
        "3",
        "2",
        "1",
        "0",
    ]
    refused = post(client, base_url, chat_body("one too many", max_tokens=20))
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 10 <= int(refused.headers["retry-after"]) <= 12  # one request refills in 12 s
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


# ---------------------------------------------------------------------------------------------
# Over HTTP: faults


def _observe(client: httpx.Client, base_url: str, body: dict[str, Any]) -> str:
    """What the client sees, checked to be the failure the fault intends."""
    try:
        reply = client.post(f"{base_url}/chat/completions", json=body, timeout=0.5)
    except httpx.ReadTimeout:
        return ServerOutcome.TIMEOUT
    except httpx.RemoteProtocolError:
        return ServerOutcome.DROP
    if reply.status_code == 200:
        try:
            reply.json()
        except ValueError:
            return ServerOutcome.MALFORMED
        return ServerOutcome.OK
    if reply.status_code in (500, 400):
        assert reply.headers["content-type"] == "application/json"
        kind = "server_error" if reply.status_code == 500 else "invalid_request_error"
        assert reply.json()["error"]["type"] == kind
        return str(reply.status_code)
    assert reply.headers["content-type"].startswith("text/html")
    assert reply.text.startswith("<html>")
    if reply.status_code == 503:
        assert "503 Service Temporarily Unavailable" in reply.text
        return ServerOutcome.UNAVAILABLE
    assert reply.status_code == 502
    assert "502 Bad Gateway" in reply.text
    return ServerOutcome.BAD_GATEWAY


@pytest.fixture(scope="module")
def faulty_server() -> Iterator[LocalServer]:
    options = ServerOptions(
        latency_ms=1,
        timeout_hang_s=2,
        fault_400=0.2,
        reject_substring="REJECT-ME",
        seed=3,
        fault_500=0.13,
        fault_503=0.13,
        fault_502_html=0.13,
        fault_drop=0.13,
        fault_malformed=0.13,
        fault_timeout=0.13,
    )
    local = LocalServer(options)
    local.start()
    yield local
    local.stop()


def test_each_fault_kind_is_visible_to_the_client(
    faulty_server: LocalServer, client: httpx.Client
) -> None:
    faulty_server.reset_stats()
    seen = Counter(
        _observe(client, faulty_server.base_url, chat_body(f"faulty {i}", max_tokens=8))
        for i in range(60)
    )
    assert set(seen) == {outcome.value for outcome in ServerOutcome} - {"429", "401"}
    stats = faulty_server.stats()
    for outcome, count in seen.items():
        assert stats[outcome] == count, outcome
    assert stats["requests_total"] == 60


def test_fault_400_and_reject_substring_always_fail(
    faulty_server: LocalServer, client: httpx.Client
) -> None:
    bodies = [chat_body(f"sticky {i}", max_tokens=8) for i in range(20)]
    rounds = [
        [_observe(client, faulty_server.base_url, body) == "400" for body in bodies]
        for _ in range(3)
    ]
    assert rounds[0] == rounds[1] == rounds[2]
    assert 1 <= sum(rounds[0]) <= 10
    targeted = chat_body("please REJECT-ME now")
    assert [_observe(client, faulty_server.base_url, targeted) for _ in range(3)] == ["400"] * 3


# ---------------------------------------------------------------------------------------------
# Over HTTP: the API key


def test_api_key_is_required_and_never_echoed(client: httpx.Client) -> None:
    key = "sk-test-SECRET-4242"
    local = LocalServer(ServerOptions(latency_ms=1, api_key=key))
    with local as base_url:
        assert local.pid is not None
        cmdline = Path(f"/proc/{local.pid}/cmdline").read_bytes()
        assert b"pipeline.server" in cmdline
        assert key.encode() not in cmdline  # it travels in the environment
        url = f"{base_url}/chat/completions"
        body = chat_body("auth")
        replies = [
            client.post(url, json=body),
            client.post(url, json=body, headers={"Authorization": f"Bearer {key}x"}),
            client.get(f"{base_url}/models"),
            client.post(url, json=body, headers={"Authorization": f"Bearer {key}"}),
            client.get(f"{base_url}/nothing", headers={"Authorization": f"Bearer {key}"}),
            client.get(f"{base_url.removesuffix('/v1')}/_stats"),
        ]
        assert [r.status_code for r in replies] == [401, 401, 401, 200, 404, 200]
        assert replies[0].json() == {
            "error": {
                "message": "Incorrect API key provided",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        for reply in replies:
            assert key not in reply.text
            assert key not in str(reply.headers)
        assert replies[-1].json()["401"] == 2  # chat requests only


# ---------------------------------------------------------------------------------------------
# LocalServer itself


def test_local_server_stops_its_child() -> None:
    local = LocalServer(ServerOptions(latency_ms=1))
    with local as base_url:
        pid = local.pid
        assert base_url.startswith("http://127.0.0.1:")
        assert base_url.endswith("/v1")
    assert local.pid is None
    assert pid is not None
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(RuntimeError, match="not running"):
        local.stats()


def test_local_server_reports_a_failed_start() -> None:
    local = LocalServer(ServerOptions(), host="203.0.113.1")  # not an address of this machine
    with pytest.raises(ProviderError, match="exited before it was ready") as caught:
        local.start()
    assert "assign requested address" in str(caught.value)
    assert local.pid is None


# ---------------------------------------------------------------------------------------------
# Structured answers, tool calls and FIM over HTTP

LABEL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["label", "confidence"],
}
LABEL_TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
    },
    {
        "type": "function",
        "function": {"name": "record_label", "description": "Save it.", "parameters": LABEL_SCHEMA},
    },
]


def schema_prompt(text: str, schema: dict[str, Any]) -> str:
    return (
        f"{text}\nAnswer with one JSON object, and nothing else, that conforms to this JSON "
        f"Schema:\n```json\n{json.dumps(schema)}\n```"
    )


@pytest.fixture(scope="module")
def strict_server() -> Iterator[LocalServer]:
    """Schema answers that always conform (invalid_json_rate=0)."""
    local = LocalServer(ServerOptions(latency_ms=1, invalid_json_rate=0.0))
    local.start()
    yield local
    local.stop()


def test_json_object_needs_the_word_json(server: LocalServer, client: httpx.Client) -> None:
    body = chat_body("Label it.", response_format={"type": "json_object"})
    reply = post(client, server.base_url, body)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["message"] == (
        "'messages' must contain the word 'json' in some form, to use 'response_format' of "
        "type 'json_object'."
    )
    assert (error["type"], error["param"]) == ("invalid_request_error", "messages")
    body["messages"][0]["content"] = "Label it; answer in JSON."
    assert post(client, server.base_url, body).status_code == 200


@pytest.mark.parametrize("thinking", [True, False])
def test_schema_in_the_prompt_is_followed(
    strict_server: LocalServer, client: httpx.Client, thinking: bool
) -> None:
    for i in range(10):
        body = chat_body(
            schema_prompt(f"Review {i}: great.", LABEL_SCHEMA),
            max_tokens=2000,
            response_format={"type": "json_object"},
            thinking={"type": "enabled" if thinking else "disabled"},
        )
        data = post(client, strict_server.base_url, body).json()
        message, usage = data["choices"][0]["message"], data["usage"]
        assert data["choices"][0]["finish_reason"] == "stop"
        assert answer_conforms(message["content"], LABEL_SCHEMA), message["content"]
        reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
        assert ("reasoning_content" in message) == thinking == (reasoning > 0)
        answer_tokens = tokens.count_text_tokens([message["content"]])[0]
        assert usage["completion_tokens"] == answer_tokens + reasoning
        assert usage["prompt_tokens"] == tokens.count_prompt_tokens([body])[0]


def test_json_schema_response_format_is_followed(
    strict_server: LocalServer, client: httpx.Client
) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "label", "schema": LABEL_SCHEMA},
    }
    body = chat_body("Label it.", response_format=response_format, max_tokens=2000)
    data = post(client, strict_server.base_url, body).json()
    assert answer_conforms(data["choices"][0]["message"]["content"], LABEL_SCHEMA)


def test_schema_answers_are_cut_by_max_tokens(
    strict_server: LocalServer, client: httpx.Client
) -> None:
    body = chat_body(
        schema_prompt("Label it.", LABEL_SCHEMA),
        max_tokens=6,
        response_format={"type": "json_object"},
        thinking={"type": "disabled"},
    )
    data = post(client, strict_server.base_url, body).json()
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 6
    assert not answer_conforms(data["choices"][0]["message"]["content"], LABEL_SCHEMA)


def test_some_schema_answers_are_invalid(local_server: Callable[..., str]) -> None:
    base_url = local_server(latency_ms=1, invalid_json_rate=0.5)
    valid: Counter[bool] = Counter()
    with httpx.Client(timeout=10) as http:
        for i in range(60):
            body = chat_body(
                schema_prompt(f"Row {i}.", LABEL_SCHEMA),
                max_tokens=2000,
                response_format={"type": "json_object"},
                thinking={"type": "disabled"},
            )
            content = post(http, base_url, body).json()["choices"][0]["message"]["content"]
            valid[answer_conforms(content, LABEL_SCHEMA)] += 1
    assert valid[True] > 15
    assert valid[False] > 15


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize(
    ("tool_choice", "called"),
    [
        (None, "lookup"),
        ("auto", "lookup"),
        ("required", "lookup"),
        ({"type": "function", "function": {"name": "record_label"}}, "record_label"),
    ],
)
def test_tool_calls(
    strict_server: LocalServer,
    client: httpx.Client,
    tool_choice: Any,
    called: str,
    thinking: bool,
) -> None:
    extra = {} if tool_choice is None else {"tool_choice": tool_choice}
    body = chat_body(
        "Label this review: fine.",
        max_tokens=2000,
        tools=LABEL_TOOLS,
        thinking={"type": "enabled" if thinking else "disabled"},
        **extra,
    )
    data = post(client, strict_server.base_url, body).json()
    choice, usage = data["choices"][0], data["usage"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert re.fullmatch(r"call_[0-9a-f]+", call["id"])
    assert (call["type"], call["function"]["name"]) == ("function", called)
    arguments = call["function"]["arguments"]
    schema = next(
        t["function"]["parameters"] for t in LABEL_TOOLS if t["function"]["name"] == called
    )
    assert answer_conforms(arguments, schema)
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    assert ("reasoning_content" in message) == thinking == (reasoning > 0)
    assert usage["completion_tokens"] == tokens.count_text_tokens([arguments])[0] + reasoning
    assert usage["prompt_tokens"] == tokens.count_prompt_tokens([body])[0]


def test_tool_choice_none_answers_with_text(server: LocalServer, client: httpx.Client) -> None:
    body = chat_body("Hello.", tools=LABEL_TOOLS, tool_choice="none")
    data = post(client, server.base_url, body).json()
    assert "tool_calls" not in data["choices"][0]["message"]
    assert data["usage"]["prompt_tokens"] == tokens.count_prompt_tokens([body])[0]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": {"type": "function"}}, "tools"),
        ({"tools": []}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": LABEL_TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": LABEL_TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
    ],
)
def test_malformed_tools_are_refused(
    server: LocalServer, client: httpx.Client, extra: dict[str, Any], param: str
) -> None:
    reply = post(client, server.base_url, chat_body("x", **extra))
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


FIM_BODY: dict[str, Any] = {
    "model": MODEL,
    "prompt": "def fib(n):\n    ",
    "suffix": "\n    return fib(n - 1) + fib(n - 2)\n",
    "max_tokens": 40,
    "thinking": {"type": "enabled"},  # ignored: FIM is non-thinking only
}


@pytest.mark.parametrize(
    "path", ["/v1/completions", "/completions", "/beta/completions", "/v1/beta/completions"]
)
def test_fim_completions(server: LocalServer, client: httpx.Client, path: str) -> None:
    root = server.base_url.removesuffix("/v1")
    reply = client.post(f"{root}{path}", json=FIM_BODY)
    assert reply.status_code == 200
    data = reply.json()
    assert data["id"].startswith("cmpl-")
    assert (data["object"], data["model"]) == ("text_completion", MODEL)
    (choice,) = data["choices"]
    assert (choice["index"], choice["logprobs"]) == (0, None)
    assert choice["finish_reason"] in {"stop", "length"}
    usage = data["usage"]
    assert usage["prompt_tokens"] == tokens.count_prompt_tokens([FIM_BODY])[0]
    assert usage["completion_tokens"] == tokens.count_text_tokens([choice["text"]])[0] <= 40
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 0}
    hit = usage["prompt_tokens_details"]["cached_tokens"]
    assert usage["prompt_cache_hit_tokens"] == hit
    assert usage["prompt_cache_miss_tokens"] == usage["prompt_tokens"] - hit


def test_fim_shares_the_machinery(server: LocalServer, client: httpx.Client) -> None:
    url = f"{server.base_url.removesuffix('/v1')}/beta/completions"
    server.reset_stats()
    long_prompt = {**FIM_BODY, "prompt": "# a long shared header\n" * 60 + "def f():\n"}
    first = client.post(url, json=long_prompt).json()
    second = client.post(url, json=long_prompt).json()
    assert first["choices"] == second["choices"]  # deterministic
    assert second["usage"]["prompt_cache_hit_tokens"] > 0
    other = {"model": "gpt-4o-mini", "prompt": "x = ", "suffix": "\nprint(x)"}
    assert (
        client.post(url, json=other).json()["usage"]["prompt_tokens"]
        == (tokens.count_prompt_tokens([other])[0])
    )
    assert client.post(url, json={"model": MODEL}).json()["error"]["param"] == "prompt"
    assert client.post(url, json={**FIM_BODY, "stream": True}).status_code == 400
    stats = server.stats()
    assert (stats["ok"], stats["400"]) == (3, 2)
    assert stats["prompt_tokens_total"] == (
        2 * first["usage"]["prompt_tokens"] + tokens.count_prompt_tokens([other])[0]
    )


def test_strict_structured_output_always_conforms(local_server: Callable[..., str]) -> None:
    """As at OpenAI: `strict` json_schema answers and strict tools' arguments follow the
    schema, whatever invalid_json_rate breaks for the others."""
    base_url = local_server(latency_ms=1, invalid_json_rate=0.9)
    tool = {
        "type": "function",
        "function": {"name": "record_label", "parameters": LABEL_SCHEMA, "strict": True},
    }
    valid: Counter[str] = Counter()
    with httpx.Client(timeout=10) as http:
        for i in range(20):
            for strict in (True, False):
                body = chat_body(
                    f"Row {i}.",
                    max_tokens=2000,
                    response_format={
                        "type": "json_schema",
                        "json_schema": {"name": "label", "schema": LABEL_SCHEMA, "strict": strict},
                    },
                    thinking={"type": "disabled"},
                )
                content = post(http, base_url, body).json()["choices"][0]["message"]["content"]
                valid[f"schema strict={strict}"] += answer_conforms(content, LABEL_SCHEMA)
            body = chat_body(
                f"Row {i}.", max_tokens=2000, tools=[tool], thinking={"type": "disabled"}
            )
            call = post(http, base_url, body).json()["choices"][0]["message"]["tool_calls"][0]
            valid["tool strict"] += answer_conforms(call["function"]["arguments"], LABEL_SCHEMA)
    assert valid["schema strict=True"] == 20
    assert valid["tool strict"] == 20
    assert valid["schema strict=False"] < 10


# ---------------------------------------------------------------------------------------------
# Served models (issue 12): a model typo is OpenAI's 404, not an answer

KNOWN_MODELS = ["deepseek/deepseek-v4-flash", "deepseek-v4-flash", "gpt-4o-mini"]


def model_not_found(model: str) -> dict[str, Any]:
    message = f"The model `{model}` does not exist or you do not have access to it."
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }


def test_served_models_add_to_the_known_ones() -> None:
    assert ServerOptions().models == tuple(KNOWN_MODELS)
    assert ServerOptions(served_models=()).models == tuple(KNOWN_MODELS)
    added = ServerOptions(served_models=["my/model", "gpt-4o-mini"])  # type: ignore[arg-type]
    assert added.served_models == ("my/model", "gpt-4o-mini")  # a list becomes a tuple
    assert added.models == (*KNOWN_MODELS, "my/model")
    for bad in ("a,b", ""):
        with pytest.raises(ValueError, match="served_models"):
            ServerOptions(served_models=(bad,))
    with pytest.raises(ValueError, match="served_models"):
        ServerOptions(served_models="my/model")  # type: ignore[arg-type]


def test_served_models_is_one_comma_separated_flag() -> None:
    options = ServerOptions(served_models=("my/model", "custom[v2]"))
    argv = server_argv(options)
    assert "--served-models=my/model,custom[v2]" in argv
    args = serve_command.make_context("serve", ["--port", "0", *argv]).params
    assert args["served_models"] == ("my/model", "custom[v2]")
    assert server_argv(ServerOptions()) == []
    for given in ("", " , "):
        args = serve_command.make_context("serve", ["--served-models", given]).params
        assert ServerOptions(served_models=args["served_models"]).models == tuple(KNOWN_MODELS)


def test_a_model_not_served_gets_openais_404(server: LocalServer, client: httpx.Client) -> None:
    server.reset_stats()
    root = server.base_url.removesuffix("/v1")
    chat = post(client, server.base_url, chat_body("hi", model="deepseek-v4-flsh"))
    fim = client.post(f"{root}/beta/completions", json={**FIM_BODY, "model": "my/model"})
    for reply, model in ((chat, "deepseek-v4-flsh"), (fim, "my/model")):
        assert reply.status_code == 404
        assert reply.headers["content-type"] == "application/json"
        assert reply.json() == model_not_found(model)
    assert post(client, server.base_url, chat_body("hi")).status_code == 200
    stats = server.stats()
    assert (stats["404"], stats["ok"], stats["400"], stats["requests_total"]) == (2, 1, 0, 3)


def test_served_models_travel_to_the_child_process(client: httpx.Client) -> None:
    local = LocalServer(ServerOptions(latency_ms=1, served_models=("my/model",)))
    with local as base_url:
        listed = client.get(f"{base_url}/models").json()["data"]
        assert [model["id"] for model in listed] == [*KNOWN_MODELS, "my/model"]
        assert post(client, base_url, chat_body("hi", model="my/model")).status_code == 200
        root = base_url.removesuffix("/v1")
        fim = client.post(f"{root}/v1/completions", json={**FIM_BODY, "model": "my/model"})
        assert fim.status_code == 200
        refused = post(client, base_url, chat_body("hi", model="my/modle"))
        assert (refused.status_code, refused.json()) == (404, model_not_found("my/modle"))
        assert local.stats()["404"] == 1


def test_a_run_with_a_model_typo_fails_its_rows_at_once(
    tmp_path: Path, server: LocalServer
) -> None:
    """The client treats the 404 as permanent: one request a row, the server's message kept."""
    (tmp_path / "in.jsonl").write_text("".join(f'{{"text": "row {i}"}}\n' for i in range(3)))
    job = tmp_path / "job.toml"
    job.write_text(
        f"""
name = "typo"
[input]
path = "in.jsonl"
[request]
base_url = "{server.base_url}"
model = "deepseek-v4-flsh"
prompt = "{{text}}"
max_tokens = 8
[output]
path = "out.parquet"
"""
    )
    server.reset_stats()
    report = run_job_report(job)
    assert (report.final.ok, report.final.failed) == (0, 3)
    assert server.stats()["404"] == server.stats()["requests_total"] == 3  # no retries
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert {row["http_status"] for row in out} == {404}
    assert {row["error"] for row in out} == {
        "HTTP 404: The model `deepseek-v4-flsh` does not exist or you do not have access to it."
    }
