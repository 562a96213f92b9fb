"""Bare ASGI I/O for the built-in server's hot path: send a response (at once, or slowly with
keep-alive lines), read a request body, wait for a disconnect, drop a connection."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Send

JSON_TYPE: Final = b"application/json"
HTML_TYPE: Final = b"text/html; charset=utf-8"
Headers = Sequence[tuple[bytes, bytes]]


async def respond(
    send: Send, status: int, body: bytes, content_type: bytes = JSON_TYPE, headers: Headers = ()
) -> None:
    """Send a whole response: status, content type and length, ``headers``, then ``body``."""
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


async def respond_slowly(
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


async def read_body(receive: Receive) -> bytes | None:
    """The request body, or None when the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def wait_for_disconnect(receive: Receive, seconds: float) -> bool:
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


async def drop_connection(receive: Receive) -> None:
    """Close the connection without sending anything (uvicorn: through the transport)."""
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is None:
        raise ConnectionDropped("fault_drop")
    transport.close()
    await receive()  # returns http.disconnect once the protocol saw the close
