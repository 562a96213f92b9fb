"""Running the built-in server: a listening socket and uvicorn serving :func:`create_app` on it
until SIGINT or SIGTERM (one process, so ``/_stats``, the limits and the prompt cache stay
exact). :mod:`pipeline.server.command` is its command line."""

from __future__ import annotations

import contextlib
import functools
import signal
import socket
import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from pipeline.server.app import create_app
from pipeline.server.options import ServerOptions

if TYPE_CHECKING:
    from starlette.applications import Starlette


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
