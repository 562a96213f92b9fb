from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.provider.limiter import Limiter
from pipeline.provider.limits import (
    Grant,
    LimiterConfig,
    LimiterState,
    NeverFits,
    NeverFitsError,
    Wait,
    parse_duration,
    parse_rate_limit_headers,
)
from pipeline.provider.rate_window import WINDOW_S, RateLimitHeaders, RateWindow


def make(**config: object) -> LimiterState:
    return LimiterState(LimiterConfig(**config), rng=random.Random(0))  # type: ignore[arg-type]


def take(state: LimiterState, now: float, tokens: int = 0) -> Grant:
    result = state.try_acquire(now, tokens)
    assert isinstance(result, Grant), result
    return result


def fill(state: LimiterState, now: float, grants: list[Grant]) -> None:
    """Take grants until the cap (or anything else) says no, as a saturated job would."""
    while isinstance(result := state.try_acquire(now, 0), Grant):
        grants.append(result)


def succeed(state: LimiterState, now: float, grants: list[Grant], times: int) -> None:
    """``times`` successes of a saturated job: each release is followed by a refill."""
    fill(state, now, grants)
    for _ in range(times):
        state.release(now, grants.pop(0), outcome="ok")
        fill(state, now, grants)


# ---------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    "config",
    [
        {"max_in_flight": 0},
        {"max_in_flight": 4, "requests_per_minute": 0},
        {"max_in_flight": 4, "tokens_per_minute": -5},
        {"max_in_flight": 4, "initial_in_flight": 0},
        {"max_in_flight": 4, "decrease_factor": 1.0},
        {"max_in_flight": 4, "cooldown_s": -1.0},
    ],
)
def test_config_rejects_nonsense(config: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must"):
        LimiterConfig(**config)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("max_in_flight", "initial", "cap"),
    [(500, None, 16), (4, None, 4), (500, 100, 100), (8, 50, 8)],
)
def test_start_cap(max_in_flight: int, initial: int | None, cap: int) -> None:
    assert make(max_in_flight=max_in_flight, initial_in_flight=initial).cap == cap


# ---------------------------------------------------------------------------------------------
# The adaptive in-flight cap


def test_cap_bounds_in_flight_and_only_a_release_helps() -> None:
    state = make(max_in_flight=10, initial_in_flight=2)
    a, _ = take(state, 0.0), take(state, 0.0)
    blocked = state.try_acquire(0.0, 0)
    assert isinstance(blocked, Wait)
    assert blocked.until is None
    assert "cap is 2" in blocked.reason
    state.release(1.0, a, outcome="error")
    assert isinstance(state.try_acquire(1.0, 0), Grant)


def test_slow_start_doubles_per_round_trip_up_to_max() -> None:
    state = make(max_in_flight=20, initial_in_flight=4)
    grants: list[Grant] = []
    succeed(state, 0.0, grants, 4)
    assert state.cap == 8
    succeed(state, 0.0, grants, 8)
    assert state.cap == 16
    succeed(state, 0.0, grants, 100)
    assert state.cap == 20
    assert state.in_flight == 20


def test_no_growth_when_the_cap_is_not_what_holds_the_job_back() -> None:
    state = make(max_in_flight=100, initial_in_flight=16)
    for _ in range(50):
        state.release(0.0, take(state, 0.0), outcome="ok")
    assert state.cap == 16


def test_a_burst_of_429s_cuts_once_per_epoch() -> None:
    state = make(max_in_flight=100, initial_in_flight=16)
    grants: list[Grant] = []
    fill(state, 0.0, grants)
    for grant in grants:
        state.release(0.1, grant, outcome="rate_limited")
    snap = state.snapshot(0.1)
    assert (snap.cap, snap.cuts, snap.rate_limited) == (8, 1, 16)


def test_each_new_epoch_can_cut_again_down_to_one() -> None:
    state = make(max_in_flight=100, initial_in_flight=16, ramp_s=0.0, max_cooldown_s=1000.0)
    now, caps = 0.0, []
    for _ in range(6):
        cooling = state.next_change(now)
        now = cooling if cooling is not None else now
        state.release(now, take(state, now), outcome="rate_limited")
        caps.append(state.cap)
    assert caps == [8, 4, 2, 1, 1, 1]


def test_recovery_after_a_cut_returns_to_the_ceiling_and_then_probes_beyond() -> None:
    state = make(max_in_flight=1000, initial_in_flight=32, ramp_s=0.0)
    grants: list[Grant] = []
    fill(state, 0.0, grants)
    state.release(0.0, grants.pop(), outcome="rate_limited")
    assert state.cap == 16
    while len(grants) > 16:  # requests sent before the cut drain; they do not grow the cap
        state.release(0.5, grants.pop(), outcome="ok")
    assert state.cap == 16
    caps = []
    for _ in range(40):  # forty round trips at the current cap
        succeed(state, 2.0, grants, state.cap)
        caps.append(state.cap)
    assert caps == sorted(caps)
    assert caps[0] >= 24  # most of the way back in one round trip
    assert 30 <= caps[3] <= 31  # back to just under the old ceiling (32)
    assert caps[12] <= 33  # where the 429 came, it probes slowly (one per 8 round trips)
    assert caps[-1] >= 40  # and speeds up again once past it


