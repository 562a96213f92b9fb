"""Shared fixtures: the built-in server in a child process."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    import pipeline  # noqa: F401  (only checks that the package is importable)
except ModuleNotFoundError:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.server.options import ServerOptions
from pipeline.server.process import LocalServer


@pytest.fixture
def local_server() -> Iterator[Callable[..., str]]:
    """A factory: ``local_server(**options) -> base_url``; every server stops at test end.

    The options are :class:`pipeline.server.options.ServerOptions` fields. Read the counters with
    :func:`pipeline.server.process.server_stats` on the base URL.
    """
    servers: list[LocalServer] = []

    def start(**options: Any) -> str:
        server = LocalServer(ServerOptions(**options))
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
