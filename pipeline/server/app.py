"""The built-in OpenAI-compatible server: latency, limits and faults, DeepSeek- or OpenAI-like.

Start it with ``pipeline serve`` or ``python -m pipeline.server --port 8000 [options]``; it
prints one line, ``listening on http://127.0.0.1:PORT``, once it accepts connections (with
``--port 0`` the system picks a free port), and runs until SIGINT or SIGTERM. Point a job at
``http://127.0.0.1:PORT/v1``. Tests start it with :class:`pipeline.server.process.LocalServer`.
Request bodies are read and checked in :mod:`pipeline.server.requests`, answers drawn in
:mod:`pipeline.server.simulate`; this module keeps the HTTP side, limits, faults and counters.

Endpoints
---------
``POST /v1/chat/completions`` (also ``/chat/completions``)
    Reads ``model`` and ``messages`` (both required), ``max_tokens`` or
    ``max_completion_tokens`` (default 256), ``thinking`` (``{"type": "enabled"|"disabled"}``;
    on by default for DeepSeek models, off for others unless asked for), ``reasoning_effort``
    (``"max"`` doubles the reasoning drawn), ``response_format`` (``{"type": "json_object"}``
    answers with a JSON object, an instance of the JSON Schema fenced in the prompt if there
    is one, and needs the word "json" in the messages, as at OpenAI; ``{"type": "json_schema",
    "json_schema": {"schema": ...}}`` gives the schema directly), ``tools`` and ``tool_choice``
    (OpenAI's function tools: unless ``tool_choice`` is ``"none"``, the answer calls the named
    function, or the first one for ``"auto"``/``"required"``, with ``content: null``, one
    ``tool_calls`` entry and ``finish_reason: "tool_calls"``) and ``stream`` (``true`` is
    refused with 400); anything else is ignored. Invalid bodies, malformed ``tools`` entries
    and a ``tool_choice`` naming an unknown function get 400 with an OpenAI-style
    ``{"error": {...}}`` body.
``POST /beta/completions`` (also ``/v1/beta/completions``, ``/v1/completions``, ``/completions``)
    FIM completion, as DeepSeek's beta endpoint: ``model`` and ``prompt`` (a string) required,
    ``suffix`` optional, ``max_tokens`` as above, ``stream`` refused; never in thinking mode.
    Answers a ``text_completion`` object whose choice has ``text``; usage as for chat. Auth,
    limits, faults, latency, the prompt cache and ``/_stats`` are shared with chat.
``GET /v1/models`` (also ``/models``)
    A few model ids: ``deepseek/deepseek-v4-flash``, ``deepseek-v4-flash``, ``gpt-4o-mini``.
``GET /_stats``, ``POST /_stats/reset``
    Counters for tests: ``requests_total``; one count per outcome (``ok``, ``429``, ``400``,
    ``401``, ``500``, ``503``, ``502_html``, ``drop``, ``malformed``, ``timeout``);
    ``in_flight`` and ``max_in_flight_seen``; ``distinct_requests`` (distinct request bodies,
    byte for byte), ``max_sends_per_request`` (most times one identical body was received) and
    ``sends_histogram`` (times received -> number of bodies); ``prompt_tokens_total``,
    ``completion_tokens_total``, ``reasoning_tokens_total`` and ``cache_hit_tokens_total`` over
    the replies sent. ``/_stats`` needs no API key. Every body is remembered (about 100 bytes
    each) until the counters are reset.

With ``api_key`` set, the API endpoints require ``Authorization: Bearer <key>`` and answer 401
``invalid_api_key`` otherwise; the key is never echoed, logged or put in a URL.

Replies
-------
A reply is deterministic: its random source is seeded from the model, the messages (or FIM
prompt and suffix) and ``seed``, so the same request always gets the same text; the answers
themselves are made by :mod:`pipeline.server.simulate`. Its length follows the budget: a
target is drawn uniformly in ``[reply_min_fraction * max_tokens, max_tokens]``, except that
``truncate_rate`` of the replies run past the budget: those are cut and their
``finish_reason`` is ``"length"``, else it is ``"stop"``. The text is
sentences of English words and punctuation marks that are each exactly one DeepSeek V4 token
and that the tokenizer never merges, so a reply's token count is its number of pieces (checked
against the real tokenizer at start-up and in the tests; tokenizing every reply would cost
about 0.4 ms per 256 tokens). JSON answers and tool call arguments are tokenized for real
and cut to the budget too; ``invalid_json_rate`` of the answers that follow a schema (and of
tool call arguments) break it on purpose, the way models do, except answers asked for with
``strict`` (:mod:`pipeline.server.simulate` tells how). In thinking mode a
``reasoning_content`` of ``reasoning_min_tokens..reasoning_max_tokens`` tokens comes first
and shares the budget (the answer's target is drawn from what is left): when the reasoning
uses the budget up, ``content`` is ``""`` and the reply is cut.
``prompt_tokens`` equals :func:`pipeline.rows.tokens.count_prompt_tokens` of the body to the token.
``usage.completion_tokens`` is reasoning plus answer tokens, with
``completion_tokens_details.reasoning_tokens`` and ``prompt_tokens_details.cached_tokens``.

Prompt cache: the server remembers fingerprints of prompt prefixes at 64-token granularity (a
bounded LRU of ``prefix_cache_entries``); a prompt's cached tokens are its longest prefix of
whole 64-token blocks seen before. Only DeepSeek models (counted exactly) can hit the cache.

Profiles
--------
``deepseek`` (default)
    Limits requests *in flight* only, and only if ``max_concurrency`` is set: a request that
    arrives while that many are being served gets 429 ``rate_limit_error`` with no
    ``x-ratelimit-*`` headers and no ``Retry-After``. Usage adds top-level
    ``prompt_cache_hit_tokens`` and ``prompt_cache_miss_tokens``. A reply slower than
    ``keepalive_after_ms`` is streamed: the headers go out at once, then an empty line every
    ``keepalive_interval_ms`` until the JSON body, as DeepSeek does under load.
``openai``
    Enforces ``rpm`` and ``tpm`` (0 = unlimited) with buckets that refill continuously over 60 s,
    as OpenAI does; a request costs 1 request and ``prompt_tokens + max_tokens`` tokens. Responses
    carry ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for each limit set (reset is
    the time until the bucket is full, written like ``1s``, ``6m0s``, ``120ms``); over a limit
    the answer is 429 with ``Retry-After`` (whole seconds, at least 1). ``max_concurrency``
    applies here too.

Order of checks and latency
---------------------------
A chat or FIM request is checked in this order, and the first check that fails answers at once:
API key (401), the in-flight cap (429), the body (400), ``reject_substring`` and ``fault_400``
(400), the ``rpm``/``tpm`` buckets (429). A request that passes waits ``latency_ms`` plus a
uniform draw of up to ``latency_jitter_ms`` and is then answered, or fails with the random
fault drawn for it.

Faults
------
One random fault is drawn per request that passes the checks, from a random source seeded
with ``seed``, so a run is reproducible; the probabilities add up (at most 1 in total):

==================  ==========================================================================
``fault_500``       500 with a JSON ``server_error`` body, after the latency
``fault_503``       503 with an HTML page (``text/html``), after the latency
``fault_502_html``  502 with the HTML page an nginx proxy sends, after the latency
``fault_drop``      after the latency, the connection is closed without any response
``fault_malformed`` 200 whose JSON body is cut in half
``fault_timeout``   nothing for ``timeout_hang_s`` seconds (no keep-alive lines either), then
                    the normal reply if the client is still there
==================  ==========================================================================

``fault_400`` is different: a fixed fraction of distinct request bodies (chosen by a hash of
the body bytes and ``seed``) always gets 400 ``invalid_request_error``, so retrying them
never helps. ``reject_substring`` does the same for every request whose message text
contains it, which lets a test fail chosen rows.

Options
-------
Every field of :class:`ServerOptions` is the command-line flag ``--field-name``; its help text
is the field's ``metadata["help"]`` (and ``metadata["choices"]`` for ``profile``).

=========================  ============  =======================================================
option                     default       meaning
=========================  ============  =======================================================
``profile``                ``deepseek``  provider to imitate: ``deepseek`` or ``openai``
``latency_ms``             200           time to answer a request
``latency_jitter_ms``      0             up to this much more, drawn uniformly per request
``max_concurrency``        0             hidden cap on requests in flight (0 = none)
``rpm``                    0             openai profile: requests per minute (0 = none)
``tpm``                    0             openai profile: tokens per minute (0 = none)
``api_key``                (empty)       required bearer key; also ``$PIPELINE_SERVER_API_KEY``
``seed``                   0             seed of the replies and of the fault draws
``reply_min_fraction``     0.3           shortest reply drawn, as a fraction of ``max_tokens``
``truncate_rate``          0             text replies that run past ``max_tokens`` (cut)
``reasoning_min_tokens``   32            fewest reasoning tokens drawn in thinking mode
``reasoning_max_tokens``   256           most reasoning tokens drawn (doubled for ``max``)
``keepalive_after_ms``     100           deepseek: stream keep-alive lines when slower
``keepalive_interval_ms``  50            deepseek: time between keep-alive lines
``fault_500``              0             probability of a 500 JSON error
``fault_503``              0             probability of a 503 HTML page
``fault_502_html``         0             probability of a proxy's 502 HTML page
``fault_drop``             0             probability of closing the connection unanswered
``fault_malformed``        0             probability of a 200 with truncated JSON
``fault_timeout``          0             probability of hanging for ``timeout_hang_s``
``timeout_hang_s``         30            how long a timeout fault hangs
``fault_400``              0             fraction of distinct bodies that always get 400
``reject_substring``       (empty)       400 for every request whose messages contain it
``prefix_cache_entries``   100000        prompt-prefix fingerprints the cache remembers
``invalid_json_rate``      0.05          fraction of schema answers that break the schema
=========================  ============  =======================================================

Pass ``api_key`` through the environment variable rather than the flag: command lines are
visible to every user of the machine.

Performance: one process spends 0.25-0.5 ms of CPU per request (small prompts, replies of up
to 256 tokens). On a two-core machine, with an aiohttp load generator on the same machine and
200 requests in flight, it answers 2,600-4,000 requests per second; slow replies streamed with
keep-alive lines cost about 30 % more. One process keeps ``/_stats``, the limits and the
prompt cache exact.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import itertools
import json
import math
import os
import random
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.rows.prefix import PrefixCache
from pipeline.server.options import API_KEY_ENV, ServerOptions
from pipeline.server.requests import (
    AnyRequest,
    ChatRequest,
    CompletionRequest,
    InvalidRequest,
    parse_chat_request,
    parse_completion_request,
    prompt_token_ids,
    reply_seed,
    request_texts,
)
from pipeline.server.simulate import Reply, fim_reply, make_reply, vocabulary

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Scope, Send

MODEL_IDS: Final = ("deepseek/deepseek-v4-flash", "deepseek-v4-flash", "gpt-4o-mini")
FIM_PATHS: Final = ("/v1/completions", "/completions", "/beta/completions", "/v1/beta/completions")
WINDOW_S: Final = 60.0


# ---------------------------------------------------------------------------------------------
# Outcomes and faults (pure)


class Outcome(StrEnum):
    """What the server did with a request; the keys of ``/_stats``."""

    OK = "ok"
    RATE_LIMITED = "429"
    INVALID = "400"
    UNAUTHORIZED = "401"
    SERVER_ERROR = "500"
    UNAVAILABLE = "503"
    BAD_GATEWAY = "502_html"
    DROP = "drop"
    MALFORMED = "malformed"
    TIMEOUT = "timeout"


RANDOM_FAULTS: Final[Mapping[str, Outcome]] = {
    "fault_500": Outcome.SERVER_ERROR,
    "fault_503": Outcome.UNAVAILABLE,
    "fault_502_html": Outcome.BAD_GATEWAY,
    "fault_drop": Outcome.DROP,
    "fault_malformed": Outcome.MALFORMED,
    "fault_timeout": Outcome.TIMEOUT,
}


def draw_fault(options: ServerOptions, draw: float) -> Outcome | None:
    """The random fault for a uniform ``draw`` in [0, 1), or None; probabilities add up."""
    edge = 0.0
    for name, outcome in RANDOM_FAULTS.items():
        edge += getattr(options, name)
        if draw < edge:
            return outcome
    return None


def body_digest(body: bytes, seed: int) -> bytes:
    """16 bytes identifying a request body: the first 8 key ``/_stats``, the last 8 fault_400."""
    key = seed.to_bytes(8, "little", signed=True)
    return hashlib.blake2b(body, digest_size=16, key=key).digest()


def always_rejected(digest: bytes, fraction: float) -> bool:
    """Whether the body with ``digest`` is one of the ``fraction`` that always get 400."""
    return int.from_bytes(digest[8:], "little") < fraction * 2**64


# ---------------------------------------------------------------------------------------------
# Faults a request draws (pure)


def rejection(request: AnyRequest, digest: bytes, options: ServerOptions) -> InvalidRequest | None:
    """The 400 that ``reject_substring`` or ``fault_400`` gives this request, if any."""
    needle = options.reject_substring
    if needle and any(needle in text for text in request_texts(request)):
        return InvalidRequest("This request was rejected by the server's reject_substring.")
    if options.fault_400 and always_rejected(digest, options.fault_400):
        return InvalidRequest("Invalid request (fault_400): this body is always rejected.")
    return None


# ---------------------------------------------------------------------------------------------
# Rate limits (pure; the caller passes the time)


def format_duration(seconds: float) -> str:
    """A duration as OpenAI writes it in ``x-ratelimit-reset-*``: ``120ms``, ``1s``, ``6m0s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs = f"{millis / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass(slots=True)