def at_hidden_cap(
    state: LimiterState, grants: list[Grant], limit: int, round_trips: int, start: int = 0
) -> list[int]:
    """A saturated job against a hidden cap of ``limit`` at 0.2 s a round trip: a request
    sent while ``limit`` are in flight is answered 429 at once. The round trips of the 429s."""
    hits = []
    for trip in range(start, start + round_trips):
        for step in range(limit):
            now = (trip + step / limit) * 0.2
            fill(state, now, grants)
            while len(grants) > limit:
                state.release(now, grants.pop(), outcome="rate_limited")
                hits.append(trip)
            state.release(now, grants.pop(0), outcome="ok")
    return hits


def test_probes_that_meet_429s_at_a_steady_limit_back_off_and_a_raised_limit_is_found() -> None:
    """At the ceiling the cap probes one request higher after 8 round trips, then 16, 32 and
    at most 64 while each probe meets a 429 there (every 8 round trips: 37 429s in 300);
    a limit that rose is still found within that."""
    state = make(max_in_flight=256, initial_in_flight=40, known_ceiling=41, ramp_s=0.0)
    grants: list[Grant] = []
    hits = at_hidden_cap(state, grants, 40, 300)
    gaps = [b - a for a, b in zip([0, *hits], hits, strict=False)]
    assert [round(gap / 8) for gap in gaps] == [1, 2, 4, 8, 8, 8]
    assert (state.cap, state.ceiling) == (40, 41)
    raised = at_hidden_cap(state, grants, 60, 100, start=300)
    assert raised  # the next probe passes 41, the cap speeds up to the new limit
    assert raised[0] < 300 + 70
    assert state.cap >= 58


def test_after_slow_start_a_429_above_half_its_ceiling_cuts_gently() -> None:
    """Slow start overshoots the provider's limit (a cluster's workers report their 429s
    late): the first cut's ceiling is high, so a 429 on the way back, above half of it, cuts
    one request (the limit is there) instead of halving again; at half or below, it halves."""

    def caps_after(second: int) -> tuple[int, int | None]:
        state = make(max_in_flight=256, initial_in_flight=54, ramp_s=0.0)
        grants: list[Grant] = []
        fill(state, 0.0, grants)  # 54 in flight: slow start ends here
        state.release(0.0, grants.pop(), outcome="rate_limited", in_flight=54)
        assert (state.cap, state.ceiling) == (27, 54)
        for grant in grants:
            state.release(0.5, grant, outcome="ok")
        grants = []
        while state.cap < second:  # back up, as far as ``second``
            succeed(state, 2.0, grants, state.cap)
        fill(state, 2.0, grants)
        state.release(2.0, grants.pop(), outcome="rate_limited", in_flight=second)
        return state.cap, state.ceiling

    assert caps_after(45) == (44, 45)  # gentle: the limit is 45, not 54
    assert caps_after(28) == (27, 28)  # just above half: still gentle
    assert caps_after(27)[0] == 13  # half or below: the limit fell, halve


def test_ok_of_an_old_epoch_during_the_drain_does_not_grow_the_cap() -> None:
    state = make(max_in_flight=100, initial_in_flight=16)
    grants: list[Grant] = []
    fill(state, 0.0, grants)
    state.release(0.0, grants.pop(), outcome="rate_limited")
    for grant in grants[:7]:
        state.release(0.5, grant, outcome="ok")  # 15 -> 8 in flight, all above the cap
    assert state.cap == 8


# ---------------------------------------------------------------------------------------------
# Cool-down and ramp


def test_429_without_retry_after_cools_down_and_grows_until_a_success() -> None:
    state = make(max_in_flight=10, ramp_s=0.0, cooldown_s=1.0, max_cooldown_s=3.0)
    state.release(0.0, take(state, 0.0), outcome="rate_limited")
    wait = state.try_acquire(0.0, 0)
    assert wait == Wait(until=1.0, reason="cooling down after a 429")
    assert state.snapshot(0.5).cooling_until == 1.0
    state.release(1.0, take(state, 1.0), outcome="rate_limited")
    assert state.next_change(1.0) == 3.0  # doubled
    state.release(3.0, take(state, 3.0), outcome="rate_limited")
    assert state.next_change(3.0) == 6.0  # capped at 3 s
    state.release(9.0, take(state, 6.0), outcome="ok")  # a 3 s round trip
    state.release(9.5, take(state, 9.5), outcome="rate_limited")
    assert state.next_change(9.5) == 10.5  # a success reset the growth
    assert state.snapshot(11.0).cooling_until is None


def test_retry_after_is_honoured_even_for_a_429_that_does_not_cut() -> None:
    state = make(max_in_flight=10, ramp_s=0.0)
    a, b = take(state, 0.0), take(state, 0.0)
    state.release(1.0, a, outcome="rate_limited", retry_after_s=7.0)
    assert state.next_change(1.0) == 8.0
    state.release(2.0, b, outcome="rate_limited", headers=RateLimitHeaders(retry_after_s=20.0))
    assert state.next_change(2.0) == 22.0
    assert state.snapshot(2.0).cuts == 1


