from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.provider.retry import (
    Failure,
    GiveUp,
    Retry,
    RetryPolicy,
    StopJob,
    backoff,
    decide,
    failure_of_status,
)


@pytest.mark.parametrize(
    ("status", "failure"),
    [
        (400, Failure.CLIENT),
        (401, Failure.AUTH),
        (403, Failure.AUTH),
        (404, Failure.CLIENT),
        (422, Failure.CLIENT),
        (408, Failure.SERVER),
        (429, Failure.RATE_LIMITED),
        (500, Failure.SERVER),
        (502, Failure.SERVER),
        (503, Failure.SERVER),
        (504, Failure.SERVER),
    ],
)
def test_status_classes(status: int, failure: Failure) -> None:
    assert failure_of_status(status) is failure


def _decide(failure: Failure, attempt: int = 1, **kwargs: object) -> object:
    policy = kwargs.pop("policy", RetryPolicy())
    return decide(
        failure,
        attempt=attempt,
        elapsed_s=kwargs.pop("elapsed_s", 0.0),  # type: ignore[arg-type]
        retry_after_s=kwargs.pop("retry_after_s", None),  # type: ignore[arg-type]
        policy=policy,  # type: ignore[arg-type]
        rng=random.Random(0),
        detail="d",
    )


def test_permanent_failures_are_not_retried() -> None:
    assert _decide(Failure.CLIENT) == GiveUp("d")


def test_auth_stops_the_job() -> None:
    assert _decide(Failure.AUTH) == StopJob("d")


@pytest.mark.parametrize(
    "failure",
    [Failure.RATE_LIMITED, Failure.SERVER, Failure.TIMEOUT, Failure.CONNECTION, Failure.MALFORMED],
)
def test_transient_failures_are_retried_until_the_cap(failure: Failure) -> None:
    assert isinstance(_decide(failure, attempt=1), Retry)
    last = _decide(failure, attempt=6, policy=RetryPolicy(max_attempts=6))
    assert isinstance(last, GiveUp)
    assert "6 attempts" in last.reason


def test_retry_after_overrides_the_computed_wait() -> None:
    assert _decide(Failure.RATE_LIMITED, retry_after_s=7.5) == Retry(7.5)


def test_deadline_gives_up_instead_of_waiting_past_it() -> None:
    decision = _decide(
        Failure.SERVER, elapsed_s=9.0, retry_after_s=2.0, policy=RetryPolicy(deadline_s=10)
    )
    assert isinstance(decision, GiveUp)
    assert "deadline" in decision.reason


@given(st.integers(min_value=1, max_value=60), st.integers(min_value=0, max_value=2**32))
def test_backoff_is_full_jitter_under_a_ceiling(attempt: int, seed: int) -> None:
    policy = RetryPolicy(base_s=0.5, max_wait_s=30.0)
    wait = backoff(attempt, policy, random.Random(seed))
    assert 0.0 <= wait <= min(30.0, 0.5 * 2 ** (attempt - 1))
