"""Helpers for testing code that uses pipeline, shipped with it (as httpx and anyio ship theirs).

Three levels, as in the project's own tests:

- **Pure logic with a manual clock.** :class:`FakeClock` is a ``clock()`` callable whose time
  moves only when the test says so; pass it wherever a ``clock`` is taken (the runner, its
  figures, the limiter)::

      clock = FakeClock()
      stats = RunStats(total_rows=10, clock=clock)
      clock.advance(2.0)

- **The client and the runner with a scripted provider.** :class:`Script` is an
  ``httpx.MockTransport`` handler that answers the requests it receives with the responses it
  was given, in order, then with a fallback (:func:`echo` by default), and keeps every
  request it saw. :func:`chat_reply` and :func:`error_reply` build the responses::

      script = Script(error_reply(429, headers={"retry-after": "0"}), chat_reply("positive"))
      runner = Runner(job, api_key=None, transport=script.transport())

- **End to end against a real HTTP server.** :func:`local_server` starts the built-in
  OpenAI-compatible server in a child process on a free loopback port and yields its base
  URL; it stops when the block ends::

      with local_server(latency_ms=5, fault_500=0.1) as base_url:
          ...

Nothing here reaches the network beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx

from pipeline.server.options import ServerOptions
from pipeline.server.process import LocalServer

Handler = Callable[[httpx.Request], httpx.Response]
"""What ``httpx.MockTransport`` calls for each request."""


class FakeClock:
    """A clock for tests: ``clock()`` is the time in seconds; it moves only by :meth:`advance`
    or :meth:`set`."""

    __slots__ = ("now",)

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the time forward by ``seconds``; returns the new time."""
        if seconds < 0:
            raise ValueError(f"a clock does not go back (advance by {seconds})")
        self.now += seconds
        return self.now

    def set(self, now: float) -> None:
        """Set the time (never earlier than it is)."""
        if now < self.now:
            raise ValueError(f"a clock does not go back (from {self.now} to {now})")
        self.now = now


def chat_reply(
    content: str | None,
    *,
    prompt: int = 10,
    completion: int = 3,
    cached: int = 0,
    model: str = "deepseek-v4-flash",
    finish_reason: str = "stop",
    reasoning: str | None = None,
    tool_calls: list[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    """A 200 chat-completions answer with ``content`` and the usage given (``cached``: prompt
    tokens served from the provider's cache, reported as DeepSeek does)."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if tool_calls is not None:
        message["tool_calls"] = list(tool_calls)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached:
        usage["prompt_cache_hit_tokens"] = cached
        usage["prompt_cache_miss_tokens"] = prompt - cached
    return httpx.Response(
        200,
        headers=dict(headers or {}),
        json={
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": usage,
        },
    )


def error_reply(
    status: int, message: str = "error", *, headers: Mapping[str, str] | None = None
) -> httpx.Response:
    """An error answer in OpenAI's shape: ``{"error": {"message": ...}}``."""
    return httpx.Response(status, headers=dict(headers or {}), json={"error": {"message": message}})


def last_message(request: httpx.Request) -> str:
    """The text of the last message of a chat request (or the prompt of a completion)."""
    body = json.loads(request.content)
    if "messages" in body:
        content = body["messages"][-1]["content"]
        return content if isinstance(content, str) else json.dumps(content)
    return str(body.get("prompt", ""))


def echo(request: httpx.Request) -> httpx.Response:
    """Answer ``re: <the last message>``, with 10 prompt and 3 completion tokens."""
    return chat_reply("re: " + last_message(request))


class Script:
    """An ``httpx.MockTransport`` handler that plays a script of responses.

    Each request gets the next entry of ``steps``: a response, or a handler called with the
    request. When the script is used up, ``then`` answers (:func:`echo` by default; None makes
    further requests an error). Every request is kept in :attr:`requests`.
    """

    def __init__(self, *steps: httpx.Response | Handler, then: Handler | None = echo) -> None:
        self._steps = list(steps)
        self._then = then
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self._steps:
            step = self._steps.pop(0)
            return step if isinstance(step, httpx.Response) else step(request)
        if self._then is None:
            raise AssertionError(f"the script has no answer left for request {len(self.requests)}")
        return self._then(request)

    @property
    def left(self) -> int:
        """Scripted answers not used yet."""
        return len(self._steps)

    def transport(self) -> httpx.MockTransport:
        """A transport that answers with this script (give it to ``Runner(transport=...)``)."""
        return httpx.MockTransport(self)


@contextlib.contextmanager
def local_server(**options: Any) -> Iterator[str]:
    """Run the built-in server (options: the fields of
    :class:`~pipeline.server.options.ServerOptions`) and yield its base URL
    (``http://127.0.0.1:PORT/v1``); it is stopped when the block ends. Read its counters
    with :func:`pipeline.server.process.server_stats`."""
    with LocalServer(ServerOptions(**options)) as base_url:
        yield base_url
