"""How the built-in server behaves: :class:`ServerOptions`, one field per command-line flag."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

PROFILES: Final = ("deepseek", "openai")
API_KEY_ENV: Final = "PIPELINE_SERVER_API_KEY"
RANDOM_FAULT_NAMES: Final = (
    "fault_500",
    "fault_503",
    "fault_502_html",
    "fault_drop",
    "fault_malformed",
    "fault_timeout",
)
"""The faults a request draws at random, by their option names."""
MODEL_IDS: Final = ("deepseek/deepseek-v4-flash", "deepseek-v4-flash", "gpt-4o-mini")
"""The models the server always serves (``served_models`` adds more)."""


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerOptions:
    """How the built-in server behaves; every field is also a ``--field-name`` flag."""

    profile: str = field(
        default="deepseek",
        metadata=_help("Provider to imitate: deepseek or openai.", choices=PROFILES),
    )
    latency_ms: float = field(default=200.0, metadata=_help("Time to answer a request, in ms."))
    latency_jitter_ms: float = field(
        default=0.0, metadata=_help("Up to this many ms more, drawn uniformly per request.")
    )
    max_concurrency: int = field(
        default=0, metadata=_help("Hidden cap on requests in flight; more get 429 (0 = none).")
    )
    rpm: int = field(default=0, metadata=_help("openai profile: requests per minute (0 = none)."))
    tpm: int = field(default=0, metadata=_help("openai profile: tokens per minute (0 = none)."))
    rate_window_s: float = field(
        default=60.0,
        metadata=_help(
            "openai profile: seconds the rpm/tpm limits are enforced over (60 = per minute; "
            "1 = per second, quantized like OpenAI's)."
        ),
    )
    api_key: str = field(
        default="",
        repr=False,
        metadata=_help(f"Require this bearer key (also from ${API_KEY_ENV}); empty = no auth."),
    )
    seed: int = field(default=0, metadata=_help("Seed of the replies and the fault draws."))
    reply_min_fraction: float = field(
        default=0.3, metadata=_help("Shortest reply drawn, as a fraction of max_tokens.")
    )
    truncate_rate: float = field(
        default=0.0,
        metadata=_help("Fraction of text replies that run past max_tokens and are cut."),
    )
    reasoning_min_tokens: int = field(
        default=32, metadata=_help("Fewest reasoning tokens drawn in thinking mode.")
    )
    reasoning_max_tokens: int = field(
        default=256, metadata=_help("Most reasoning tokens drawn in thinking mode.")
    )
    keepalive_after_ms: float = field(
        default=100.0,
        metadata=_help("deepseek profile: stream empty keep-alive lines when slower than this."),
    )
    keepalive_interval_ms: float = field(
        default=50.0, metadata=_help("deepseek profile: ms between keep-alive lines.")
    )
    fault_500: float = field(default=0.0, metadata=_help("Probability of a 500 JSON error."))
    fault_503: float = field(default=0.0, metadata=_help("Probability of a 503 HTML page."))
    fault_502_html: float = field(
        default=0.0, metadata=_help("Probability of a proxy's 502 HTML page.")
    )
    fault_drop: float = field(
        default=0.0, metadata=_help("Probability of closing the connection without an answer.")
    )
    fault_malformed: float = field(
        default=0.0, metadata=_help("Probability of a 200 with a truncated JSON body.")
    )
    fault_timeout: float = field(
        default=0.0, metadata=_help("Probability of not answering for timeout_hang_s.")
    )
    timeout_hang_s: float = field(
        default=30.0, metadata=_help("How long a timeout fault keeps the request hanging.")
    )
    fault_400: float = field(
        default=0.0,
        metadata=_help("Fraction of distinct request bodies that always get 400."),
    )
    reject_substring: str = field(
        default="", metadata=_help("Answer 400 to every request whose messages contain this.")
    )
    prefix_cache_entries: int = field(
        default=100_000, metadata=_help("Prompt-prefix fingerprints the cache remembers.")
    )
    served_models: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            f"Models served besides {', '.join(MODEL_IDS)} (comma-separated); a request for "
            "any other model gets 404 model_not_found."
        ),
    )
    invalid_json_rate: float = field(
        default=0.05,
        metadata=_help(
            "Fraction of schema answers and tool call arguments that break the schema "
            "(never those asked for with strict: true)."
        ),
    )

    batch_api: bool = field(
        default=True,
        metadata=_help("Serve the Batch API (/v1/files, /v1/batches); off: 404 there."),
    )
    batch_delay_s: float = field(
        default=1.0,
        metadata=_help("Seconds a batch stays validating, and again in progress, before done."),
    )
    batch_error_rate: float = field(
        default=0.0,
        metadata=_help("Fraction of batch lines answered with a 500 in the error file."),
    )
    batch_expire_after: int = field(
        default=0,
        metadata=_help("A batch answers this many lines, then expires (0 = never expires)."),
    )
    batch_max_requests: int = field(
        default=50_000, metadata=_help("Requests per batch input file at most, as OpenAI.")
    )
    batch_max_bytes: int = field(
        default=200_000_000, metadata=_help("Bytes per batch input file at most, as OpenAI.")
    )

    @property
    def models(self) -> tuple[str, ...]:
        """The models served: the known ones (:data:`MODEL_IDS`), then ``served_models``."""
        return tuple(dict.fromkeys((*MODEL_IDS, *self.served_models)))

    def __post_init__(self) -> None:
        # a list becomes a tuple
        object.__setattr__(self, "served_models", _model_names(self.served_models))
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        for name in (
            *RANDOM_FAULT_NAMES,
            "fault_400",
            "reply_min_fraction",
            "invalid_json_rate",
            "truncate_rate",
            "batch_error_rate",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        total = sum(getattr(self, name) for name in RANDOM_FAULT_NAMES)
        if total > 1.0 + 1e-9:
            raise ValueError(f"the fault_* probabilities add up to {total:g}; at most 1 is allowed")
        for name in (
            "latency_ms",
            "latency_jitter_ms",
            "max_concurrency",
            "rpm",
            "tpm",
            "reasoning_min_tokens",
            "keepalive_after_ms",
            "timeout_hang_s",
            "prefix_cache_entries",
            "batch_delay_s",
            "batch_expire_after",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if min(self.keepalive_interval_ms, self.batch_max_requests, self.batch_max_bytes) <= 0:
            raise ValueError(
                "keepalive_interval_ms, batch_max_requests and batch_max_bytes must be positive"
            )
        if not 0 < self.rate_window_s <= 60:
            raise ValueError(f"rate_window_s must be in (0, 60], got {self.rate_window_s}")
        if self.reasoning_max_tokens < self.reasoning_min_tokens:
            raise ValueError("reasoning_max_tokens must not be less than reasoning_min_tokens")
        if not -(2**63) <= self.seed < 2**63:
            raise ValueError("seed must fit in 64 bits")


def _model_names(served: object) -> tuple[str, ...]:
    """``served_models`` checked: a sequence of model names (not one string)."""
    if isinstance(served, str) or not isinstance(served, (list, tuple)):
        raise ValueError(f"served_models must be a sequence of model names, got {served!r}")
    for name in served:
        if not isinstance(name, str) or not name.strip() or "," in name:
            raise ValueError(f"served_models: {name!r} is not a model name")
    return tuple(served)