def test_cooldown_is_shortened_to_half_a_fast_round_trip() -> None:
    state = make(max_in_flight=10, ramp_s=0.0, cooldown_s=1.0)
    for start in range(5):
        state.release(start + 0.2, take(state, float(start)), outcome="ok")
    state.release(10.0, take(state, 10.0), outcome="rate_limited")
    assert state.next_change(10.0) == pytest.approx(10.1)


def test_after_a_cool_down_waiters_are_spread_not_released_at_once() -> None:
    state = make(max_in_flight=64, initial_in_flight=32, ramp_s=1.0, cooldown_s=2.0)
    grants: list[Grant] = []
    fill(state, 0.0, grants)
    state.release(0.0, grants.pop(), outcome="rate_limited")
    while grants:
        state.release(1.0, grants.pop(), outcome="error")
    times: list[float] = []
    now = 1.0
    while len(times) < 16:  # the new cap
        result = state.try_acquire(now, 0)
        if isinstance(result, Wait):
            assert result.until is not None
            now = result.until
        else:
            times.append(now)
    for k, t in enumerate(times):  # one grant in each sixteenth of the second after it
        assert 2.0 + k / 16 <= t < 2.0 + (k + 1) / 16
    assert isinstance(state.try_acquire(now, 0), Wait)  # the cap (16) meters the rest


# ---------------------------------------------------------------------------------------------
# Requests and tokens per minute


def test_requests_per_minute_window_is_exact() -> None:
    state = make(max_in_flight=10, requests_per_minute=3, burst_s=60.0)
    for t in (0.0, 10.0, 20.0):
        state.release(t, take(state, t), outcome="ok")
    assert state.try_acquire(30.0, 0) == Wait(until=60.0, reason="3 requests in the last minute")
    assert isinstance(state.try_acquire(59.999, 0), Wait)
    assert isinstance(state.try_acquire(60.0, 0), Grant)
    assert state.snapshot(60.0).requests_last_minute == 3


def test_a_cancelled_grant_frees_its_place_in_the_window() -> None:
    state = make(max_in_flight=10, requests_per_minute=2, burst_s=60.0)
    state.cancel(0.0, take(state, 0.0))
    take(state, 10.0)
    take(state, 20.0)
    assert state.try_acquire(30.0, 0) == Wait(until=70.0, reason="2 requests in the last minute")


def test_the_window_counts_stay_exact_over_minutes_of_grants() -> None:
    """The log is cut off at its front as grants leave it; settling, cancelling and skipped
    grant ids must keep the minute's counts equal to a plain count of the grants in it."""
    window = RateWindow(None, None, burst_s=0.5, default_hold_s=1.0)
    rng = random.Random(7)
    live: dict[int, tuple[float, int]] = {}
    grant_id = 0
    for step in range(40_000):
        now = step * 0.005  # 200 grants a second for 200 s
        window.advance(now)
        grant_id += 1 if rng.random() < 0.9 else 3  # ids only grow; some are skipped
        tokens = rng.randint(1, 50)
        window.record(now, grant_id, tokens)
        live[grant_id] = (now, tokens)
        older = grant_id - rng.randint(0, 400)
        if older in live and rng.random() < 0.3:
            settled = rng.randint(0, 80)
            window.settle(now, older, settled)
            if now < live[older][0] + WINDOW_S:
                live[older] = (live[older][0], settled)
        elif older in live and rng.random() < 0.05:
            window.cancel(now, older)
            del live[older]
        if step % 997 == 0:
            in_window = [t for at, t in live.values() if now < at + WINDOW_S]
            assert window.requests_in_window == len(in_window)
            assert window.tokens_in_window == sum(in_window)
    with pytest.raises(ValueError, match="not newer"):
        window.record(200.0, grant_id, 1)


def test_the_window_log_holds_at_most_a_third_more_than_the_window() -> None:
    """A steady stream of grants: the log's arrays never hold more than 4/3 of the minute's
    entries (they reached twice the window when cut at half: 13 MB at 6,300 grants a second)."""
    window = RateWindow(None, None, burst_s=0.5, default_hold_s=1.0)
    per_second = 1000
    in_window = int(WINDOW_S * per_second)
    longest = 0
    for grant_id in range(1, 300 * per_second):
        now = grant_id / per_second
        window.advance(now)
        window.record(now, grant_id, 10)
        longest = max(longest, len(window._log._expires))
    assert window.requests_in_window == in_window
    assert in_window < longest <= in_window * 4 // 3 + 1


def test_pacing_spreads_a_fresh_budget() -> None:
    state = make(max_in_flight=100, requests_per_minute=600, burst_s=1.0, pace_fraction=1.0)
    for _ in range(10):
        take(state, 0.0)
    wait = state.try_acquire(0.0, 0)
    assert isinstance(wait, Wait)
    assert wait.until == pytest.approx(0.1)
    assert wait.reason == "pacing requests per minute"


def test_a_request_larger_than_the_burst_goes_when_the_bucket_is_full() -> None:
    state = make(max_in_flight=100, tokens_per_minute=6000, burst_s=1.0, pace_fraction=1.0)
    take(state, 0.0, 5000)
    wait = state.try_acquire(0.0, 10)
    assert isinstance(wait, Wait)
    assert wait.until == pytest.approx(5000 / 100 - 1 + 10 / 100)


