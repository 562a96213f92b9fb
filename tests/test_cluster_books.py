"""The cluster's pure parts (the coordinator's books, the shard plan) and what `--ray` says
without Ray installed; the runs on a Ray cluster are in tests/test_cluster.py."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.cluster import plan as cluster_plan
from pipeline.cluster.leases import LeaseBook, Report, SyncCall
from pipeline.cluster.plan import plan_shards
from pipeline.engine import shared
from pipeline.provider.limits import LimiterConfig
from pipeline.server.process import server_stats


def test_leases_never_put_more_permits_out_than_the_cap_and_calls_are_idempotent() -> None:
    book = LeaseBook(LimiterConfig(max_in_flight=10, initial_in_flight=10))
    first = book.sync(0.0, SyncCall(worker="a", call_id="a/1", want=10, in_use=0))
    again = book.sync(0.0, SyncCall(worker="a", call_id="a/1", want=10, in_use=0))
    assert again == first  # a retried call grants nothing twice
    second = book.sync(0.0, SyncCall(worker="b", call_id="b/1", want=10, in_use=0))
    assert first.permits + second.permits <= 10
    # A 429 cuts the cluster's cap; the permits out stay within the old one, and the share
    # of each worker falls, so they give permits back as their requests finish.
    rate_limited = Report(outcome="rate_limited", epoch=0, latency_s=0.1, tokens=0, kept=False)
    reply = book.sync(
        0.1,
        SyncCall(worker="a", call_id="a/2", want=10, in_use=first.permits, reports=(rate_limited,)),
    )
    assert reply.epoch == 1
    assert reply.snapshot.cap < 10
    assert sum(lease.permits for lease in book.leases.values()) <= 10
    # A worker that stops calling loses its lease; its permits come back.
    book.expire(100.0)
    assert book.leases == {}
    assert book.state.in_flight == 0


def test_shards_keep_the_global_row_numbers() -> None:
    plan = plan_shards(1001, 250, "f")
    assert [(s.start, s.rows) for s in plan.shards] == [
        (0, 250),
        (250, 250),
        (500, 250),
        (750, 250),
        (1000, 1),
    ]
    assert plan_shards(0, 10, "f").shards[0].rows == 0
    # The engine finds a cluster's plan where the cluster writes it.
    assert (cluster_plan.PLAN_FILE, cluster_plan.SHARDS) == (shared.PLAN_FILE, shared.SHARDS)


def test_ray_without_the_extra_says_which_extra_to_install(
    sample_jobs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    result = CliRunner().invoke(
        cli, ["run", str(sample_jobs / "label_reviews.toml"), "--local", "--ray"]
    )
    assert result.exit_code == 2, result.output
    assert "pip install 'pipeline[ray]'" in result.output


def test_the_cluster_starts_at_most_its_requests_and_tokens_per_minute() -> None:
    """Three workers ask for starts every 0.1 s for two minutes: in every 60 s window the
    starts lent (all used at once) stay within requests_per_minute and tokens_per_minute."""
    config = LimiterConfig(
        max_in_flight=64, initial_in_flight=64, requests_per_minute=600, tokens_per_minute=30_000
    )
    book = LeaseBook(config)
    lent: list[tuple[float, int]] = []
    calls = 0
    for tick in range(1200):
        now = tick * 0.1
        for worker in ("a", "b", "c"):
            calls += 1
            reply = book.sync(
                now,
                SyncCall(
                    worker=worker,
                    call_id=f"{worker}/{calls}",
                    want=64,
                    in_use=0,
                    starts_wanted=64,
                    start_tokens=40,
                ),
            )
            assert reply.starts is not None
            lent.extend((now, 40) for _ in reply.starts.ids)
    for start in range(0, 60):
        window = [tokens for at, tokens in lent if start <= at < start + 60]
        assert len(window) <= 600
        assert sum(window) <= 30_000
    # ... and the cluster does use the budget: 30000 tokens/min of 40 each is 750 requests,
    # so requests/min binds (less the margin for starts held up to a second before use).
    assert len([at for at, _ in lent if 60 <= at < 120]) >= 0.95 * 600


def test_unused_starts_come_back_to_the_window() -> None:
    config = LimiterConfig(max_in_flight=8, requests_per_minute=60)
    book = LeaseBook(config)
    first = book.sync(0.0, SyncCall(worker="a", call_id="a/1", want=8, in_use=0, starts_wanted=8))
    assert first.starts is not None
    assert first.starts.ids
    blocked = book.sync(0.1, SyncCall(worker="a", call_id="a/2", want=8, in_use=0, starts_wanted=8))
    assert blocked.starts is not None
    assert not blocked.starts.ids
    back = book.sync(
        0.2,
        SyncCall(
            worker="a",
            call_id="a/3",
            want=8,
            in_use=0,
            starts_wanted=8,
            starts_returned=first.starts.ids,
        ),
    )
    assert back.starts is not None
    assert back.starts.ids


def test_a_single_machine_run_after_a_cluster_run_is_refused(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    """It cannot see the shards' journals and would pay again for their rows."""
    base = local_server()
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "in.parquet")
    job = tmp_path / "job.toml"
    job.write_text(
        f'name = "j"\n[input]\npath = "{tmp_path / "in.parquet"}"\n[request]\n'
        f'base_url = "{base}"\nmodel = "deepseek/deepseek-v4-flash"\nprompt = "{{text}}"\n'
        'thinking = { type = "disabled" }\n'
        f'[output]\npath = "{tmp_path / "out.parquet"}"\n'
    )
    shards = tmp_path / "out.parquet.state" / "shards"
    shards.mkdir(parents=True)
    (shards / "plan.json").write_text("{}")
    result = CliRunner().invoke(cli, ["run", str(job), "-q"])
    assert result.exit_code == 2, result.output
    assert "--ray" in result.output
    assert "--fresh" in result.output
    assert server_stats(base)["requests_total"] == 0
    fresh = CliRunner().invoke(cli, ["run", str(job), "-q", "--fresh"])
    assert fresh.exit_code == 0, fresh.output
    assert not shards.exists()  # starting over forgets the cluster's shards too
    assert server_stats(base)["requests_total"] == 2


def test_the_live_display_shows_the_cluster_and_each_workers_health() -> None:
    import io

    from rich.console import Console

    from pipeline.cli.cluster_display import ClusterLive
    from pipeline.cluster.driver import ClusterReport
    from pipeline.cluster.leases import Progress

    book = LeaseBook(LimiterConfig(max_in_flight=32))
    progress = Progress(shard="00001", rows_done=5, rows_total=100, in_flight=3)
    book.sync(0.0, SyncCall(worker="w0:1", call_id="1", want=8, in_use=0, progress=progress))
    live = ClusterLive(io.StringIO())
    report = ClusterReport(job="j", output=Path("o"), rows=400, shards=4)
    console = Console(file=io.StringIO(), width=100)
    console.print(live.render(book.figures(20.0), report))
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "in flight 3/16" in shown
    assert "w0:1" in shown
    assert "00001" in shown
    assert "5/100" in shown
    assert "20.0 s ago" in shown  # the last call, 20 s ago (longer than a lease)
