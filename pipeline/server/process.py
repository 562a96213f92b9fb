"""Run the built-in server (:mod:`pipeline.server.app`) as a child process on a free loopback port.

::

    with LocalServer(ServerOptions(latency_ms=5, max_concurrency=8)) as base_url:
        ...  # base_url is "http://127.0.0.1:PORT/v1"

The child is ``python -m pipeline.server --port 0 <flags>``; its first line on stdout names the
port it bound (:func:`pipeline.server.command.ready_line`). :class:`LocalServer` waits until
``GET /v1/models`` answers, and on exit sends SIGTERM, then SIGKILL after five seconds. A
separate process keeps the server's CPU off the caller's event loop, as a real endpoint would.
The API key, if any, travels in the child's environment (``PIPELINE_SERVER_API_KEY``), never on
its command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, NoReturn

import httpx

from pipeline.errors import ProviderError
from pipeline.server.options import API_KEY_ENV, ServerOptions

READY_LINE: Final = re.compile(rb"^listening on (http://\S+):(\d+)/v1 \(profile [\w-]+\)\s*$")
"""The child's first line: :func:`pipeline.server.command.ready_line`."""
STOP_GRACE_S: Final = 5.0
_PACKAGE_ROOT: Final = str(Path(__file__).resolve().parent.parent)


def server_argv(options: ServerOptions) -> list[str]:
    """The ``--field-name=value`` flags for every option that differs from its default (a
    tuple as one comma-separated value).

    ``api_key`` is left out on purpose: pass it in ``PIPELINE_SERVER_API_KEY``.
    """
    argv: list[str] = []
    for option in dataclasses.fields(ServerOptions):
        value = getattr(options, option.name)
        if option.name == "api_key" or value == option.default:
            continue
        flag = "--" + option.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, tuple):
            argv.append(f"{flag}={','.join(value)}")  # names hold no comma (checked)
        else:
            argv.append(f"{flag}={value}")  # one word, so a value may start with "-"
    return argv


def _root_of(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1")


class StatsClient:
    """The built-in server's counters (``/_stats``) over one kept-alive connection.

    Poll with one of these: a new ``httpx.Client`` per call costs about 30 ms of CPU (most
    of it SSL set-up), which, polled every 20 ms, would take a whole core from the run being
    measured; a kept-alive one costs about 1 ms.
    """

    def __init__(self, base_url: str) -> None:
        self._url = f"{_root_of(base_url)}/_stats"
        self._client = httpx.Client(timeout=10)

    def __call__(self) -> dict[str, Any]:
        """The counters (``GET /_stats``)."""
        response = self._client.get(self._url)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def reset(self) -> None:
        """Zero the counters (``POST /_stats/reset``)."""
        self._client.post(f"{self._url}/reset").raise_for_status()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> StatsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def server_stats(base_url: str) -> dict[str, Any]:
    """The counters of the built-in server at ``base_url`` (``.../v1``), read once."""
    with StatsClient(base_url) as stats:
        return stats()


def reset_server_stats(base_url: str) -> None:
    """Zero the counters of the built-in server at ``base_url``."""
    with StatsClient(base_url) as stats:
        stats.reset()


class LocalServer:
    """The built-in server in a child process; a context manager yielding its base URL."""

    def __init__(
        self,
        options: ServerOptions | None = None,
        *,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 30.0,
    ) -> None:
        self.options = options or ServerOptions()
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._root = ""

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``; only while running."""
        if not self._root:
            raise RuntimeError("the local server is not running")
        return f"{self._root}/v1"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> str:
        """Start the child, wait until it answers, return the base URL."""
        if self._process is not None:
            raise RuntimeError("the local server is already running")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        env.pop(API_KEY_ENV, None)
        if self.options.api_key:
            env[API_KEY_ENV] = self.options.api_key
        argv = [sys.executable, "-m", "pipeline.server", "--host", self.host, "--port", "0"]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (closed in stop())
        self._process = subprocess.Popen(
            [*argv, *server_argv(self.options)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        try:
            deadline = time.monotonic() + self.startup_timeout_s
            self._root = self._read_ready_line(self._process, deadline)
            self._wait_until_answering(deadline)
        except BaseException:
            self.stop()
            raise
        return self.base_url

    def stop(self) -> None:
        """SIGTERM the child, SIGKILL it after five seconds; safe to call twice."""
        process, self._process = self._process, None
        self._root = ""
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def stats(self) -> dict[str, Any]:
        """The server's counters (``GET /_stats``)."""
        return server_stats(self.base_url)

    def reset_stats(self) -> None:
        """Zero the server's counters (``POST /_stats/reset``)."""
        reset_server_stats(self.base_url)

    def _read_ready_line(self, process: subprocess.Popen[bytes], deadline: float) -> str:
        """``http://HOST:PORT`` from the child's first stdout line."""
        if process.stdout is None:
            self._fail("has no stdout pipe")
        fd = process.stdout.fileno()
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail("did not print its port in time")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self._fail("exited before it was ready")
                line += chunk
        match = READY_LINE.match(line.splitlines()[0])
        if match is None:
            self._fail(f"printed an unexpected first line: {line[:200]!r}")
        return f"{match.group(1).decode()}:{int(match.group(2))}"

    def _wait_until_answering(self, deadline: float) -> None:
        headers = {}
        if self.options.api_key:
            headers["Authorization"] = f"Bearer {self.options.api_key}"
        with httpx.Client(timeout=2.0, headers=headers) as client:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self._root}/v1/models").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    self._fail("did not answer GET /v1/models in time")
                time.sleep(0.05)

    def _fail(self, problem: str) -> NoReturn:
        """Raise :class:`ProviderError` with the tail of the child's stderr."""
        tail = ""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(STOP_GRACE_S)
        if self._stderr is not None:
            self._stderr.seek(0)
            tail = self._stderr.read()[-2000:].decode(errors="replace").strip()
        detail = f"\n{tail}" if tail else ""
        raise ProviderError(f"the built-in server {problem}{detail}")