def saturate(state: LimiterState, start: float, end: float, step: float) -> list[float]:
    """Grant every request the state lets through between ``start`` and ``end`` (a job with
    endless input, answers at once); the grant times."""
    times: list[float] = []
    now = start
    while now < end:
        while isinstance(result := state.try_acquire(now, 0), Grant):
            state.release(now, result, outcome="ok")
            times.append(now)
        now += step
    return times


def refused_by_a_one_second_bucket(arrivals: list[float], rpm: int) -> int:
    """How many of ``arrivals`` a provider that enforces ``rpm`` per second (a bucket of
    ``rpm / 60`` refilled at ``rpm / 60`` per second, starting full) would answer 429."""
    capacity = rate = rpm / 60
    level, last, refused = capacity, 0.0, 0
    for t in sorted(arrivals):
        level = min(capacity, level + (t - last) * rate)
        last = t
        if level >= 1:
            level -= 1
        else:
            refused += 1
    return refused


def bunched(times: list[float], every: float) -> list[float]:
    """The grant times as they arrive when sending runs in turns: each waits for the end of
    its turn of ``every`` seconds (an event loop busy with other work, connections opened
    in groups)."""
    return [math.ceil(t / every) * every for t in times]


def test_pacing_keeps_a_margin_that_fits_a_limit_enforced_per_second() -> None:
    paced = saturate(make(max_in_flight=1000, requests_per_minute=6000), 0.0, 30.0, 0.001)
    assert len(paced) >= 0.98 * 100 * 30  # a hair under the limit
    assert len(paced) <= 0.99 * 100 * 30 + 50
    assert sum(1 for t in paced if t == 0.0) < 100 / 2 + 1  # under half a second at once
    assert refused_by_a_one_second_bucket(bunched(paced, 0.2), 6000) == 0
    # The old tuning (a full second of burst at exactly the rate) overflows that bucket.
    old = make(max_in_flight=1000, requests_per_minute=6000, burst_s=1.0, pace_fraction=1.0)
    old_paced = saturate(old, 0.0, 30.0, 0.001)
    assert refused_by_a_one_second_bucket(bunched(old_paced, 0.2), 6000) > 0


def test_a_429_with_room_in_the_minute_tightens_the_pacing() -> None:
    state = make(max_in_flight=1000, requests_per_minute=6000)
    first = take(state, 0.0)
    second = take(state, 0.0)
    state.release(0.0, first, outcome="rate_limited")  # 2 of 6,000 in the minute: room
    assert state.snapshot(0.0).tightenings == 1
    state.release(0.0, second, outcome="rate_limited")  # granted before: nothing new
    assert state.snapshot(0.0).tightenings == 1
    # The burst is halved: a quarter of a second's worth goes at once after an idle spell.
    assert 20 <= len(saturate(state, 100.0, 100.0005, 0.001)) <= 25
    later = take(state, 200.0)
    state.release(200.0, later, outcome="rate_limited")
    assert state.snapshot(200.0).tightenings == 2
    assert 10 <= len(saturate(state, 300.0, 300.0005, 0.001)) <= 13


def test_tightening_ends_at_one_request_of_burst_then_slows_the_pace_to_a_floor() -> None:
    state = make(max_in_flight=1000, requests_per_minute=6000)
    for k in range(40):
        now = 100.0 * k
        state.release(now, take(state, now), outcome="rate_limited")
    assert state.snapshot(4000.0).tightenings == 40
    assert len(saturate(state, 5000.0, 5000.0005, 0.001)) == 1  # one request of burst
    paced = saturate(state, 6000.0, 6010.0, 0.0001)
    assert 0.8 * 100 * 10 - 2 <= len(paced) <= 0.8 * 100 * 10 + 2  # never below 80%


def test_a_429_when_the_minute_is_used_up_does_not_tighten() -> None:
    state = make(max_in_flight=10, requests_per_minute=2, burst_s=60.0, pace_fraction=1.0)
    take(state, 0.0)
    last = take(state, 0.0)
    state.release(0.0, last, outcome="rate_limited")
    assert state.snapshot(0.0).tightenings == 0
    plain = make(max_in_flight=10)  # no budget set: a 429 says nothing about windows
    plain.release(0.0, take(plain, 0.0), outcome="rate_limited")
    assert plain.snapshot(0.0).tightenings == 0


def test_never_fits() -> None:
    state = make(max_in_flight=10, tokens_per_minute=1000)
    result = state.try_acquire(0.0, 1001)
    assert isinstance(result, NeverFits)
    assert "1001" in result.reason
    assert "1000 tokens per minute" in result.reason
    assert isinstance(state.try_acquire(0.0, 1000), Grant)
    assert state.in_flight == 1


def test_settle_lowers_and_raises_the_charge() -> None:
    state = make(max_in_flight=10, tokens_per_minute=1000, burst_s=60.0)
    first = take(state, 0.0, 600)
    take(state, 1.0, 400)
    assert state.try_acquire(2.0, 100) == Wait(until=60.0, reason="1000 tokens in the last minute")
    state.release(3.0, first, outcome="ok", actual_tokens=100)
    assert state.snapshot(3.0).tokens_last_minute == 500
    second = take(state, 3.0, 500)
    state.settle(4.0, second, 900)  # used more than reserved: 1400 in the window now
    assert state.snapshot(4.0).tokens_last_minute == 1400
    assert state.try_acquire(4.0, 0) == Wait(until=61.0, reason="1000 tokens in the last minute")
    assert isinstance(state.try_acquire(61.0, 0), Grant)


