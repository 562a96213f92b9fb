"""What the server does with a request besides answering it (pure): the outcomes counted in
``/_stats``, the random fault a request draws, and the 400s of ``fault_400`` and
``reject_substring``.

One random fault is drawn per request that passes the checks, from a random source seeded with
``seed``, so a run is reproducible; the ``fault_*`` probabilities add up (at most 1 in total).
``fault_400`` is different: a fixed fraction of distinct request bodies (chosen by a hash of the
body bytes and ``seed``) always gets 400, so retrying them never helps; ``reject_substring``
does the same for every request whose text contains it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from enum import StrEnum
from typing import Final

from pipeline.server.options import ServerOptions
from pipeline.server.requests import AnyRequest, InvalidRequest, request_texts


class ServerOutcome(StrEnum):
    """What the server did with a request; the keys of ``/_stats``."""

    OK = "ok"
    RATE_LIMITED = "429"
    INVALID = "400"
    UNAUTHORIZED = "401"
    SERVER_ERROR = "500"
    UNAVAILABLE = "503"
    BAD_GATEWAY = "502_html"
    DROP = "drop"
    MALFORMED = "malformed"
    TIMEOUT = "timeout"


MODEL_NOT_FOUND: Final = "404"
"""The ``/_stats`` key of requests for a model the server does not serve (404
``model_not_found``), counted beside the :class:`ServerOutcome` keys."""

RANDOM_FAULTS: Final[Mapping[str, ServerOutcome]] = {
    "fault_500": ServerOutcome.SERVER_ERROR,
    "fault_503": ServerOutcome.UNAVAILABLE,
    "fault_502_html": ServerOutcome.BAD_GATEWAY,
    "fault_drop": ServerOutcome.DROP,
    "fault_malformed": ServerOutcome.MALFORMED,
    "fault_timeout": ServerOutcome.TIMEOUT,
}


def draw_fault(options: ServerOptions, draw: float) -> ServerOutcome | None:
    """The random fault for a uniform ``draw`` in [0, 1), or None; probabilities add up."""
    edge = 0.0
    for name, outcome in RANDOM_FAULTS.items():
        edge += getattr(options, name)
        if draw < edge:
            return outcome
    return None


def body_digest(body: bytes, seed: int) -> bytes:
    """16 bytes identifying a request body: the first 8 key ``/_stats``, the last 8 fault_400."""
    key = seed.to_bytes(8, "little", signed=True)
    return hashlib.blake2b(body, digest_size=16, key=key).digest()


def always_rejected(digest: bytes, fraction: float) -> bool:
    """Whether the body with ``digest`` is one of the ``fraction`` that always get 400."""
    return int.from_bytes(digest[8:], "little") < fraction * 2**64


def rejection(request: AnyRequest, digest: bytes, options: ServerOptions) -> InvalidRequest | None:
    """The 400 that ``reject_substring`` or ``fault_400`` gives this request, if any."""
    needle = options.reject_substring
    if needle and any(needle in text for text in request_texts(request)):
        return InvalidRequest("This request was rejected by the server's reject_substring.")
    if options.fault_400 and always_rejected(digest, options.fault_400):
        return InvalidRequest("Invalid request (fault_400): this body is always rejected.")
    return None
