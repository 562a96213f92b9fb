"""The only network code: send one request body, return what happened as a value.

:class:`ChatClient` is the seam. By default it POSTs with one ``aiohttp`` session (plain
httpx's connection pool costs ~19 ms of CPU per request at 256 in flight, and even httpx's
request and response objects around an aiohttp transport cost 0.2 ms per request, as much
as aiohttp's whole exchange); given an httpx transport (``httpx.MockTransport`` in the tests,
or one of your own) it sends through that instead, with the same classification and parsing.
Every third-party error is translated here into an :class:`Attempt` with a
:class:`~pipeline.provider.retry.Failure` kind, so no httpx or aiohttp exception leaves this module.
The API key is sent as a header and appears in no message.

``send(body, before_send=...)`` calls ``before_send`` at the last moment before the request's
bytes are handed to the socket, in the same step as that write (the engine records the row's
intent there, so a ``kill -9`` cannot fall between the record and the write: every request
the next run reports as unanswered was written to the connection). A request that fails
before that moment (no connection) never calls it. What ``before_send`` raises is raised by
:meth:`ChatClient.send` (it is not a network failure).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import anyio
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import BytesPayload
from yarl import URL

from pipeline.money.pricing import Usage
from pipeline.provider.retry import Failure, failure_of_status
from pipeline.provider.wire import error_message, parse_reply, parse_retry_after, short
from pipeline.results import Reply

if TYPE_CHECKING:
    import httpx  # imported when a transport is given: it costs ~70 ms of start-up

USER_AGENT = "pipeline/0.1"


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """The outcome of one HTTP attempt."""

    reply: Reply | None
    """Set when the attempt succeeded."""
    failure: Failure | None
    """Set when it did not."""
    error: str | None
    status: int | None
    usage: Usage | None
    """Billed usage reported by the provider, if any (even on an unusable answer)."""
    retry_after_s: float | None
    latency_s: float
    rate_headers: Mapping[str, str] | None = None
    """The response's ``x-ratelimit-*`` and ``retry-after`` headers, when it had any."""
    reached: bool = True
    """False when the request never left this machine (the name did not resolve, or the
    connection was refused): no server saw it, so none can have billed it."""

    @property
    def ok(self) -> bool:
        return self.reply is not None


RawHeaders = Sequence[tuple[bytes, bytes]]
BeforeSend = Callable[[], None]


class BeforeSendFailed(Exception):
    """``before_send`` raised: the request was not written; ``error`` is what it raised."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _CalledBody(BytesPayload):
    """A request body that calls ``before`` right before its bytes (and the headers, which
    aiohttp writes together with the first chunk) go to the socket: no event-loop step
    lies between the call and the write."""

    def __init__(self, body: bytes, before: BeforeSend) -> None:
        super().__init__(body, content_type="application/json")
        self._before = before
        self.failed: BaseException | None = None

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        try:
            self._before()
        except BaseException as exc:  # raised again by ChatClient.send, not as a network error
            self.failed = exc
            raise
        await super().write_with_length(writer, content_length)


class _AiohttpPoster:
    """The way out by default: one aiohttp session, sized for the requests in flight.

    aiohttp directly, not behind an httpx transport: building an ``httpx.Request`` and an
    ``httpx.Response`` around every call, and an anyio cancel scope for its timeout, measured
    0.2 ms of CPU per request at 256 in flight (0.45 against 0.25 ms), the largest single
    cost of the whole client (bench/throughput.py). ``ClientTimeout(total=...)`` bounds the
    whole exchange, keep-alive lines included.
    """

    def __init__(
        self, url: str, headers: Mapping[str, str], timeout_s: float, max_connections: int
    ) -> None:
        self._target = URL(url)  # parsed once, not on every request
        self._headers = dict(headers)
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,  # the session's: not merged again into every request's
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            auto_decompress=True,
        )
        return self._session

    async def warm(self) -> None:
        """Open one connection to the endpoint and leave it in the pool, sending nothing.

        Run while the first input batch is read and planned, so that the first request finds
        a connection (and, over HTTPS, its TLS handshake) ready instead of waiting behind the
        connections of all the others. Any failure is left to the requests to report."""
        session = self._session or self._open()
        connector = session.connector
        if connector is None:  # pragma: no cover - the session made here always has one
            return
        try:
            request = aiohttp.ClientRequest("POST", self._target, loop=asyncio.get_running_loop())
            connection = await connector.connect(request, [], session.timeout)
        except Exception:  # the first request reports whatever is wrong
            return
        connection.release()

    async def post(
        self, body: bytes, before_send: BeforeSend | None
    ) -> tuple[int, RawHeaders, bytes]:
        session = self._session or self._open()
        data = body if before_send is None else _CalledBody(body, before_send)
        try:
            async with session.post(self._target, data=data, allow_redirects=False) as response:
                raw = await response.read()
                return response.status, response.raw_headers, raw
        except BaseException:
            if isinstance(data, _CalledBody) and data.failed is not None:
                raise BeforeSendFailed(data.failed) from None
            raise

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class _TransportPoster:
    """Any httpx transport instead (``httpx.MockTransport`` in tests, or one of your own)."""

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str],
        timeout_s: float,
        transport: httpx.AsyncBaseTransport,
    ) -> None:
        import httpx

        self._url = httpx.URL(url)
        self._headers = httpx.Headers(headers)
        self._timeout_s = timeout_s
        self._extensions = {
            "timeout": {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": None}
        }
        self._transport = transport

    async def post(
        self, body: bytes, before_send: BeforeSend | None
    ) -> tuple[int, RawHeaders, bytes]:
        import httpx

        if before_send is not None:
            try:
                before_send()
            except BaseException as exc:
                raise BeforeSendFailed(exc) from None
        with anyio.fail_after(self._timeout_s):
            request = httpx.Request(
                "POST", self._url, headers=self._headers, content=body, extensions=self._extensions
            )
            response = await self._transport.handle_async_request(request)
            try:
                raw = await response.aread()
            finally:
                await response.aclose()
        return response.status_code, response.headers.raw, raw

    async def warm(self) -> None:
        """Nothing to open ahead with a transport of one's own."""

    async def aclose(self) -> None:
        await self._transport.aclose()