class TokenBucket:
    """``limit`` units per 60 s, refilled continuously, starting full."""

    limit: int
    level: float
    updated: float

    @classmethod
    def full(cls, limit: int, now: float) -> TokenBucket:
        return cls(limit=limit, level=float(limit), updated=now)

    def refill(self, now: float) -> None:
        rate = self.limit / WINDOW_S
        self.level = min(float(self.limit), self.level + (now - self.updated) * rate)
        self.updated = now

    def wait_for(self, cost: float) -> float:
        """Seconds until ``cost`` units are available (after :meth:`refill`)."""
        missing = min(cost, float(self.limit)) - self.level
        return max(0.0, missing * WINDOW_S / self.limit)

    def until_full(self) -> float:
        return (self.limit - self.level) * WINDOW_S / self.limit


@dataclass(frozen=True, slots=True, kw_only=True)
class RateDecision:
    """Whether a request may go ahead, and the headers that say so."""

    allowed: bool
    headers: tuple[tuple[bytes, bytes], ...]
    retry_after_s: int = 0
    limited_by: str = ""
    message: str = ""


class RateLimiter:
    """OpenAI-style requests/min and tokens/min buckets (0 = that limit is off)."""

    def __init__(self, rpm: int, tpm: int, now: float) -> None:
        self._buckets = {
            name: TokenBucket.full(limit, now)
            for name, limit in (("requests", rpm), ("tokens", tpm))
            if limit
        }

    def admit(self, token_cost: int, now: float) -> RateDecision:
        """Take one request and ``token_cost`` tokens if both are available at ``now``."""
        costs = {"requests": 1, "tokens": token_cost}
        waits: dict[str, float] = {}
        for name, bucket in self._buckets.items():
            bucket.refill(now)
            waits[name] = bucket.wait_for(costs[name])
        blocked = [name for name, wait in waits.items() if wait > 0]
        if blocked:
            name = max(blocked, key=waits.__getitem__)
            bucket = self._buckets[name]
            retry = max(1, math.ceil(max(waits.values())))
            label = "requests per min (RPM)" if name == "requests" else "tokens per min (TPM)"
            message = (
                f"Rate limit reached on {label}: Limit {bucket.limit}, "
                f"Used {bucket.limit - int(bucket.level)}, Requested {costs[name]}. "
                f"Please try again in {retry}s."
            )
            return RateDecision(
                allowed=False,
                headers=self.headers(),
                retry_after_s=retry,
                limited_by=name,
                message=message,
            )
        for name, bucket in self._buckets.items():
            bucket.level -= min(costs[name], bucket.limit)
        return RateDecision(allowed=True, headers=self.headers())

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        headers: list[tuple[bytes, bytes]] = []
        for name, bucket in self._buckets.items():
            headers += [
                (f"x-ratelimit-limit-{name}".encode(), str(bucket.limit).encode()),
                (f"x-ratelimit-remaining-{name}".encode(), str(int(bucket.level)).encode()),
                (
                    f"x-ratelimit-reset-{name}".encode(),
                    format_duration(bucket.until_full()).encode(),
                ),
            ]
        return tuple(headers)


