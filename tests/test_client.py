"""The network seam, driven by scripted httpx.MockTransport handlers."""

from __future__ import annotations

import json
from collections.abc import Callable

import anyio
import httpx
import pytest

from pipeline.money.pricing import Usage
from pipeline.provider.client import ChatClient
from pipeline.provider.retry import Failure
from pipeline.provider.wire import parse_retry_after, parse_usage

URL = "http://provider.test/v1/chat/completions"
OK_BODY = {
    "id": "x",
    "model": "deepseek-v4-flash",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "positive", "reasoning_content": "hmm"},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 20,
        "completion_tokens": 5,
        "total_tokens": 25,
        "prompt_cache_hit_tokens": 16,
        "prompt_cache_miss_tokens": 4,
        "completion_tokens_details": {"reasoning_tokens": 3},
    },
}


def send(handler: Callable[[httpx.Request], httpx.Response], *, timeout_s: float = 5.0) -> object:
    async def go() -> object:
        async with ChatClient(
            URL,
            api_key="sk-secret-123456",
            timeout_s=timeout_s,
            max_connections=4,
            transport=httpx.MockTransport(handler),
        ) as client:
            return await client.send(b'{"model":"m","messages":[]}')

    return anyio.run(go)


def test_ok_reply_parses_content_reasoning_and_deepseek_usage() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=OK_BODY)

    attempt = send(handler)
    assert attempt.ok  # type: ignore[attr-defined]
    assert attempt.reply.content == "positive"  # type: ignore[attr-defined]
    assert attempt.reply.reasoning == "hmm"  # type: ignore[attr-defined]
    assert attempt.usage == Usage(  # type: ignore[attr-defined]
        prompt_tokens=20, completion_tokens=5, cached_tokens=16, reasoning_tokens=3
    )
    assert seen[0].headers["authorization"] == "Bearer sk-secret-123456"
    assert seen[0].content == b'{"model":"m","messages":[]}'


def test_leading_blank_keep_alive_lines_parse() -> None:
    raw = b"\n\n\n  \n" + json.dumps(OK_BODY).encode()
    attempt = send(lambda r: httpx.Response(200, content=raw))
    assert attempt.ok  # type: ignore[attr-defined]


def test_openai_usage_shape() -> None:
    usage = parse_usage(
        {
            "prompt_tokens": 10,
            "completion_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 8},
            "completion_tokens_details": {"reasoning_tokens": 2},
        }
    )
    assert usage == Usage(
        prompt_tokens=10, completion_tokens=4, cached_tokens=8, reasoning_tokens=2
    )


@pytest.mark.parametrize(
    ("response", "failure", "text"),
    [
        (
            httpx.Response(429, json={"error": {"message": "slow down"}}),
            Failure.RATE_LIMITED,
            "slow",
        ),
        (httpx.Response(500, json={"error": {"message": "boom"}}), Failure.SERVER, "boom"),
        (
            httpx.Response(502, html="<html><body>Bad gateway</body></html>"),
            Failure.SERVER,
            "HTML error page",
        ),
        (httpx.Response(400, json={"error": {"message": "bad"}}), Failure.CLIENT, "bad"),
        (httpx.Response(401, json={"error": {"message": "no"}}), Failure.AUTH, "401"),
        (httpx.Response(200, content=b'{"choices": [{"mess'), Failure.MALFORMED, "truncated"),
        (httpx.Response(200, html="<html>oops</html>"), Failure.MALFORMED, "HTML"),
        (httpx.Response(200, json={"usage": {"prompt_tokens": 3}}), Failure.MALFORMED, "choices"),
    ],
)
def test_failures_are_classified(response: httpx.Response, failure: Failure, text: str) -> None:
    attempt = send(lambda r: response)
    assert attempt.failure is failure  # type: ignore[attr-defined]
    assert text in attempt.error  # type: ignore[attr-defined]


def test_usage_of_an_unusable_200_is_still_billed() -> None:
    attempt = send(lambda r: httpx.Response(200, json={"usage": {"prompt_tokens": 3}}))
    assert attempt.usage == Usage(prompt_tokens=3)  # type: ignore[attr-defined]


def test_connection_errors_and_timeouts_are_values() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    assert send(refuse).failure is Failure.CONNECTION  # type: ignore[attr-defined]

    def read_timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    assert send(read_timeout).failure is Failure.TIMEOUT  # type: ignore[attr-defined]


