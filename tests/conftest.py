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


@pytest.fixture
def sample_jobs(tmp_path: Path) -> Path:
    """A copy of the project's ``jobs/`` folder in ``tmp_path``, beside a link to its
    ``data/``: the sample jobs' paths (relative to their folder) then read the sample data
    and write under ``tmp_path/out``, never into the checkout. Returns the jobs folder."""
    root = Path(__file__).resolve().parent.parent
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    for job in (root / "jobs").glob("*.toml"):
        (jobs / job.name).write_text(job.read_text())
    (tmp_path / "data").symlink_to(root / "data", target_is_directory=True)
    return jobs


@pytest.fixture(autouse=True)
def _peak_hours(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs in this process price their requests at noon UTC: the built-in DeepSeek price has
    an off-peak window (16:30-00:30 UTC, half price), and a test's expected cost must not
    depend on the hour it runs at. Tests of the window pass their own instants."""
    import datetime as dt

    from pipeline.money import pricing

    noon = dt.datetime.now(dt.UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    monkeypatch.setattr(pricing, "_now", lambda: noon)