# ---------------------------------------------------------------------------------------------
# Statistics


class ServerStats:
    """The counters behind ``GET /_stats`` (of one process)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Zero every counter (requests in flight stay in flight)."""
        self.requests_total = 0
        self.outcomes: Counter[str] = Counter()
        self.max_in_flight_seen = self.in_flight
        self.sends: dict[bytes, int] = {}
        self.histogram: Counter[int] = Counter()
        self.max_sends = 0
        self.usage: Counter[str] = Counter()

    def record_send(self, key: bytes) -> None:
        """Count one receipt of the body identified by ``key``."""
        count = self.sends.get(key, 0) + 1
        self.sends[key] = count
        if count > 1:
            self.histogram[count - 1] -= 1
            if not self.histogram[count - 1]:
                del self.histogram[count - 1]
        self.histogram[count] += 1
        self.max_sends = max(self.max_sends, count)

    def try_enter(self, cap: int) -> bool:
        """Start serving a request unless ``cap`` (0 = none) are already being served."""
        if cap and self.in_flight >= cap:
            return False
        self.in_flight += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
        return True

    def leave(self) -> None:
        self.in_flight -= 1

    def record_usage(self, reply: Reply, prompt_tokens: int, cache_hit: int) -> None:
        self.usage["prompt_tokens_total"] += prompt_tokens
        self.usage["completion_tokens_total"] += reply.completion_tokens
        self.usage["reasoning_tokens_total"] += reply.reasoning_tokens
        self.usage["cache_hit_tokens_total"] += cache_hit

    def snapshot(self) -> dict[str, Any]:
        """The counters as the JSON object ``/_stats`` returns."""
        usage_keys = (
            "prompt_tokens_total",
            "completion_tokens_total",
            "reasoning_tokens_total",
            "cache_hit_tokens_total",
        )
        return {
            "requests_total": self.requests_total,
            **{outcome.value: self.outcomes[outcome.value] for outcome in Outcome},
            "in_flight": self.in_flight,
            "max_in_flight_seen": self.max_in_flight_seen,
            "distinct_requests": len(self.sends),
            "max_sends_per_request": self.max_sends,
            "sends_histogram": {str(k): v for k, v in sorted(self.histogram.items())},
            **{key: self.usage[key] for key in usage_keys},
        }