class ChatClient:
    """Sends request bodies to one endpoint URL."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None,
        timeout_s: float,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"content-type": "application/json", "user-agent": USER_AGENT}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.url = url
        self._timeout_s = timeout_s
        self._poster: _AiohttpPoster | _TransportPoster = (
            _AiohttpPoster(url, headers, timeout_s, max_connections)
            if transport is None
            else _TransportPoster(url, headers, timeout_s, transport)
        )

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._poster.aclose()

    async def warm(self) -> None:
        """Open a connection ahead of the first request (see :meth:`_AiohttpPoster.warm`)."""
        await self._poster.warm()

    async def send(self, body: bytes, *, before_send: BeforeSend | None = None) -> Attempt:
        """POST ``body``; never raises for anything the network or the server does.
        ``before_send`` is called right before the bytes are written (see the module)."""
        started = time.monotonic()
        try:
            status, headers, raw = await self._poster.post(body, before_send)
        except BeforeSendFailed as failed:
            raise failed.error from None
        except TimeoutError:
            return _failed(Failure.TIMEOUT, f"no answer within {self._timeout_s:g} s", started)
        except Exception as exc:  # the seam: nothing from below may escape
            failure, reason = transport_failure(exc, self._timeout_s)
            return _failed(failure, reason, started, reached=not never_connected(exc))
        latency = time.monotonic() - started
        rate_headers = _rate_headers(headers, status)
        if status != 200:
            return Attempt(
                reply=None,
                failure=failure_of_status(status),
                error=error_message(status, raw, _header(headers, b"content-type") or ""),
                status=status,
                usage=None,
                retry_after_s=parse_retry_after(_header(headers, b"retry-after")),
                latency_s=latency,
                rate_headers=rate_headers,
            )
        reply, usage, error = parse_reply(raw)
        return Attempt(
            reply=reply,
            failure=None if reply is not None else Failure.MALFORMED,
            error=error,
            status=status,
            usage=usage,
            retry_after_s=None,
            latency_s=latency,
            rate_headers=rate_headers,
        )


def _header(headers: RawHeaders, name: bytes) -> str | None:
    """The first value of a header (``name`` in lower case), from the raw list."""
    for raw_name, raw_value in headers:
        if raw_name.lower() == name:
            return raw_value.decode("latin-1")
    return None


_RATE_HEADER_NAMES = (b"retry-after", b"retry-after-ms")


def _rate_headers(headers: RawHeaders, status: int) -> dict[str, str] | None:
    """The headers a rate limiter learns from; None when there are none (the common case)."""
    found: dict[str, str] | None = None
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        if name.startswith(b"x-ratelimit-") or name in _RATE_HEADER_NAMES:
            if found is None:
                found = {}
            found[name.decode("latin-1")] = raw_value.decode("latin-1")
    if found is None and status == 429:
        return {}
    return found


def transport_failure(exc: BaseException, timeout_s: float) -> tuple[Failure, str]:
    """Classify an exception raised while sending or receiving (aiohttp's or httpx's):
    timeouts are timeouts, anything else (a refused or dropped connection, a body cut
    short) is a connection error. A wrapped exception's cause is checked first."""
    cause = exc.__cause__ or exc
    name = type(cause).__name__
    timed_out = isinstance(cause, TimeoutError) or "Timeout" in name  # httpx's end so too
    if timed_out:
        return Failure.TIMEOUT, f"no answer within {timeout_s:g} s ({name})"
    detail = short(str(cause))
    reason = f"{name}: {detail}" if detail else name
    return Failure.CONNECTION, f"connection error ({reason})"


def never_connected(exc: BaseException) -> bool:
    """Whether ``exc`` means no connection was ever made, so no byte of the request was sent:
    the name did not resolve or the connection was refused (aiohttp's connector errors,
    httpx's ConnectError). A connection dropped or timed out later may have been billed."""
    cause = exc.__cause__ or exc
    if isinstance(cause, aiohttp.ClientConnectorError | ConnectionRefusedError | socket.gaierror):
        return True
    return type(cause).__name__ == "ConnectError" and type(cause).__module__.startswith("httpx")


def _failed(failure: Failure, error: str, started: float, *, reached: bool = True) -> Attempt:
    return Attempt(
        reached=reached,
        reply=None,
        failure=failure,
        error=error,
        status=None,
        usage=None,
        retry_after_s=None,
        latency_s=time.monotonic() - started,
    )
