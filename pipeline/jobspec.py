"""Job files: TOML in, a validated frozen :class:`JobSpec` out.

Validation happens once, at this edge, before any request is sent. Every mistake becomes a
:class:`~pipeline.errors.JobFileError` that names the file, the key and what to do. Pydantic
checks shapes and types; the checks that need the input (columns, ids) live in
:mod:`pipeline.sources` and :mod:`pipeline.plan`.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import JobFileError
from pipeline.templating import placeholders

DEFAULT_BASE_URL = "https://llm.wavespeed.ai/v1"
DEFAULT_MODEL = "deepseek/deepseek-v4-flash"

# Keys of [request] that pipeline itself interprets; every other key is passed through
# into the request body unchanged.
_OWN_REQUEST_KEYS = frozenset(
    {"base_url", "api_key_env", "model", "endpoint", "system", "prompt", "messages_column"}
)


# ---------------------------------------------------------------------------------------
# The validated job: frozen values used everywhere inside the package.


@dataclass(frozen=True, slots=True, kw_only=True)
class InputSpec:
    path: str
    id_column: str | None = None
    limit: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestSpec:
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str | None = None
    model: str = DEFAULT_MODEL
    endpoint: str = "chat/completions"
    system: str | None = None
    prompt: str | None = None
    messages_column: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    """Body parameters sent with every request (max_tokens, temperature, passthrough keys)."""
    identity: str | None = None
    """What identifies the endpoint in request keys, if not ``base_url`` (``--local``)."""

    @property
    def key_base(self) -> str:
        return self.identity or self.base_url

    @property
    def max_tokens(self) -> int | None:
        value = self.params.get("max_tokens", self.params.get("max_completion_tokens"))
        return value if isinstance(value, int) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsSpec:
    max_in_flight: int = 64
    max_attempts: int = 6
    timeout_s: float = 600.0
    max_retry_wait_s: float = 60.0
    row_deadline_s: float | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputSpec:
    path: str
    keep_columns: tuple[str, ...] = ()
    state_dir: str | None = None

    @property
    def state_path(self) -> Path:
        """The job's state folder: configured, or ``<output>.state`` beside the output."""
        if self.state_dir is not None:
            return Path(self.state_dir)
        out = Path(self.path)
        return out.with_name(out.name + ".state")


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceOverride:
    """USD per million tokens; ``None`` keeps the built-in table's value."""

    input: Decimal | None = None
    cached_input: Decimal | None = None
    output: Decimal | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    name: str
    source: str
    """Where the job came from (the job file's path), for messages."""
    input: InputSpec
    request: RequestSpec
    limits: LimitsSpec
    output: OutputSpec
    pricing: PriceOverride | None = None

    def api_key(self) -> str | None:
        """The API key from the environment variable the job names (never stored)."""
        if self.request.api_key_env is None:
            return None
        return os.environ.get(self.request.api_key_env)


# ---------------------------------------------------------------------------------------
# The edge: pydantic models mirroring the TOML file.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Input(_Strict):
    path: str = Field(min_length=1)
    id_column: str | None = None


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    base_url: str = DEFAULT_BASE_URL
    api_key_env: str | None = None
    model: str = Field(default=DEFAULT_MODEL, min_length=1)
    endpoint: Literal["chat/completions"] = "chat/completions"
    system: str | None = None
    prompt: str | None = None
    messages_column: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)


class _Limits(_Strict):
    max_in_flight: int = Field(default=64, ge=1, le=100_000)
    max_attempts: int = Field(default=6, ge=1, le=100)
    timeout_s: float = Field(default=600.0, gt=0)
    max_retry_wait_s: float = Field(default=60.0, gt=0)
    row_deadline_s: float | None = Field(default=None, gt=0)
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)


class _Output(_Strict):
    path: str = Field(min_length=1)
    keep_columns: list[str] = Field(default_factory=list)
    state_dir: str | None = None