# ---------------------------------------------------------------------------------------------
# Response bodies (pure)


def error_body(
    message: str, kind: str, *, param: str | None = None, code: str | None = None
) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}
    ).encode()


UNAUTHORIZED_BODY: Final = error_body(
    "Incorrect API key provided", "invalid_request_error", code="invalid_api_key"
)
CONCURRENCY_BODY: Final = error_body(
    "Rate limit reached for requests in flight; please retry later.", "rate_limit_error"
)
SERVER_ERROR_BODY: Final = error_body(
    "The server had an error while processing your request. Sorry about that!", "server_error"
)
HTML_503: Final = b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>"
HTML_502: Final = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class BodyMeta:
    """What a reply body carries besides the answer: its id, time, prompt usage, profile."""

    completion_id: str
    created: int
    prompt_tokens: int
    cache_hit: int
    profile: str


def usage_body(reply: Reply, meta: BodyMeta) -> dict[str, Any]:
    """The ``usage`` object, with the fields of the profile (DeepSeek adds cache hit/miss)."""
    prompt_tokens, cache_hit = meta.prompt_tokens, meta.cache_hit
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": prompt_tokens + reply.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cache_hit},
        "completion_tokens_details": {"reasoning_tokens": reply.reasoning_tokens},
    }
    if meta.profile == "deepseek":
        usage["prompt_cache_hit_tokens"] = cache_hit
        usage["prompt_cache_miss_tokens"] = prompt_tokens - cache_hit
    return usage