def test_total_timeout_covers_slow_bodies() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(5)
        return httpx.Response(200, json=OK_BODY)

    attempt = send(slow, timeout_s=0.2)  # type: ignore[arg-type]
    assert attempt.failure is Failure.TIMEOUT  # type: ignore[attr-defined]


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_api_key_never_appears_in_errors() -> None:
    body = {"error": {"message": "Incorrect API key provided: sk-secret-123456"}}
    attempt = send(lambda r: httpx.Response(401, json=body))
    # The client reports what the server said; the runner redacts before anything is shown.
    from pipeline.provider.redact import redact

    assert "sk-secret" not in redact(attempt.error, "sk-secret-123456")  # type: ignore[attr-defined]
    assert "sk-secret" not in redact("key sk-secret-abcdef was wrong", None)


def test_warm_opens_a_connection_and_sends_nothing(
    local_server: Callable[..., str],
) -> None:
    """The connection opened ahead of the first request carries no request of its own, the
    next request goes out normally, and an endpoint that refuses connections is left for the
    requests to report."""
    from pipeline.server.process import server_stats

    base = local_server(latency_ms=0)

    async def go(url: str) -> tuple[object, object]:
        async with ChatClient(url, api_key=None, timeout_s=5, max_connections=4) as client:
            await client.warm()
            before = server_stats(base)["requests_total"]
            attempt = await client.send(b'{"model":"deepseek/deepseek-v4-flash","messages":[]}')
            return before, attempt

    before, attempt = anyio.run(go, f"{base}/chat/completions")
    assert before == 0
    assert getattr(attempt, "status", None) is not None
    assert server_stats(base)["requests_total"] == 1

    async def refused() -> None:
        async with ChatClient(
            "http://127.0.0.1:9/v1/chat/completions", api_key=None, timeout_s=5, max_connections=4
        ) as client:
            await client.warm()

    anyio.run(refused)  # no exception: the first request reports the refusal


def test_before_send_runs_right_before_the_write_and_only_then(
    local_server: Callable[..., str],
) -> None:
    """``before_send`` (where the engine records a row's intent) runs once per request that
    is written, and before the write: when it raises, the error comes out of ``send`` (not as
    a network failure) and the server never sees the request; a request that cannot connect
    never calls it."""
    from pipeline.server.process import server_stats

    base = local_server(latency_ms=0)
    body = b'{"model":"deepseek/deepseek-v4-flash","messages":[{"role":"user","content":"hi"}]}'
    calls: list[int] = []

    def note() -> None:
        calls.append(server_stats(base)["requests_total"])  # what the server had seen then

    def broken() -> None:
        raise OSError(28, "No space left on device")

    async def go(url: str) -> tuple[object, BaseException | None]:
        async with ChatClient(url, api_key=None, timeout_s=5, max_connections=4) as client:
            attempt = await client.send(body, before_send=note)
            try:
                await client.send(body, before_send=broken)
            except OSError as exc:
                return attempt, exc
            return attempt, None

    attempt, error = anyio.run(go, f"{base}/chat/completions")
    assert getattr(attempt, "status", None) == 200
    assert calls == [0]  # called once, before the server had the request
    assert isinstance(error, OSError)
    assert error.errno == 28
    assert server_stats(base)["requests_total"] == 1  # the second request was never written

    async def refused() -> object:
        async with ChatClient(
            "http://127.0.0.1:9/v1/chat/completions", api_key=None, timeout_s=5, max_connections=4
        ) as client:
            return await client.send(body, before_send=note)

    failed = anyio.run(refused)
    assert getattr(failed, "reached", None) is False
    assert calls == [0]  # never connected: nothing was written, nothing recorded


def test_a_run_process_leaves_pandas_unloaded() -> None:
    """`pipeline run` records "no pandas" for pyarrow's probe, so the output's `pa.array()`
    imports no pandas; an explicit `to_pandas()` still does."""
    import subprocess
    import sys

    script = (
        "import sys, pyarrow as pa\n"
        "from pipeline.cli.common import skip_pandas_probe\n"
        "skip_pandas_probe()\n"
        "pa.array(['x', None], type=pa.string()); pa.array([1, None], type=pa.int64())\n"
        "assert 'pandas' not in sys.modules\n"
        "assert type(pa.table({'a': [1]}).to_pandas()).__name__ == 'DataFrame'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
