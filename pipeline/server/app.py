"""The built-in OpenAI-compatible server as an ASGI app: its endpoints and the order of checks.

Start it with ``pipeline serve`` or ``python -m pipeline.server --port 8000 [options]``
(:mod:`pipeline.server.command`, which lists the options); it prints one line,
``listening on http://127.0.0.1:PORT/v1 (profile deepseek)``, once it accepts connections (with
``--port 0`` the system picks a free port), and runs until SIGINT or SIGTERM. Point a job at
``http://127.0.0.1:PORT/v1``. Tests start it with :class:`pipeline.server.process.LocalServer`.
Request bodies are read and checked in :mod:`pipeline.server.requests`, answers drawn in
:mod:`pipeline.server.simulate`, faults in :mod:`pipeline.server.faults`, rate limits kept in
:mod:`pipeline.server.ratelimit`, bodies written by :mod:`pipeline.server.bodies` and counted
in :mod:`pipeline.server.stats`; this module ties them together behind the HTTP routes.

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
    The models served: ``deepseek/deepseek-v4-flash``, ``deepseek-v4-flash``, ``gpt-4o-mini``
    and those ``served_models`` adds. A chat or FIM request for any other model gets OpenAI's
    404: ``{"error": {"message": "The model `X` does not exist or you do not have access to
    it.", "type": "invalid_request_error", "param": null, "code": "model_not_found"}}``.
``/v1/files``, ``/v1/batches``
    OpenAI's Batch API: upload, list, content and delete of files; create, retrieve, list and
    cancel of batches, processed in the background (:mod:`pipeline.server.batch_api`).
``GET /_stats``, ``POST /_stats/reset``
    Counters for tests: ``requests_total``; one count per outcome (``ok``, ``429``, ``400``,
    ``401``, ``500``, ``503``, ``502_html``, ``drop``, ``malformed``, ``timeout``, and ``404``
    for a model not served);
    ``in_flight`` and ``max_in_flight_seen``; ``distinct_requests`` (distinct request bodies,
    byte for byte), ``max_sends_per_request`` (most times one identical body was received) and
    ``sends_histogram`` (times received -> number of bodies); ``unread_bodies`` (requests whose
    client went away before their body was read: they count in ``requests_total`` only);
    ``prompt_tokens_total``,
    ``completion_tokens_total``, ``reasoning_tokens_total`` and ``cache_hit_tokens_total`` over
    the replies sent; ``files_uploaded``, ``file_downloads``, ``files_deleted``,
    ``batches_created``, ``batches_cancelled`` and ``batch_requests`` (lines answered) of the
    Batch API; ``first_request_at``, the ``time.monotonic()`` of the first request since the
    last reset (null before one; the clock every process of the machine shares, so a
    benchmark can time a client's start-up); ``per_second``: ``arrivals`` (requests received)
    and ``in_flight`` (the average number in flight) for each second since the last reset
    (the last hour kept). ``/_stats`` needs no API key. Every body is remembered (about 100
    bytes each) until the counters are reset.

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
    as OpenAI does, or over ``rate_window_s`` seconds (1: a bucket holds one second of the
    limit, quantized as OpenAI may enforce it); a request costs 1 request and
    ``prompt_tokens + max_tokens`` tokens. Responses carry
    ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for each limit set (reset is
    the time until the bucket is full, written like ``1s``, ``6m0s``, ``120ms``); over a limit
    the answer is 429 with ``Retry-After`` (whole seconds, at least 1). ``max_concurrency``
    applies here too.

Order of checks and latency
---------------------------
A chat or FIM request is checked in this order, and the first check that fails answers at once:
API key (401), the in-flight cap (429), the body (400), the model (404 unless served),
``reject_substring`` and ``fault_400`` (400), the ``rpm``/``tpm`` buckets (429). A request that
passes waits ``latency_ms`` plus a uniform draw of up to ``latency_jitter_ms`` and is then
answered, or fails with the random fault drawn for it.

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

Performance: one process spends 0.25-0.5 ms of CPU per request (small prompts, replies of up
to 256 tokens). On a two-core machine, with an aiohttp load generator on the same machine and
200 requests in flight, it answers 2,600-4,000 requests per second; slow replies streamed with
keep-alive lines cost about 30 % more. One process keeps ``/_stats``, the limits and the
prompt cache exact.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.rows.prefix import PrefixCache
from pipeline.server.asgi import (
    HTML_TYPE,
    Headers,
    drop_connection,
    read_body,
    respond,
    respond_slowly,
    wait_for_disconnect,
)
from pipeline.server.batch_api import BatchService
from pipeline.server.bodies import (
    CONCURRENCY_BODY,
    HTML_502,
    HTML_503,
    SERVER_ERROR_BODY,
    UNAUTHORIZED_BODY,
    BodyMeta,
    completion_body,
    error_body,
    model_not_found_body,
    text_completion_body,
)
from pipeline.server.faults import (
    MODEL_NOT_FOUND,
    ServerOutcome,
    body_digest,
    draw_fault,
    rejection,
)
from pipeline.server.files import FileStore
from pipeline.server.options import ServerOptions
from pipeline.server.ratelimit import RateLimiter
from pipeline.server.requests import (
    AnyRequest,
    ChatRequest,
    InvalidRequest,
    parse_chat_request,
    parse_completion_request,
    prompt_token_ids,
    reply_seed,
)
from pipeline.server.simulate import fim_reply, make_reply, vocabulary
from pipeline.server.stats import ServerStats

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

FIM_PATHS: Final = ("/v1/completions", "/completions", "/beta/completions", "/v1/beta/completions")


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
        self.limiter = RateLimiter(options.rpm, options.tpm, clock(), options.rate_window_s)
        self.faults = random.Random(options.seed)
        self.ids = itertools.count(1)
        self.id_prefix = os.urandom(4).hex()
        self.expected_auth = f"Bearer {options.api_key}".encode() if options.api_key else b""
        self.served = frozenset(options.models)

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
        if stats.first_request_at is None:
            stats.first_request_at = time.monotonic()
        if not self.authorized(scope):
            stats.outcomes[ServerOutcome.UNAUTHORIZED] += 1
            await respond(send, 401, UNAUTHORIZED_BODY)
            return
        body = await read_body(receive)
        if body is None:
            stats.unread_bodies += 1
            return
        digest = body_digest(body, self.options.seed)
        stats.record_send(digest[:8])
        if not stats.try_enter(self.options.max_concurrency):
            stats.outcomes[ServerOutcome.RATE_LIMITED] += 1
            headers = self.limiter.headers() if self.options.profile == "openai" else ()
            if headers:
                headers = (*headers, (b"retry-after", b"1"))
            await respond(send, 429, CONCURRENCY_BODY, headers=headers)
            return
        try:
            outcome = await self._serve(body, digest, parse, receive, send)
        finally:
            stats.leave()
        stats.outcomes[outcome] += 1

    async def _serve(
        self, raw: bytes, digest: bytes, parse: Parser, receive: Receive, send: Send
    ) -> str:
        admitted = await self._check(raw, digest, parse, send)
        if isinstance(admitted, str):
            return admitted
        options = self.options
        fault = draw_fault(options, self.faults.random())
        delay = (options.latency_ms + self.faults.random() * options.latency_jitter_ms) / 1000
        if fault is ServerOutcome.TIMEOUT:
            if await wait_for_disconnect(receive, options.timeout_hang_s):
                return fault
            delay = 0.0
        elif fault in (
            ServerOutcome.SERVER_ERROR,
            ServerOutcome.UNAVAILABLE,
            ServerOutcome.BAD_GATEWAY,
        ):
            await asyncio.sleep(delay)
            await self._send_error(fault, send, admitted.headers)
            return fault
        elif fault is ServerOutcome.DROP:
            await asyncio.sleep(delay)
            await drop_connection(receive)
            return fault
        body = self._reply_body(admitted)
        if fault is ServerOutcome.MALFORMED:
            body = body[: len(body) // 2]
        if options.profile == "deepseek" and delay * 1000 > options.keepalive_after_ms:
            interval = options.keepalive_interval_ms / 1000
            await respond_slowly(send, body, delay, interval, admitted.headers)
        else:
            await asyncio.sleep(delay)
            await respond(send, 200, body, headers=admitted.headers)
        return fault or ServerOutcome.OK

    async def _check(self, raw: bytes, digest: bytes, parse: Parser, send: Send) -> _Admitted | str:
        """Validate the body and the model and take the rate limits; if one fails, answers and
        returns the outcome (a :class:`ServerOutcome` or :data:`MODEL_NOT_FOUND`)."""
        options = self.options
        try:
            request = parse(raw)
            if request.model not in self.served:
                await respond(send, 404, model_not_found_body(request.model))
                return MODEL_NOT_FOUND
            refused = rejection(request, digest, options)
            if refused is not None:
                raise refused
        except InvalidRequest as exc:
            body = error_body(exc.message, "invalid_request_error", param=exc.param)
            await respond(send, 400, body)
            return ServerOutcome.INVALID
        prompt_tokens, ids = prompt_token_ids(request)
        headers: Headers = ()
        if options.profile == "openai":
            decision = self.limiter.admit(prompt_tokens + request.max_tokens, self.clock())
            headers = decision.headers
            if not decision.allowed:
                retry = (b"retry-after", str(decision.retry_after_s).encode())
                body = error_body(decision.message, decision.limited_by, code="rate_limit_exceeded")
                await respond(send, 429, body, headers=(*headers, retry))
                return ServerOutcome.RATE_LIMITED
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

    def answer_offline(self, endpoint: str, raw: bytes) -> tuple[int, bytes]:
        """A Batch API line's answer: the body checks and the reply of the online path,
        without its rate limits, faults and latency (see :mod:`pipeline.server.batch_api`)."""
        parse = parse_chat_request if endpoint.endswith("chat/completions") else None
        try:
            request = (parse or parse_completion_request)(raw)
            if request.model not in self.served:
                return 404, model_not_found_body(request.model)
            refused = rejection(request, body_digest(raw, self.options.seed), self.options)
            if refused is not None:
                raise refused
        except InvalidRequest as exc:
            return 400, error_body(exc.message, "invalid_request_error", param=exc.param)
        prompt_tokens, ids = prompt_token_ids(request)
        cache_hit = self.cache.lookup_and_add(ids) if ids is not None else 0
        admitted = _Admitted(
            request=request, prompt_tokens=prompt_tokens, cache_hit=cache_hit, headers=()
        )
        return 200, self._reply_body(admitted)

    @staticmethod
    async def _send_error(fault: ServerOutcome, send: Send, headers: Headers) -> None:
        if fault is ServerOutcome.SERVER_ERROR:
            await respond(send, 500, SERVER_ERROR_BODY, headers=headers)
        elif fault is ServerOutcome.UNAVAILABLE:
            await respond(send, 503, HTML_503, HTML_TYPE)
        else:
            await respond(send, 502, HTML_502, HTML_TYPE)


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
        data = [{"id": name, "object": "model", "owned_by": "pipeline"} for name in options.models]
        return JSONResponse({"object": "list", "data": data})

    files = FileStore()
    batches = BatchService(options, files, service.answer_offline)

    def snapshot() -> dict[str, Any]:
        counts = ("files_uploaded", "file_downloads", "files_deleted", "batches_created")
        more = ("batches_cancelled", "batch_requests")
        return {**service.stats.snapshot(), **{name: files.counts[name] for name in counts + more}}

    async def stats(request: Request) -> Response:
        return JSONResponse(snapshot())

    async def reset_stats(request: Request) -> Response:
        service.stats.reset()
        files.counts.clear()
        return JSONResponse(snapshot())

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Any:
        async def endpoint(request: Request) -> Response:
            if not service.authorized(request.scope):
                return Response(UNAUTHORIZED_BODY, 401, media_type="application/json")
            return await handler(request)

        return endpoint

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
    if options.batch_api:
        routes += [
            Route("/v1/files", guarded(files.upload), methods=["POST"]),
            Route("/v1/files", guarded(files.listing), methods=["GET"]),
            Route("/v1/files/{file_id}", guarded(files.retrieve), methods=["GET"]),
            Route("/v1/files/{file_id}", guarded(files.delete), methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", guarded(files.content), methods=["GET"]),
            Route("/v1/batches", guarded(batches.create), methods=["POST"]),
            Route("/v1/batches", guarded(batches.listing), methods=["GET"]),
            Route("/v1/batches/{batch_id}", guarded(batches.retrieve), methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", guarded(batches.cancel), methods=["POST"]),
        ]
    return Starlette(routes=routes, exception_handlers={404: http_error, 405: http_error})