def completion_body(meta: BodyMeta, request: ChatRequest, reply: Reply) -> dict[str, Any]:
    """The chat-completion JSON object: the message (text, reasoning, tool calls) and usage."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = [call.to_json() for call in reply.tool_calls]
    return {
        "id": meta.completion_id,
        "object": "chat.completion",
        "created": meta.created,
        "model": request.model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}
        ],
        "usage": usage_body(reply, meta),
        "system_fingerprint": "fp_pipeline_local",
    }


def text_completion_body(
    meta: BodyMeta, request: CompletionRequest, reply: Reply
) -> dict[str, Any]:
    """The (FIM) text-completion JSON object: the text that fills the hole, and usage."""
    choice = {
        "index": 0,
        "text": reply.content or "",
        "logprobs": None,
        "finish_reason": reply.finish_reason,
    }
    return {
        "id": meta.completion_id,
        "object": "text_completion",
        "created": meta.created,
        "model": request.model,
        "choices": [choice],
        "usage": usage_body(reply, meta),
        "system_fingerprint": "fp_pipeline_local",
    }


# ---------------------------------------------------------------------------------------------
# ASGI helpers (I/O)

JSON_TYPE: Final = b"application/json"
HTML_TYPE: Final = b"text/html; charset=utf-8"
Headers = Sequence[tuple[bytes, bytes]]


async def _respond(
    send: Send, status: int, body: bytes, content_type: bytes = JSON_TYPE, headers: Headers = ()
) -> None:
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body})


async def _respond_slowly(
    send: Send, body: bytes, delay_s: float, interval_s: float, headers: Headers = ()
) -> None:
    """200 at once, then an empty line every ``interval_s`` until ``delay_s``, then ``body``."""
    start: Message = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", JSON_TYPE), *headers],
    }
    await send(start)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + delay_s
    beat = loop.time()
    while (now := loop.time()) < deadline:
        if now >= beat:
            await send({"type": "http.response.body", "body": b"\n", "more_body": True})
            beat += interval_s
        await asyncio.sleep(min(beat, deadline) - now)
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or None when the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _wait_for_disconnect(receive: Receive, seconds: float) -> bool:
    """Wait up to ``seconds``; True when the client disconnected meanwhile."""
    try:
        async with asyncio.timeout(seconds):
            while (await receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        return False
    return True


class ConnectionDropped(Exception):
    """Raised to drop a connection when the ASGI server does not expose its transport."""


async def _drop_connection(receive: Receive) -> None:
    """Close the connection without sending anything (uvicorn: through the transport)."""
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is None:
        raise ConnectionDropped("fault_drop")
    transport.close()
    await receive()  # returns http.disconnect once the protocol saw the close


# ---------------------------------------------------------------------------------------------
# The application


@dataclass(frozen=True, slots=True, kw_only=True)
class _Admitted:
    """A request that passed every check, with what its answer needs."""

    request: AnyRequest
    prompt_tokens: int
    cache_hit: int
    headers: Headers


Parser = Callable[[bytes], AnyRequest]


class _Endpoint:
    """One completions route as a bare ASGI app: the shared service with its body parser."""

    def __init__(self, service: _Completions, parse: Parser) -> None:
        self.service = service
        self.parse = parse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.service.handle(scope, receive, send, self.parse)


class _Completions:
    """Chat and FIM completions (the hot path): one set of limits, faults, stats and cache.

    Both kinds of request share the in-flight cap, the buckets, the fault draws, the prompt
    cache and ``/_stats``, as they share an account at the provider.
    """

    def __init__(self, options: ServerOptions, clock: Callable[[], float]) -> None:
        self.options = options
        self.clock = clock
        self.stats = ServerStats()
        self.vocab = vocabulary()
        self.cache = PrefixCache(options.prefix_cache_entries)
        self.limiter = RateLimiter(options.rpm, options.tpm, clock())
        self.faults = random.Random(options.seed)
        self.ids = itertools.count(1)
        self.id_prefix = os.urandom(4).hex()
        self.expected_auth = f"Bearer {options.api_key}".encode() if options.api_key else b""

    def authorized(self, scope: Scope) -> bool:
        if not self.expected_auth:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self.expected_auth)
        return False

    async def handle(self, scope: Scope, receive: Receive, send: Send, parse: Parser) -> None:
        """Answer one request whose body ``parse`` validates."""
        stats = self.stats
        stats.requests_total += 1
        if not self.authorized(scope):
            stats.outcomes[Outcome.UNAUTHORIZED] += 1
            await _respond(send, 401, UNAUTHORIZED_BODY)
            return
        body = await _read_body(receive)
        if body is None:
            return
        digest = body_digest(body, self.options.seed)
        stats.record_send(digest[:8])
        if not stats.try_enter(self.options.max_concurrency):
            stats.outcomes[Outcome.RATE_LIMITED] += 1
            headers = self.limiter.headers() if self.options.profile == "openai" else ()
            if headers:
                headers = (*headers, (b"retry-after", b"1"))
            await _respond(send, 429, CONCURRENCY_BODY, headers=headers)
            return
        try:
            outcome = await self._serve(body, digest, parse, receive, send)
        finally:
            stats.leave()
        stats.outcomes[outcome] += 1

    async def _serve(
        self, raw: bytes, digest: bytes, parse: Parser, receive: Receive, send: Send
    ) -> Outcome:
        admitted = await self._check(raw, digest, parse, send)
        if isinstance(admitted, Outcome):
            return admitted
        options = self.options
        fault = draw_fault(options, self.faults.random())
        delay = (options.latency_ms + self.faults.random() * options.latency_jitter_ms) / 1000
        if fault is Outcome.TIMEOUT:
            if await _wait_for_disconnect(receive, options.timeout_hang_s):
                return fault
            delay = 0.0
        elif fault in (Outcome.SERVER_ERROR, Outcome.UNAVAILABLE, Outcome.BAD_GATEWAY):
            await asyncio.sleep(delay)
            await self._send_error(fault, send, admitted.headers)
            return fault
        elif fault is Outcome.DROP:
            await asyncio.sleep(delay)
            await _drop_connection(receive)
            return fault
        body = self._reply_body(admitted)
        if fault is Outcome.MALFORMED:
            body = body[: len(body) // 2]
        if options.profile == "deepseek" and delay * 1000 > options.keepalive_after_ms:
            interval = options.keepalive_interval_ms / 1000
            await _respond_slowly(send, body, delay, interval, admitted.headers)
        else:
            await asyncio.sleep(delay)
            await _respond(send, 200, body, headers=admitted.headers)
        return fault or Outcome.OK

    async def _check(
        self, raw: bytes, digest: bytes, parse: Parser, send: Send
    ) -> _Admitted | Outcome:
        """Validate the body and take the rate limits; answers and returns the outcome if not."""
        options = self.options
        try:
            request = parse(raw)
            refused = rejection(request, digest, options)
            if refused is not None:
                raise refused
        except InvalidRequest as exc:
            body = error_body(exc.message, "invalid_request_error", param=exc.param)
            await _respond(send, 400, body)
            return Outcome.INVALID
        prompt_tokens, ids = prompt_token_ids(request)
        headers: Headers = ()
        if options.profile == "openai":
            decision = self.limiter.admit(prompt_tokens + request.max_tokens, self.clock())
            headers = decision.headers
            if not decision.allowed:
                retry = (b"retry-after", str(decision.retry_after_s).encode())
                body = error_body(decision.message, decision.limited_by, code="rate_limit_exceeded")
                await _respond(send, 429, body, headers=(*headers, retry))
                return Outcome.RATE_LIMITED
        cache_hit = self.cache.lookup_and_add(ids) if ids is not None else 0
        return _Admitted(
            request=request, prompt_tokens=prompt_tokens, cache_hit=cache_hit, headers=headers
        )

    def _reply_body(self, admitted: _Admitted) -> bytes:
        """The JSON reply to an admitted request (its usage counts towards ``/_stats``)."""
        request = admitted.request
        rng = random.Random(reply_seed(request, self.options.seed))
        kind = "chatcmpl" if isinstance(request, ChatRequest) else "cmpl"
        meta = BodyMeta(
            completion_id=f"{kind}-{self.id_prefix}{next(self.ids):012d}",
            created=int(time.time()),
            prompt_tokens=admitted.prompt_tokens,
            cache_hit=admitted.cache_hit,
            profile=self.options.profile,
        )
        payload: dict[str, Any]
        if isinstance(request, ChatRequest):
            reply = make_reply(request, rng, self.options, self.vocab)
            payload = completion_body(meta, request, reply)
        else:
            reply = fim_reply(request.max_tokens, rng, self.options, self.vocab)
            payload = text_completion_body(meta, request, reply)
        self.stats.record_usage(reply, admitted.prompt_tokens, admitted.cache_hit)
        return json.dumps(payload, separators=(",", ":")).encode()

    @staticmethod
    async def _send_error(fault: Outcome, send: Send, headers: Headers) -> None:
        if fault is Outcome.SERVER_ERROR:
            await _respond(send, 500, SERVER_ERROR_BODY, headers=headers)
        elif fault is Outcome.UNAVAILABLE:
            await _respond(send, 503, HTML_503, HTML_TYPE)
        else:
            await _respond(send, 502, HTML_502, HTML_TYPE)


def create_app(
    options: ServerOptions | None = None, *, clock: Callable[[], float] = time.monotonic
) -> Starlette:
    """The server as an ASGI app (also usable in-process with ``httpx.ASGITransport``)."""
    options = options or ServerOptions()
    service = _Completions(options, clock)
    chat = _Endpoint(service, parse_chat_request)
    fim = _Endpoint(service, parse_completion_request)

    async def models(request: Request) -> Response:
        if not service.authorized(request.scope):
            return Response(UNAUTHORIZED_BODY, 401, media_type="application/json")
        data = [{"id": name, "object": "model", "owned_by": "pipeline"} for name in MODEL_IDS]
        return JSONResponse({"object": "list", "data": data})

    async def stats(request: Request) -> Response:
        return JSONResponse(service.stats.snapshot())

    async def reset_stats(request: Request) -> Response:
        service.stats.reset()
        return JSONResponse(service.stats.snapshot())

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = str(getattr(exc, "detail", "error"))
        body = error_body(f"{detail}: {request.method} {request.url.path}", "invalid_request_error")
        return Response(body, status, media_type="application/json")

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/chat/completions", chat, methods=["POST"]),
        *(Route(path, fim, methods=["POST"]) for path in FIM_PATHS),
        Route("/v1/models", models, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        Route("/_stats", stats, methods=["GET"]),
        Route("/_stats/reset", reset_stats, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: http_error, 405: http_error})


# ---------------------------------------------------------------------------------------------
# Running it


def _uvicorn_server(app: Starlette, on_started: Callable[[], None] | None) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, telling when it listens and returning normally on a signal."""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and on_started is not None:
                on_started()

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        app,
        http="httptools",
        loop="auto",  # uvloop when it is installed, else asyncio
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=30,
        timeout_graceful_shutdown=1,
        backlog=4096,
    )
    return Server(config)


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0 = a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it Nagle's algorithm delays every small response by a delayed-ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    return sock