def test_cancel_gives_back_everything() -> None:
    state = make(max_in_flight=1, requests_per_minute=1, tokens_per_minute=100)
    state.cancel(0.0, take(state, 0.0, 100))
    snap = state.snapshot(0.0)
    assert (snap.in_flight, snap.requests_last_minute, snap.tokens_last_minute) == (0, 0, 0)
    assert isinstance(state.try_acquire(0.0, 100), Grant)


def test_a_grant_is_given_back_once() -> None:
    state = make(max_in_flight=2)
    grant = take(state, 0.0)
    state.release(1.0, grant, outcome="ok")
    with pytest.raises(ValueError, match="already given back"):
        state.release(1.0, grant, outcome="ok")
    with pytest.raises(ValueError, match="already given back"):
        state.cancel(1.0, grant)
    assert state.in_flight == 0


def test_time_running_backwards_is_treated_as_standing_still() -> None:
    state = make(max_in_flight=10, requests_per_minute=1, burst_s=60.0, pace_fraction=1.0)
    take(state, 100.0)
    assert state.try_acquire(5.0, 0) == Wait(until=160.0, reason="1 requests in the last minute")


def test_next_change_is_none_when_only_a_release_can_help() -> None:
    state = make(max_in_flight=1)
    take(state, 0.0)
    assert state.next_change(0.0) is None


# ---------------------------------------------------------------------------------------------
# Headers


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("120ms", 0.12),
        ("1h2m3.5s", 3723.5),
        ("2m", 120.0),
        ("1.5s", 1.5),
        ("250us", 0.00025),
        ("17", 17.0),
        ("0.5", 0.5),
        (" 20s ", 20.0),
        ("0s", 0.0),
        ("", None),
        ("soon", None),
        ("1x", None),
        ("-1", None),
        ("s", None),
        ("nan", None),
        (None, None),
    ],
)
def test_parse_duration(text: str | None, seconds: float | None) -> None:
    result = parse_duration(text)
    if seconds is None:
        assert result is None
    else:
        assert result == pytest.approx(seconds)


def test_parse_rate_limit_headers() -> None:
    headers = {
        "X-RateLimit-Limit-Requests": "500",
        "x-ratelimit-remaining-requests": "499",
        "x-ratelimit-reset-requests": "120ms",
        "x-ratelimit-limit-tokens": "30000",
        "x-ratelimit-remaining-tokens": "29,000",
        "x-ratelimit-reset-tokens": "6m0s",
        "Retry-After": "3",
    }
    assert parse_rate_limit_headers(headers) == RateLimitHeaders(
        limit_requests=500,
        remaining_requests=499,
        reset_requests_s=0.12,
        limit_tokens=30000,
        remaining_tokens=None,
        reset_tokens_s=360.0,
        retry_after_s=3.0,
    )


