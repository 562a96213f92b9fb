"""The cluster's pure parts (the coordinator's books, the shard plan) and what `--ray` says
without Ray installed; the runs on a Ray cluster are in tests/test_cluster.py."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.cluster import plan as cluster_plan
from pipeline.cluster.leases import LeaseBook, Progress, Report, SyncCall, SyncReply
from pipeline.cluster.link import ShardLink, _Waiter
from pipeline.cluster.plan import plan_shards
from pipeline.cluster.rates import SharePacer
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


class _PacedCluster:
    """Workers that pace greedily at the rate shares their calls to ``book`` bring, calling
    every 5 s (every second while their share is short)."""

    def __init__(self, book: LeaseBook, config: LimiterConfig) -> None:
        self.book, self.config = book, config
        self.pacers: dict[str, SharePacer] = {}
        self.next_call: dict[str, float] = {}
        self.calls = 0

    def call(self, worker: str, now: float, *, leaving: bool = False) -> None:
        self.calls += 1
        call = SyncCall(
            worker=worker,
            call_id=str(self.calls),
            want=64,
            in_use=0,
            waiting=1,
            leaving=leaving,
            slot=worker[0],
        )
        reply = self.book.sync(now, call)
        assert self.book.rates is not None
        assert sum(self.book.rates.held.values()) <= 1 + 1e-9  # never more than the budgets
        if leaving:
            self.stop(worker)
        else:
            assert reply.rates is not None
            self.pacers[worker].apply(now, reply.rates)
            self.next_call[worker] = now + (5.0 if reply.rates.full else 1.0)

    def join(self, worker: str, now: float) -> None:
        self.pacers[worker] = SharePacer()
        self.pacers[worker].configure(self.config)
        self.call(worker, now)

    def stop(self, worker: str) -> None:
        del self.pacers[worker], self.next_call[worker]

    def send(self, now: float, tokens: int) -> int:
        """Every request the workers may send now; how many."""
        sent = 0
        for worker, pacer in list(self.pacers.items()):
            if self.next_call[worker] <= now:
                self.call(worker, now)
            while pacer.ready_at(tokens) <= now:
                pacer.take(now, tokens)
                sent += 1
        return sent


def test_workers_pacing_at_their_rate_shares_keep_the_cluster_within_its_budgets() -> None:
    """Three workers pace at their shares; one leaves for good at 40 s (the driver expects two
    from then on), one dies at 90 s: its lease expires, and its restart at 100 s takes its
    slot. In every 60 s window the cluster's requests and tokens stay within the budgets, in
    every stretch of seconds within the rate plus a second; the budget is used."""
    rpm, tpm, tokens, step = 600, 30_000, 40, 0.01
    config = LimiterConfig(
        max_in_flight=64, initial_in_flight=64, requests_per_minute=rpm, tokens_per_minute=tpm
    )
    book = LeaseBook(config, workers=3, ttl_s=6.0)
    cluster = _PacedCluster(book, config)

    def leave(now: float) -> None:
        cluster.call("a", now, leaving=True)
        book.expect(2)

    def expired(now: float) -> None:
        book.expire(now)
        assert list(book.leases) == ["c"]  # the dead worker's lease expired: its share is free
        assert book.rates is not None
        assert list(book.rates.held) == ["c"]

    events: dict[int, Callable[[float], None]] = {
        0: lambda now: cluster.join("a", now),
        30: lambda now: cluster.join("b", now),
        90: lambda now: cluster.join("c", now),
        4000: leave,
        9000: lambda now: cluster.stop("b"),  # dies: stops calling
        9900: expired,
        10000: lambda now: cluster.join("b2", now),
    }
    per_second = [0] * 150
    for tick in range(int(150 / step)):
        now = tick * step
        if tick in events:
            events[tick](now)
        per_second[int(now)] += cluster.send(now, tokens)
    assert sorted(book.leases) == ["b2", "c"]
    assert book.expired == 1
    for first in range(0, 91):
        assert sum(per_second[first : first + 60]) <= rpm  # tokens: 40 each, 24,000 <= tpm
    rate = rpm / 60
    for width in range(1, 30):
        for first in range(0, 150 - width):
            assert sum(per_second[first : first + width]) <= rate * (width + 1)
    # ... and the cluster does use its budget (after the start and around the changes).
    assert sum(per_second[10:40]) >= 0.95 * rate * 30
    assert sum(per_second[102:150]) >= 0.95 * rate * 48
    assert cluster.calls < 0.05 * sum(per_second)  # calls follow the shares, not the rate


def test_a_restarted_worker_ends_its_predecessors_lease_at_once() -> None:
    book = LeaseBook(LimiterConfig(max_in_flight=8, initial_in_flight=8, requests_per_minute=60))
    first = book.sync(0.0, SyncCall(worker="w0:1", call_id="1", want=8, in_use=0, slot="w0"))
    assert first.permits == 8  # a new lease takes its share of the cap at once
    assert first.rates is not None
    assert first.rates.fraction == 1.0
    again = book.sync(1.0, SyncCall(worker="w0:2", call_id="1", want=8, in_use=0, slot="w0"))
    assert list(book.leases) == ["w0:2"]
    assert book.expired == 1
    assert again.rates is not None
    assert again.rates.fraction == 1.0
    assert book.state.in_flight == again.permits


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
    assert "20.0 s ago" in shown  # the last call, 20 s ago


def _lease_up(book: LeaseBook, worker: str, permits: int) -> None:
    """``worker`` calls, busy with every permit and more waiting, until it holds ``permits``."""
    for n in range(10):
        held = book.leases[worker].permits if worker in book.leases else 0
        if held >= permits:
            return
        call = SyncCall(worker=worker, call_id=f"up{n}", want=permits, in_use=held, waiting=1)
        book.sync(0.0, call)
        if book.leases[worker].permits >= permits:  # ... and it uses every one of them
            book.sync(0.0, replace(call, call_id=f"use{n}", in_use=permits))
            return
    raise AssertionError(f"{worker} never got {permits} permits")


def test_the_coordinator_learns_from_the_requests_really_in_flight() -> None:
    """Idle permits do not raise the cap, and a 429 cuts from what was in flight, not from
    the cap (which may stand above it while permits are not used)."""
    config = LimiterConfig(max_in_flight=256, initial_in_flight=16)
    ok = Report(outcome="ok", epoch=0, latency_s=0.1, tokens=0, in_flight=16)
    idle = SyncCall(worker="a", call_id="idle", want=16, in_use=8, reports=(ok,) * 16)
    book = LeaseBook(config)
    _lease_up(book, "a", 16)
    book.sync(0.1, idle)  # half its permits idle: the cap held nothing back
    assert book.state.cap == 16
    book = LeaseBook(config)
    _lease_up(book, "a", 16)
    busy = replace(ok, full=True)
    book.sync(0.1, replace(idle, want=256, waiting=240, reports=(busy,) * 16))
    # Slow start: every permit in use, the cap grows, but a call's outcomes take it no more
    # than the slack (a quarter of it, at least 4) above the 16 permits lent.
    assert 20 <= book.state.cap <= 16 + book.slack() < 32
    # The cap stands at 48 (known ceiling 44), but the workers had 41 in flight at the 429:
    # the ceiling is 41, and the cut (gentle: near the known ceiling) goes to 40.
    book = LeaseBook(replace(config, initial_in_flight=48, known_ceiling=44))
    _lease_up(book, "a", 24)
    _lease_up(book, "b", 24)
    limited = Report(outcome="rate_limited", epoch=0, latency_s=0, tokens=0, in_flight=17)
    book.sync(0.2, SyncCall(worker="a", call_id="429", want=24, in_use=16, reports=(limited,)))
    assert book.state.snapshot(0.2).ceiling == 41
    assert book.state.cap == 40


def test_the_cap_grows_back_while_the_cluster_uses_what_it_has() -> None:
    """Below the ceiling of the last cut the cap climbs back while the workers want more than
    it, not only once every permit is lent (the rest reaches them at their next calls); it
    does not grow while they want less. At the ceiling it grows only while nearly all of it is
    lent (a call's outcomes must not take it far past the provider's limit untested)."""

    def cap_after(start: int, want: int, held: int) -> int:
        config = LimiterConfig(max_in_flight=256, initial_in_flight=start, known_ceiling=41)
        full = Report(outcome="ok", epoch=0, latency_s=0.25, tokens=0, in_flight=held, full=True)
        book = LeaseBook(config)
        for worker in ("a", "b"):
            _lease_up(book, worker, held)
        call = SyncCall(
            worker="a", call_id="r", want=want, in_use=held, waiting=1, reports=(full,) * 400
        )
        book.sync(0.3, call)
        return book.state.cap

    assert cap_after(20, want=256, held=8) >= 30  # 16 of 20 lent, all in use: back up fast
    assert cap_after(20, want=8, held=8) == 20  # the workers want 16: the cap held nothing back
    assert cap_after(40, want=256, held=16) == 40  # at the ceiling, 32 of 40 lent: no probe
    assert cap_after(40, want=256, held=20) == 41  # all 40 lent and in use: it probes


def test_a_429_cuts_from_the_requests_in_flight_when_its_request_was_sent() -> None:
    """Permits lent with another worker's answer after a request went were not in use when
    the provider answered it 429: the ceiling is what the workers had in flight then. Those
    lent before it went were in use if their worker had requests waiting (its last call's
    count is stale), and a worker that left since still counts."""

    def ceiling_after(sent_at: float, *, b_leaves: bool = False) -> int | None:
        book = LeaseBook(LimiterConfig(max_in_flight=256, initial_in_flight=64))
        _lease_up(book, "a", 16)
        _lease_up(book, "b", 16)
        # At 1.0 b's call lends it 16 more (16 requests wait: it uses them at once).
        book.sync(1.0, SyncCall(worker="b", call_id="more", want=32, in_use=16, waiting=16))
        assert book.leases["b"].permits == 32
        if b_leaves:
            book.sync(1.5, SyncCall(worker="b", call_id="bye", want=0, in_use=0, leaving=True))
        # a's request went at ``sent_at`` on a's clock (a's clock reads 2.0 at its call), and
        # its 429 came at once.
        limited = Report(
            outcome="rate_limited",
            epoch=0,
            latency_s=0,
            tokens=0,
            in_flight=16,
            finished_at=sent_at,
        )
        call = SyncCall(
            worker="a", call_id="429", want=64, in_use=15, reports=(limited,), sent_at=2.0
        )
        book.sync(2.0, call)
        return book.state.snapshot(2.0).ceiling

    assert ceiling_after(0.5) == 32  # before b's permits were lent: 16 + 16, not 16 + 32 held
    assert ceiling_after(1.2) == 48  # after: b used all 32 (its requests waited)
    assert ceiling_after(1.2, b_leaves=True) == 48  # b left since: its 32 were in flight then
    assert ceiling_after(1.8, b_leaves=True) == 16  # it left before: a's 16 alone


def test_answers_say_when_the_first_other_worker_is_expected_to_leave() -> None:
    """Once every shard is handed out, each answer says when the first other worker's shard
    should end at its pace so far: permits come free then. A shard far behind its pace says
    nothing (it may be stuck on retries)."""
    book = LeaseBook(LimiterConfig(max_in_flight=64, initial_in_flight=32), workers=2)

    def call(worker: str, n: int, at: float, done: int) -> SyncReply:
        progress = Progress(shard=f"s-{worker}", rows_done=done, rows_total=1000)
        return book.sync(
            at, SyncCall(worker=worker, call_id=f"{n}", want=16, in_use=0, progress=progress)
        )

    call("a", 1, 0.0, 0)
    call("b", 1, 0.0, 0)
    call("b", 2, 10.0, 500)  # b does 50 rows/s: its 1,000 end at 20 s
    assert call("a", 2, 10.0, 100).free_in_s is None  # shards are still being handed out
    book.ending = True
    assert call("a", 3, 12.0, 120).free_in_s == pytest.approx(8.0)
    assert call("a", 4, 22.0, 220).free_in_s == 0.0  # due: it should be leaving now
    assert call("a", 5, 24.0, 240).free_in_s is None  # 4 s overdue: no hint


class _Coordinator:
    """A LeaseBook behind an async call, counting the calls (time from a fake clock)."""

    def __init__(self, book: LeaseBook, clock: Callable[[], float]) -> None:
        self.book, self.clock, self.calls = book, clock, 0

    async def __call__(self, call: SyncCall) -> SyncReply:
        self.calls += 1
        return self.book.sync(self.clock(), call)


def test_a_worker_keeps_its_lease_from_shard_to_shard_and_calls_per_requests() -> None:
    """One link for a worker's life: a shard's start and end cost no call, the permits carry
    over; a worker that could use more permits while the cap climbs calls only after a few
    round trips of its own requests; it gives its lease back when it leaves."""
    import anyio

    now = [0.0]
    coordinator = _Coordinator(
        LeaseBook(LimiterConfig(max_in_flight=256, initial_in_flight=8, known_ceiling=40)),
        lambda: now[0],
    )
    link = ShardLink(coordinator, worker="w0:1", slot="w0", clock=lambda: now[0])
    config = LimiterConfig(max_in_flight=256)

    async def shard(last: bool, requests: int) -> None:
        link.begin_shard(last=last)
        link.limiter(config)
        if link.stale:
            await link.sync()
        grants = [await link.acquire(0) for _ in range(min(requests, link.held))]
        for n in range(requests):
            now[0] += 0.01
            link.release(grants.pop(0), outcome="ok")
            if n + len(grants) + 1 < requests:
                grants.append(await link.acquire(0))

    anyio.run(shard, False, 100)
    assert coordinator.calls == 1  # the lease's first call only: no call at the shard's end
    held = link.held
    assert held == 8
    anyio.run(shard, False, 100)
    assert coordinator.calls == 1  # ... nor at the next shard's start: the permits carried over
    assert link.held == held
    assert link.demand() == 256  # a shard follows: it keeps its permits to its end

    # Hungry (it could use more permits, the cap climbs to the ceiling): no call before a few
    # round trips of its own requests finished, however long it waits.
    link._queue.append(_Waiter())
    link._reports = link._reports[:3]
    link.in_use = link.share = link.held  # every permit in use, its whole share held
    link.spare = False
    now[0] += 30.0
    link._last_call = now[0] - 5.0
    assert link._due_in() > 0
    link._reports = link._reports * 16  # 48 reports: a hungry call is due
    assert link._due_in() == 0
    link._queue.clear()
    link.in_use = 0
    anyio.run(functools.partial(link.sync, leaving=True))
    assert coordinator.book.leases == {}  # it left: its lease went back


def test_a_429_makes_a_call_due_give_back_s_after_the_last_one() -> None:
    """Each way a call may be due counts from the last call: a worker short of its share and
    hungry does not call earlier because 429s made a call due too."""
    import anyio

    from pipeline.cluster.link import GIVE_BACK_S

    now = [0.0]
    book = LeaseBook(LimiterConfig(max_in_flight=256, initial_in_flight=16, known_ceiling=16))
    link = ShardLink(_Coordinator(book, lambda: now[0]), worker="w0:1", clock=lambda: now[0])
    link.limiter(LimiterConfig(max_in_flight=256))
    anyio.run(link.sync)
    assert link.held == link.share == 16
    grants = [anyio.run(link.acquire, 0) for _ in range(16)]
    link._queue.append(_Waiter())  # more requests wait
    now[0] = 0.3
    for _ in range(3):  # three 429s: 13 permits left, short of its share of 16
        link.release(grants.pop(), outcome="rate_limited")
    link._reports = link._reports * 32  # a hungry call's worth of outcomes
    assert link.held == 13
    assert link._due_in() == pytest.approx(GIVE_BACK_S - 0.3)
