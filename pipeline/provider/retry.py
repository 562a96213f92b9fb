"""Pure: what to do after an attempt: done, retry after N seconds, give up, or stop the job.

Transient failures (429, 408, 409, 425, 5xx, timeouts, connection errors, malformed or
truncated bodies, HTML error pages) are retried with exponential backoff and full jitter,
capped, within an attempt cap and an optional per-row deadline; a server's ``Retry-After``
replaces the computed wait. Permanent failures (400, 404, 422 and other 4xx) are not retried:
each retry would cost money and fail again. 401 and 403 stop the whole job.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

TRANSIENT_STATUS = frozenset({408, 409, 425, 429})


class Failure(Enum):
    """What went wrong with one attempt, as far as retrying is concerned."""

    RATE_LIMITED = "rate_limited"
    SERVER = "server_error"
    TIMEOUT = "timeout"
    CONNECTION = "connection_error"
    MALFORMED = "malformed_response"
    CLIENT = "client_error"
    AUTH = "auth_error"


TRANSIENT = frozenset(
    {Failure.RATE_LIMITED, Failure.SERVER, Failure.TIMEOUT, Failure.CONNECTION, Failure.MALFORMED}
)


def failure_of_status(status: int) -> Failure:
    """Classify a non-200 HTTP status."""
    if status in (401, 403):
        return Failure.AUTH
    if status == 429:
        return Failure.RATE_LIMITED
    if status in TRANSIENT_STATUS or status >= 500:
        return Failure.SERVER
    return Failure.CLIENT


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    max_attempts: int = 6
    base_s: float = 0.5
    max_wait_s: float = 60.0
    deadline_s: float | None = None
    """Total time a row may take across attempts, or None for no deadline."""


@dataclass(frozen=True, slots=True)
class Retry:
    after_s: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


@dataclass(frozen=True, slots=True)
class StopJob:
    reason: str


Decision = Retry | GiveUp | StopJob


def backoff(attempt: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Full-jitter exponential backoff before attempt ``attempt + 1`` (``attempt`` >= 1)."""
    ceiling = min(policy.max_wait_s, policy.base_s * 2 ** (attempt - 1))
    return rng.uniform(0.0, ceiling)


def decide(
    failure: Failure,
    *,
    attempt: int,
    elapsed_s: float,
    retry_after_s: float | None,
    policy: RetryPolicy,
    rng: random.Random,
    detail: str,
) -> Decision:
    """Decide after failed attempt number ``attempt`` (1-based) of a row."""
    if failure is Failure.AUTH:
        return StopJob(detail)
    if failure not in TRANSIENT:
        return GiveUp(detail)
    if attempt >= policy.max_attempts:
        return GiveUp(f"{detail} (gave up after {attempt} attempts)")
    wait = backoff(attempt, policy, rng)
    if retry_after_s is not None:
        wait = max(retry_after_s, 0.0)
    if policy.deadline_s is not None and elapsed_s + wait > policy.deadline_s:
        return GiveUp(f"{detail} (row deadline of {policy.deadline_s:g} s reached)")
    return Retry(wait)