def serve(
    options: ServerOptions | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM; ``on_ready(port)`` is called once it accepts connections.

    Binds ``host:port`` itself (port 0 = a free port, passed to ``on_ready``), loads the
    tokenizer before announcing the port, and returns after a graceful shutdown (requests
    still running after one second are cancelled).
    """
    options = options or ServerOptions()
    sock = bind_socket(host, port)
    try:
        bound_port: int = sock.getsockname()[1]
        ready = None if on_ready is None else functools.partial(on_ready, bound_port)
        _uvicorn_server(create_app(options), ready).run(sockets=[sock])
    finally:
        sock.close()


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m pipeline.server``: ``--field-name`` per option."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.server",
        description="The built-in OpenAI-compatible server for tests and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=8000, help="Port (0 = any free port).")
    for option in dataclasses.fields(ServerOptions):
        flag = "--" + option.name.replace("_", "-")
        text = option.metadata["help"]
        if option.name == "api_key":
            parser.add_argument(flag, default=os.environ.get(API_KEY_ENV, ""), help=text)
        elif isinstance(option.default, bool):
            parser.add_argument(
                flag, default=option.default, action=argparse.BooleanOptionalAction, help=text
            )
        else:
            parser.add_argument(
                flag,
                type=type(option.default),
                default=option.default,
                choices=option.metadata.get("choices"),
                help=f"{text} (default: %(default)s)",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, print the ready line once listening, serve until a signal."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {
        option.name: getattr(args, option.name) for option in dataclasses.fields(ServerOptions)
    }
    try:
        options = ServerOptions(**values)
    except ValueError as exc:
        parser.error(str(exc))
    host: str = args.host
    shown = f"[{host}]" if ":" in host else host

    def announce(port: int) -> None:
        print(f"listening on http://{shown}:{port}", flush=True)  # the ready line

    serve(options, host=host, port=args.port, on_ready=announce)


if __name__ == "__main__":
    main()