class _Pricing(_Strict):
    input: float | None = Field(default=None, ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    output: float | None = Field(default=None, ge=0)


class _Job(_Strict):
    name: str = Field(min_length=1)
    input: _Input
    request: _Request = Field(default_factory=_Request)
    limits: _Limits = Field(default_factory=_Limits)
    output: _Output
    pricing: _Pricing | None = None


_SECTION_HELP = {
    "input": "path, id_column",
    "request": "base_url, api_key_env, model, system, prompt, messages_column, max_tokens, "
    "temperature, and any request-body key to pass through",
    "limits": "max_in_flight, max_attempts, timeout_s, max_retry_wait_s, row_deadline_s, "
    "requests_per_minute, tokens_per_minute",
    "output": "path, keep_columns, state_dir",
    "pricing": "input, cached_input, output (USD per million tokens)",
    "": "name and the tables [input], [request], [limits], [output], [pricing]",
}


def _key_name(loc: tuple[int | str, ...], value: Any) -> str:
    """``("request", "max_tokens")`` -> ``"[request] max_tokens"``."""
    parts = [str(part) for part in loc]
    if not parts:
        return ""
    if len(parts) == 1:
        is_table = parts[0] in _SECTION_HELP or isinstance(value, dict)
        return f"[{parts[0]}]" if is_table else parts[0]
    head, *rest = parts
    return f"[{head}] " + ".".join(rest)


def _translate(path: Path, error: Any) -> JobFileError:
    loc = tuple(error["loc"])
    kind = error["type"]
    value = error.get("input")
    key = _key_name(loc, value)
    if kind == "extra_forbidden":
        section = str(loc[0]) if len(loc) > 1 else ""
        known = _SECTION_HELP.get(section, "")
        return JobFileError(path, key, "unknown key.", f"Known keys here: {known}.")
    if kind == "missing":
        return JobFileError(path, key, "is required but missing.", "Add it to the job file.")
    if kind == "literal_error":
        return JobFileError(path, key, f"{value!r} is not allowed: {error['msg'].lower()}.")
    if kind.endswith("_type") or kind in {"model_type", "model_attributes_type"}:
        got = type(value).__name__
        return JobFileError(
            path, key, f"has the wrong type: {error['msg'].lower()}, got {got} {value!r}."
        )
    return JobFileError(path, key, f"{error['msg'].lower()} (got {value!r}).")


def _decimal(value: float | None) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def _request_params(source: Path, request: _Request) -> dict[str, Any]:
    """Check the prompt settings; return the body parameters sent with every request."""
    if (request.prompt is None) == (request.messages_column is None):
        raise JobFileError(
            source,
            "[request] prompt",
            "give exactly one of `prompt` (a template over input columns) "
            "and `messages_column` (an input column of chat messages).",
        )
    if request.prompt is not None:
        try:
            placeholders(request.prompt)
        except ValueError as exc:
            raise JobFileError(source, "[request] prompt", f"{exc}.") from None
        if not request.prompt.strip():
            raise JobFileError(source, "[request] prompt", "is empty.")
    extra = dict(request.model_extra or {})
    for key, value in extra.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise JobFileError(source, f"[request] {key}", "must be a finite number.")
    params: dict[str, Any] = {}
    if request.max_tokens is not None:
        params["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        params["temperature"] = request.temperature
    params.update(extra)
    for own in ("messages", "model", "stream"):
        if own in params:
            raise JobFileError(
                source,
                f"[request] {own}",
                "is set by pipeline itself and cannot be passed through.",
                "Use `prompt`/`system`, `messages_column` or `model` instead."
                if own != "stream"
                else "Remove it: responses are read whole.",
            )
    return params


def parse_job(text: str, path: Path | str = "<job>") -> JobSpec:
    """Validate a job file's text; raise :class:`JobFileError` naming the key on any mistake."""
    source = Path(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobFileError(source, "", f"is not valid TOML ({exc}).") from exc
    try:
        job = _Job.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise _translate(source, exc.errors()[0]) from None

    request = job.request
    params = _request_params(source, request)
    pricing = None
    if job.pricing is not None:
        pricing = PriceOverride(
            input=_decimal(job.pricing.input),
            cached_input=_decimal(job.pricing.cached_input),
            output=_decimal(job.pricing.output),
        )
    return JobSpec(
        name=job.name,
        source=str(source),
        input=InputSpec(path=job.input.path, id_column=job.input.id_column),
        request=RequestSpec(
            base_url=request.base_url.rstrip("/"),
            api_key_env=request.api_key_env,
            model=request.model,
            endpoint=request.endpoint,
            system=request.system,
            prompt=request.prompt,
            messages_column=request.messages_column,
            params=params,
        ),
        limits=LimitsSpec(**job.limits.model_dump()),
        output=OutputSpec(
            path=job.output.path,
            keep_columns=tuple(job.output.keep_columns),
            state_dir=job.output.state_dir,
        ),
        pricing=pricing,
    )


def load_job(path: Path | str) -> JobSpec:
    """Read and validate a job file."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobFileError(source, "", "no such job file.", "Check the path.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobFileError(source, "", f"cannot be read ({exc}).") from None
    return parse_job(text, source)


@dataclass(frozen=True, slots=True, kw_only=True)
class Overrides:
    """Command-line overrides, applied after the file is validated."""

    input: str | None = None
    output: str | None = None
    base_url: str | None = None
    limit: int | None = None
    identity: str | None = None


def apply_overrides(job: JobSpec, overrides: Overrides) -> JobSpec:
    """The job with the command line's overrides applied."""
    input_spec = job.input
    if overrides.input is not None:
        input_spec = replace(input_spec, path=overrides.input)
    if overrides.limit is not None:
        input_spec = replace(input_spec, limit=overrides.limit)
    output_spec = job.output
    if overrides.output is not None:
        output_spec = replace(output_spec, path=overrides.output)
    request = job.request
    if overrides.base_url is not None:
        request = replace(request, base_url=overrides.base_url.rstrip("/"))
    if overrides.identity is not None:
        request = replace(request, identity=overrides.identity)
    return replace(job, input=input_spec, output=output_spec, request=request)
