"""The cluster's pure parts (the coordinator's books, the shard plan) and what `--ray` says
without Ray installed; the runs on a Ray cluster are in tests/test_cluster.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.cluster.leases import LeaseBook, Report, SyncCall
from pipeline.cluster.plan import plan_shards
from pipeline.provider.limits import LimiterConfig


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


def test_ray_without_the_extra_says_which_extra_to_install(
    sample_jobs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    result = CliRunner().invoke(
        cli, ["run", str(sample_jobs / "label_reviews.toml"), "--local", "--ray"]
    )
    assert result.exit_code == 2, result.output
    assert "pip install 'pipeline[ray]'" in result.output