def test_parse_rate_limit_headers_retry_after_forms() -> None:
    assert parse_rate_limit_headers({}) == RateLimitHeaders()
    assert (
        parse_rate_limit_headers({"retry-after-ms": "1500", "retry-after": "9"}).retry_after_s
        == 1.5
    )
    date = parse_rate_limit_headers(
        {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, wall_now=1445412470.0
    )
    assert date.retry_after_s == 10.0


def test_remaining_requests_zero_holds_until_reset() -> None:
    state = make(max_in_flight=10)
    headers = RateLimitHeaders(remaining_requests=0, reset_requests_s=2.5)
    state.release(1.0, take(state, 0.0), outcome="ok", headers=headers)
    wait = state.try_acquire(1.0, 0)
    assert wait == Wait(until=3.5, reason="the server's request budget is used up until reset")
    assert isinstance(state.try_acquire(3.5, 0), Grant)


def test_too_few_remaining_tokens_hold_until_reset() -> None:
    state = make(max_in_flight=10)
    headers = RateLimitHeaders(remaining_tokens=300, reset_tokens_s=4.0)
    state.release(1.0, take(state, 0.0, 500), outcome="ok", headers=headers)
    assert state.next_change(1.0) == 5.0
    headers = RateLimitHeaders(remaining_tokens=300, reset_tokens_s=40.0)
    state.release(6.0, take(state, 5.0, 200), outcome="ok", headers=headers)
    assert state.next_change(6.0) is None  # another like it still fits


def test_lower_server_limits_are_adopted() -> None:
    state = make(max_in_flight=10, requests_per_minute=100, tokens_per_minute=10_000)
    headers = RateLimitHeaders(limit_requests=20, limit_tokens=1000)
    state.release(1.0, take(state, 0.0), outcome="ok", headers=headers)
    snap = state.snapshot(1.0)
    assert (snap.requests_per_minute, snap.tokens_per_minute) == (20, 1000)
    assert isinstance(state.try_acquire(1.0, 1001), NeverFits)
    headers = RateLimitHeaders(limit_requests=5000, limit_tokens=10**6)
    state.release(2.0, take(state, 1.0), outcome="ok", headers=headers)
    snap = state.snapshot(2.0)
    assert (snap.requests_per_minute, snap.tokens_per_minute) == (100, 10_000)


def test_server_limits_are_learned_when_none_was_set() -> None:
    state = make(max_in_flight=10, burst_s=60.0)
    headers = RateLimitHeaders(limit_requests=2)
    state.release(0.0, take(state, 0.0), outcome="ok", headers=headers)
    take(state, 1.0)
    assert state.try_acquire(2.0, 0) == Wait(until=60.0, reason="2 requests in the last minute")


def test_a_429_explained_by_empty_budget_headers_does_not_cut() -> None:
    state = make(max_in_flight=100, initial_in_flight=16)
    headers = RateLimitHeaders(remaining_requests=0, reset_requests_s=5.0)
    state.release(1.0, take(state, 0.0), outcome="rate_limited", headers=headers)
    snap = state.snapshot(1.0)
    assert (snap.cap, snap.cuts, snap.rate_limited) == (16, 0, 1)
    assert state.next_change(1.0) == 6.0


# ---------------------------------------------------------------------------------------------
# Property: the budgets hold in every sliding minute, whatever the arrivals


@dataclass
class Record:
    grant: Grant
    charge: int  # what the limiter counts now: the reservation, or the last settle
    final: int
    cancelled: bool = False


@dataclass
class Driver:
    state: LimiterState
    config: LimiterConfig
    now: float = 0.0
    records: list[Record] = field(default_factory=list)
    open: list[Record] = field(default_factory=list)

    def acquire(self, tokens: int, patient: bool) -> None:
        promised = False
        for _ in range(4):
            cap = self.state.cap
            result = self.state.try_acquire(self.now, tokens)
            # A Wait's time is exact: when nothing else happened, time alone lets it through.
            assert not promised or isinstance(result, Grant), result
            tpm = self.state.tokens_per_minute
            if isinstance(result, NeverFits):
                assert tpm is not None
                assert tokens > tpm
                return
            if isinstance(result, Grant):
                self.check_grant(result, cap)
                record = Record(grant=result, charge=tokens, final=tokens)
                self.records.append(record)
                self.open.append(record)
                return
            if result.until is None or not patient:
                return
            assert result.until > self.now
            assert self.state.next_change(self.now, tokens) == result.until
            # ... and it is the earliest such time: just before it, still no.
            just_before = math.nextafter(result.until, -math.inf)
            assert isinstance(self.state.try_acquire(just_before, tokens), Wait)
            self.now = result.until  # arrive exactly when the limiter said: the edge case
            promised = True

    def check_grant(self, grant: Grant, cap: int) -> None:
        assert grant.granted_at == self.now
        assert self.state.in_flight <= cap <= self.config.max_in_flight
        # What the limiter had been told about the last minute, computed independently.
        live = [r for r in self.records if not r.cancelled and self.now < r.grant.granted_at + 60.0]
        if self.config.requests_per_minute is not None:
            assert len(live) + 1 <= self.config.requests_per_minute
        if self.config.tokens_per_minute is not None:
            assert sum(r.charge for r in live) + grant.tokens <= self.config.tokens_per_minute

    def release(self, pick: int, outcome: str, ratio: float, settle: bool) -> None:
        if not self.open:
            return
        record = self.open.pop(pick % len(self.open))
        if outcome == "cancel":
            self.state.cancel(self.now, record.grant)
            record.cancelled = True
            return
        actual = round(record.grant.tokens * ratio) if settle else None
        self.state.release(self.now, record.grant, outcome=outcome, actual_tokens=actual)  # type: ignore[arg-type]
        if actual is not None:
            record.charge = record.final = actual


def check_every_window(driver: Driver, *, exact_tokens: bool) -> None:
    grants = sorted(
        (r for r in driver.records if not r.cancelled), key=lambda r: r.grant.granted_at
    )
    rpm, tpm = driver.config.requests_per_minute, driver.config.tokens_per_minute
    for i, first in enumerate(grants):
        # Every window [s, s + 60) is covered by one that starts at a grant.
        window = [r for r in grants[i:] if r.grant.granted_at < first.grant.granted_at + 60.0]
        if rpm is not None:
            assert len(window) <= rpm
        if tpm is not None:
            assert sum(min(r.grant.tokens, r.final) for r in window) <= tpm
            if exact_tokens:
                assert sum(r.final for r in window) <= tpm


configs = st.builds(
    LimiterConfig,
    max_in_flight=st.integers(1, 12),
    requests_per_minute=st.none() | st.integers(1, 8),
    tokens_per_minute=st.none() | st.integers(50, 2000),
    initial_in_flight=st.none() | st.integers(1, 12),
    burst_s=st.sampled_from([0.0, 0.5, 1.0, 10.0, 60.0]),
    ramp_s=st.sampled_from([0.0, 1.0]),
)
gaps = st.just(0.0) | st.floats(0.0, 3.0) | st.floats(55.0, 65.0)
acquire_steps = st.tuples(st.just("acquire"), gaps, st.integers(0, 2500), st.booleans())
release_steps = st.tuples(
    st.just("release"),
    gaps,
    st.integers(0, 100),
    st.sampled_from(["ok", "ok", "error", "rate_limited", "cancel"]),
    st.booleans(),
)


def run_steps(
    config: LimiterConfig, seed: int, steps: list[tuple[object, ...]], max_ratio: float
) -> Driver:
    driver = Driver(state=LimiterState(config, rng=random.Random(seed)), config=config)
    ratios = random.Random(seed)
    for step in steps:
        dt = step[1]
        assert isinstance(dt, float)
        driver.now += dt
        if step[0] == "acquire":
            tokens, patient = step[2], step[3]
            assert isinstance(tokens, int)
            assert isinstance(patient, bool)
            driver.acquire(tokens, patient)
        else:
            pick, outcome, settle = step[2], step[3], step[4]
            assert isinstance(pick, int)
            assert isinstance(outcome, str)
            assert isinstance(settle, bool)
            driver.release(pick, outcome, ratios.uniform(0.0, max_ratio), settle)
        assert driver.state.in_flight == len(driver.open) <= config.max_in_flight
    return driver


@settings(max_examples=400, deadline=None)
@given(
    config=configs,
    seed=st.integers(0, 2**16),
    steps=st.lists(acquire_steps | release_steps, max_size=120),
)
def test_budgets_hold_in_every_window_when_usage_is_at_most_the_estimate(
    config: LimiterConfig, seed: int, steps: list[tuple[object, ...]]
) -> None:
    driver = run_steps(config, seed, steps, max_ratio=1.0)
    check_every_window(driver, exact_tokens=True)


@settings(max_examples=400, deadline=None)
@given(
    config=configs,
    seed=st.integers(0, 2**16),
    steps=st.lists(acquire_steps | release_steps, max_size=120),
)
def test_budgets_hold_in_every_window_when_usage_exceeds_the_estimate(
    config: LimiterConfig, seed: int, steps: list[tuple[object, ...]]
) -> None:
    driver = run_steps(config, seed, steps, max_ratio=3.0)
    check_every_window(driver, exact_tokens=False)


# ---------------------------------------------------------------------------------------------
# Simulation: find a provider's hidden concurrency limit


def simulate(seed: int, *, hidden: int = 40, requests: int = 20_000) -> tuple[float, float, int]:
    """A saturated job against a provider that answers 429 (at once, no headers) whenever
    ``hidden`` requests are already being served. Returns the mean in flight and the share
    of 429s after a 60 s warm-up, and the final cap."""
    rng = random.Random(seed)
    state = LimiterState(LimiterConfig(max_in_flight=500), rng=random.Random(seed))
    done: list[tuple[float, int, Grant, bool]] = []  # (when, tiebreak, grant, ok)
    now, pending, serving, order = 0.0, requests, 0, 0
    area = measured = 0.0
    answers = rate_limited = 0
    while pending:
        until = None
        while pending:
            result = state.try_acquire(now, 0)
            if isinstance(result, Wait):
                until = result.until
                break
            assert isinstance(result, Grant)
            pending -= 1
            ok = serving < hidden
            serving += ok
            latency = rng.uniform(1.0, 5.0) if ok else 0.05
            heapq.heappush(done, (now + latency, order, result, ok))
            order += 1
        if until is not None and (not done or until < done[0][0]):
            later, event = until, None
        else:
            later, _, grant, ok = heapq.heappop(done)
            event = (grant, ok)
        if now >= 60.0:
            area += state.in_flight * (later - now)
            measured += later - now
        now = later
        if event is not None:
            grant, ok = event
            serving -= ok
            pending += not ok  # retried
            if now >= 60.0:
                answers += 1
                rate_limited += not ok
            state.release(now, grant, outcome="ok" if ok else "rate_limited")
    return area / measured, rate_limited / answers, state.cap


@pytest.mark.parametrize("seed", [0, 1])
def test_the_cap_converges_on_a_hidden_concurrency_limit(seed: int) -> None:
    mean_in_flight, share_429, cap = simulate(seed)
    assert mean_in_flight >= 0.97 * 40
    assert share_429 < 0.01
    assert cap <= 45


# ---------------------------------------------------------------------------------------------
# The async wrapper


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` with real time, failing fast instead of hanging."""

    async def bounded() -> None:
        with anyio.fail_after(10):
            await main()

    anyio.run(bounded)


def test_waiters_wake_on_release_in_order_without_polling() -> None:
    async def main() -> None:
        limiter = Limiter(LimiterConfig(max_in_flight=2, initial_in_flight=2))
        held = [await limiter.acquire(0), await limiter.acquire(0)]
        order: list[int] = []

        async def wait(n: int) -> None:
            grant = await limiter.acquire(0)
            order.append(n)
            held.append(grant)

        async with anyio.create_task_group() as tg:
            for n in range(3):
                tg.start_soon(wait, n)
                await anyio.wait_all_tasks_blocked()
            await anyio.sleep(0.1)
            assert limiter.wakeups == 0  # blocked tasks sleep; nobody polls
            assert limiter.snapshot().waiting == 3
            for _ in range(3):
                limiter.release(held.pop(0), outcome="ok")
                await anyio.wait_all_tasks_blocked()
        assert order == [0, 1, 2]
        assert limiter.wakeups == 3
        assert limiter.snapshot().in_flight == 2

    run(main)


def test_a_time_limited_waiter_sleeps_exactly_until_it_may_go() -> None:
    async def main() -> None:
        config = LimiterConfig(max_in_flight=10, requests_per_minute=600, burst_s=0.0)
        limiter = Limiter(config)
        started = time.monotonic()
        for _ in range(5):  # one every 0.1 s
            limiter.release(await limiter.acquire(0), outcome="ok")
        elapsed = time.monotonic() - started
        assert 0.4 <= elapsed < 0.6
        assert 4 <= limiter.wakeups <= 6

    run(main)


def test_a_waiter_blocked_by_the_cap_then_by_time_sets_its_own_timer() -> None:
    async def main() -> None:
        config = LimiterConfig(max_in_flight=1, requests_per_minute=600, burst_s=0.0)
        limiter = Limiter(config)
        held = await limiter.acquire(0)
        granted = anyio.Event()

        async def wait() -> None:
            await limiter.acquire(0)
            granted.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()  # waiting for a slot, no timer
            limiter.release(held, outcome="ok")  # a slot is free, but pacing says 0.1 s
            with anyio.fail_after(2):
                await granted.wait()
        assert limiter.snapshot().in_flight == 1
        assert limiter.wakeups <= 3

    run(main)


def test_cancelling_a_waiter_frees_nothing_twice() -> None:
    async def main() -> None:
        config = LimiterConfig(max_in_flight=1, requests_per_minute=100, burst_s=60.0)
        limiter = Limiter(config)
        held = await limiter.acquire(0)
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(limiter.acquire, 0)
                await anyio.wait_all_tasks_blocked()
                scope.cancel()
        snap = limiter.snapshot()
        assert (snap.waiting, snap.in_flight, snap.requests_last_minute) == (0, 1, 1)
        limiter.release(held, outcome="ok")
        assert limiter.snapshot().in_flight == 0
        with anyio.fail_after(1):
            grant = await limiter.acquire(0)
        assert limiter.snapshot().in_flight == 1
        limiter.release(grant, outcome="ok")

    run(main)


def test_a_waiter_cancelled_after_being_handed_a_grant_gives_it_back() -> None:
    async def main() -> None:
        config = LimiterConfig(max_in_flight=1, requests_per_minute=100, burst_s=60.0)
        limiter = Limiter(config)
        held = await limiter.acquire(0)
        got: list[Grant] = []

        async def wait() -> None:
            got.append(await limiter.acquire(0))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()  # the waiter is cancelled, but before it runs again ...
            limiter.release(held, outcome="ok")  # ... the release hands it the slot
        assert not got
        snap = limiter.snapshot()
        assert (snap.waiting, snap.in_flight, snap.requests_last_minute) == (0, 0, 1)

    run(main)


def test_slot_releases_on_error_and_not_twice() -> None:
    async def main() -> None:
        limiter = Limiter(LimiterConfig(max_in_flight=1))
        with pytest.raises(RuntimeError, match="boom"):
            async with limiter.slot(10):
                raise RuntimeError("boom")
        assert limiter.snapshot().in_flight == 0
        async with limiter.slot(10) as grant:
            limiter.release(grant, outcome="ok", actual_tokens=3)
        snap = limiter.snapshot()
        assert (snap.in_flight, snap.tokens_last_minute) == (0, 13)

    run(main)


def test_acquire_raises_never_fits() -> None:
    async def main() -> None:
        limiter = Limiter(LimiterConfig(max_in_flight=1, tokens_per_minute=100))
        with pytest.raises(NeverFitsError, match="101 tokens"):
            await limiter.acquire(101)
        assert limiter.snapshot().waiting == 0

    run(main)


# -- memory across runs ------------------------------------------------------------------------


def test_a_run_that_hit_a_ceiling_makes_the_next_start_just_under_it() -> None:
    from pipeline.provider.limits import LearnedLimit, start_from

    config = start_from(LimiterConfig(max_in_flight=500), LearnedLimit(cap=36, ceiling=40))
    state = LimiterState(config, rng=random.Random(0))
    assert state.cap == 36  # 90% of the ceiling
    assert state.snapshot(0.0).ceiling == 40
    grants: list[Grant] = []
    fill(state, 0.0, grants)
    assert len(grants) == 36
    state.release(0.1, grants[0], outcome="rate_limited")
    assert state.cap == 35  # the ceiling is known: a gentle cut (one less), not a halving


def test_a_run_without_429s_makes_the_next_start_at_the_cap_it_reached() -> None:
    from pipeline.provider.limits import LearnedLimit, start_from

    base = LimiterConfig(max_in_flight=256)
    assert start_from(base, LearnedLimit(cap=256, ceiling=None)).start_cap == 256
    assert start_from(base, LearnedLimit(cap=3, ceiling=None)).start_cap == 16  # not below
    lowered = LimiterConfig(max_in_flight=100)
    assert start_from(lowered, LearnedLimit(cap=256, ceiling=None)).start_cap == 100


@pytest.mark.parametrize(
    "data",
    [None, [], {}, {"cap": 0}, {"cap": "8"}, {"cap": 8, "ceiling": -1}, {"cap": True}],
)
def test_a_damaged_learned_record_is_ignored(data: object) -> None:
    from pipeline.provider.limits import LearnedLimit

    assert LearnedLimit.from_dict(data) is None
    assert LearnedLimit.from_dict({"cap": 8, "ceiling": None}) == LearnedLimit(cap=8, ceiling=None)
