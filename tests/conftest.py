"""Shared fixtures: the built-in server in a child process."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

try:
    import pipeline  # noqa: F401  (only checks that the package is importable)
except ModuleNotFoundError:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import testing


@pytest.fixture
def local_server() -> Iterator[Callable[..., str]]:
    """A factory: ``local_server(**options) -> base_url``; every server stops at test end.

    The options are :class:`pipeline.server.options.ServerOptions` fields. Read the counters with
    :func:`pipeline.server.process.server_stats` on the base URL.
    """
    with contextlib.ExitStack() as servers:
        yield lambda **options: servers.enter_context(testing.local_server(**options))
