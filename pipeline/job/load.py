"""Job files: TOML in (or the same tables as a Python dict, :func:`job_from_dict`), a
validated frozen :class:`~pipeline.job.spec.JobSpec` out.

Validation happens once, at this edge, before any request is sent. Every mistake becomes a
:class:`~pipeline.errors.JobFileError` that names the file, the key and what to do. Pydantic
checks shapes and types; the checks that need the input (columns, ids) live in
:mod:`pipeline.io.sources` and :mod:`pipeline.engine.context`.
"""

from __future__ import annotations

import datetime
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import JobFileError
from pipeline.job.paths import resolve_paths
from pipeline.job.request import (
    body_params,
    check_endpoint,
    check_request_keys,
    check_secrets,
)
from pipeline.job.spec import (
    DEFAULT_BASE_URL,
    DEFAULT_MODEL,
    BatchSpec,
    BudgetSpec,
    ClusterSpec,
    Endpoint,
    InputFormat,
    InputSpec,
    JobSpec,
    LimitsSpec,
    Mode,
    Order,
    OutputSpec,
    RequestSpec,
)
from pipeline.job.structured import Structured, output_schema
from pipeline.money.pricing import PriceOverride
from pipeline.rows.templating import placeholders


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Input(_Strict):
    path: str = Field(min_length=1)
    id_column: str | None = None
    format: InputFormat = "rows"


class _Request(BaseModel):
    # Extra keys are the request parameters of pipeline.job.params, every other key having
    # been refused by pipeline.job.request.check_request_keys.
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    base_url: str = DEFAULT_BASE_URL
    api_key_env: str | None = None
    model: str = Field(default=DEFAULT_MODEL, min_length=1)
    endpoint: Endpoint = "chat/completions"
    system: str | None = None
    prompt: str | None = None
    suffix: str | None = None
    messages_column: str | None = None
    order: Order = "input"
    mode: Mode = "online"
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    thinking: Literal["enabled", "disabled"] | dict[str, Any] | None = None
    reasoning_effort: Literal["high", "max"] | None = None
    extra_body: dict[str, Any] | None = None


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
    schema_: dict[str, Any] | str | None = Field(default=None, alias="schema")
    schema_from_tool: str | None = None
    max_reasks: int = Field(default=2, ge=0, le=20)


class _Batch(_Strict):
    max_requests_per_file: int = Field(default=50_000, ge=1, le=50_000)
    max_bytes_per_file: int = Field(default=200_000_000, ge=1024, le=200_000_000)
    completion_window: Literal["24h"] = "24h"
    poll_s: float = Field(default=5.0, gt=0)
    poll_max_s: float = Field(default=60.0, gt=0)


class _Budget(_Strict):
    max_cost_usd: float | None = Field(default=None, gt=0)


class _Cluster(_Strict):
    engine: Literal["local", "ray"] = "local"
    address: str | None = Field(default=None, min_length=1)
    workers: int = Field(default=4, ge=1, le=10_000)
    shard_rows: int | None = Field(default=None, ge=1)
    state_root: str | None = Field(default=None, min_length=1)


class _Pricing(_Strict):
    input: float | None = Field(default=None, ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    output: float | None = Field(default=None, ge=0)
    off_peak_start: str | None = None
    off_peak_end: str | None = None
    off_peak_discount: float | None = Field(default=None, gt=0, le=1)
    batch_discount: float | None = Field(default=None, gt=0, le=1)


_OFF_PEAK_KEYS = ("off_peak_start", "off_peak_end", "off_peak_discount")


def _price_override(source: Path, pricing: _Pricing) -> PriceOverride:
    """The job's [pricing]; the off-peak window's three keys come together or not at all."""
    given = [key for key in _OFF_PEAK_KEYS if getattr(pricing, key) is not None]
    if given and len(given) < len(_OFF_PEAK_KEYS):
        missing = next(key for key in _OFF_PEAK_KEYS if key not in given)
        raise JobFileError(
            source,
            f"[pricing] {missing}",
            "is missing: give off_peak_start, off_peak_end and off_peak_discount together "
            "(or none of them).",
        )
    start = _clock_time(source, "off_peak_start", pricing.off_peak_start)
    end = _clock_time(source, "off_peak_end", pricing.off_peak_end)
    if start is not None and start == end:
        raise JobFileError(
            source, "[pricing] off_peak_end", "equals off_peak_start: the window would be empty."
        )
    return PriceOverride(
        input=_decimal(pricing.input),
        cached_input=_decimal(pricing.cached_input),
        output=_decimal(pricing.output),
        off_peak_start=start,
        off_peak_end=end,
        off_peak_discount=_decimal(pricing.off_peak_discount),
        batch_discount=_decimal(pricing.batch_discount),
    )


def _clock_time(source: Path, key: str, text: str | None) -> datetime.time | None:
    """``"16:30"`` -> 16:30 (a UTC time of day)."""
    if text is None:
        return None
    hours, sep, minutes = text.partition(":")
    if (
        sep
        and len(hours) == 2
        and len(minutes) == 2
        and hours.isdigit()
        and minutes.isdigit()
        and int(hours) < 24
        and int(minutes) < 60
    ):
        return datetime.time(int(hours), int(minutes))
    raise JobFileError(
        source,
        f"[pricing] {key}",
        f'must be a UTC time of day written HH:MM, like "16:30" (got {text!r}).',
    )


class _Job(_Strict):
    name: str = Field(min_length=1)
    input: _Input
    request: _Request = Field(default_factory=_Request)
    limits: _Limits = Field(default_factory=_Limits)
    output: _Output
    pricing: _Pricing | None = None
    budget: _Budget = Field(default_factory=_Budget)
    batch: _Batch = Field(default_factory=_Batch)
    cluster: _Cluster = Field(default_factory=_Cluster)


_SECTION_HELP = {
    "input": "path, id_column, format",
    "request": "base_url, api_key_env, model, endpoint, system, prompt, suffix, "
    "messages_column, order, mode, extra_body, and the OpenAI and DeepSeek request parameters "
    "(max_tokens, temperature, thinking, tools, response_format, ...)",
    "limits": "max_in_flight, max_attempts, timeout_s, max_retry_wait_s, row_deadline_s, "
    "requests_per_minute, tokens_per_minute",
    "output": "path, keep_columns, state_dir, schema, schema_from_tool, max_reasks",
    "budget": "max_cost_usd",
    "batch": "max_requests_per_file, max_bytes_per_file, completion_window, poll_s, poll_max_s",
    "cluster": "engine, address, workers, shard_rows, state_root",
    "pricing": "input, cached_input, output (USD per million tokens), off_peak_start, "
    "off_peak_end (UTC, HH:MM), off_peak_discount (fraction paid off-peak), batch_discount "
    "(fraction paid in batch mode)",
    "": "name and the tables [input], [request], [limits], [output], [pricing], [budget], "
    "[batch], [cluster]",
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


def _check_template(source: Path, key: str, template: str | None) -> None:
    if template is None:
        return
    try:
        placeholders(template)
    except ValueError as exc:
        raise JobFileError(source, f"[request] {key}", f"{exc}.") from None
    if not template.strip():
        raise JobFileError(source, f"[request] {key}", "is empty.")


def _check_prompt_keys(source: Path, request: _Request) -> None:
    """The keys that say what is sent must fit the endpoint."""
    if request.endpoint == "completions":
        # FIM: DeepSeek's /beta/completions takes a prompt and a suffix, no chat, no thinking.
        wrong = {"messages_column": request.messages_column, "system": request.system}
        for key, value in wrong.items():
            if value is not None:
                raise JobFileError(
                    source,
                    f"[request] {key}",
                    'is for chat requests; endpoint = "completions" sends `prompt` and '
                    "`suffix` only.",
                )
        if request.prompt is None:
            raise JobFileError(
                source,
                "[request] prompt",
                'is required with endpoint = "completions" (the text before the hole).',
            )
        if request.thinking == "enabled" or request.reasoning_effort is not None:
            raise JobFileError(
                source,
                "[request] thinking",
                "FIM completion is non-thinking only.",
                "Remove thinking/reasoning_effort from this job.",
            )
    else:
        if (request.prompt is None) == (request.messages_column is None):
            raise JobFileError(
                source,
                "[request] prompt",
                "give exactly one of `prompt` (a template over input columns) "
                "and `messages_column` (an input column of chat messages).",
            )
        if request.suffix is not None:
            raise JobFileError(
                source,
                "[request] suffix",
                'is for FIM completion; set endpoint = "completions" to use it.',
            )
    _check_template(source, "prompt", request.prompt)
    _check_template(source, "suffix", request.suffix)


def _thinking_params(source: Path, request: _Request) -> dict[str, Any]:
    """``thinking`` and ``reasoning_effort`` the way DeepSeek expects them in the body."""
    params: dict[str, Any] = {}
    thinking = request.thinking
    if isinstance(thinking, str):
        params["thinking"] = {"type": thinking}
    elif thinking is not None:
        if thinking.get("type") not in ("enabled", "disabled"):
            raise JobFileError(
                source,
                "[request] thinking",
                f'must be "enabled" or "disabled" (got {thinking!r}).',
            )
        params["thinking"] = dict(thinking)
    if request.reasoning_effort is not None:
        if thinking == "disabled" or params.get("thinking", {}).get("type") == "disabled":
            raise JobFileError(
                source,
                "[request] reasoning_effort",
                'has no effect with thinking = "disabled".',
                "Remove one of the two.",
            )
        params["reasoning_effort"] = request.reasoning_effort
    return params


def _request_params(source: Path, request: _Request, *, batch: bool) -> dict[str, Any]:
    """Check the prompt settings; return the body parameters sent with every request."""
    if not batch:
        _check_prompt_keys(source, request)
    known: dict[str, Any] = {}
    if request.max_tokens is not None:
        known["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        known["temperature"] = request.temperature
    known.update(_thinking_params(source, request))
    known.update(request.model_extra or {})
    check_endpoint(source, request.endpoint, known)
    return body_params(source, known, request.extra_body)


def _structured(source: Path, job: _Job, params: dict[str, Any]) -> Structured:
    return output_schema(
        source,
        schema=job.output.schema_,
        schema_from_tool=job.output.schema_from_tool,
        endpoint=job.request.endpoint,
        keep_columns=job.output.keep_columns,
        params=params,
    )


def parse_job(text: str, path: Path | str = "<job>") -> JobSpec:
    """Validate a job file's text; raise :class:`JobFileError` naming the key on any mistake.

    ``path`` is the job file's: its paths are read relative to its folder (see
    :mod:`pipeline.job.paths`)."""
    source = Path(path)
    return job_from_dict(parse_toml(text, source), source)


def parse_toml(text: str, path: Path | str = "<job>") -> dict[str, Any]:
    """A job file's text as its tables, unvalidated; text that is not TOML is a
    :class:`JobFileError` naming ``path``."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobFileError(path, "", f"is not valid TOML ({exc}).") from exc


def job_from_dict(tables: Mapping[str, Any], path: Path | str = "<job dict>") -> JobSpec:
    """Validate a job given as a dict shaped like a job file (``{"name": ..., "input":
    {"path": ...}, "request": {...}, ...}``), with the same checks and the same
    :class:`JobFileError` messages as a file; ``path`` names it in them, and its relative paths
    are read from that path's folder (the current folder for ``"<job dict>"``)."""
    source = Path(path)
    raw = dict(tables)
    check_secrets(source, raw)
    if isinstance(raw.get("request"), dict):
        check_request_keys(source, raw["request"])
    try:
        job = _Job.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise _translate(source, exc.errors()[0]) from None

    request = job.request
    batch = job.input.format == "openai-batch"
    if batch and job.input.id_column is not None:
        raise JobFileError(
            source, "[input] id_column", "an OpenAI batch file's ids are its custom_id fields."
        )
    params = _request_params(source, request, batch=batch)
    structured = _structured(source, job, params)
    paths = resolve_paths(
        source,
        input_path=job.input.path,
        output_path=job.output.path,
        state_dir=job.output.state_dir,
    )
    pricing = None
    if job.pricing is not None:
        pricing = _price_override(source, job.pricing)
    return JobSpec(
        name=job.name,
        source=str(source),
        input=InputSpec(
            path=paths.input,
            id_column="custom_id" if batch else job.input.id_column,
            format=job.input.format,
        ),
        request=RequestSpec(
            base_url=request.base_url.rstrip("/"),
            api_key_env=request.api_key_env,
            model=request.model,
            endpoint=request.endpoint,
            system=request.system,
            prompt=request.prompt,
            suffix=request.suffix,
            messages_column=request.messages_column,
            order=request.order,
            mode=request.mode,
            params=params,
            model_override=not batch or "model" in request.model_fields_set,
        ),
        limits=LimitsSpec(**job.limits.model_dump()),
        output=OutputSpec(
            path=paths.output,
            keep_columns=tuple(job.output.keep_columns),
            state_dir=paths.state_dir,
            schema=structured.schema,
            schema_enforced=structured.enforced,
            schema_from_tool=job.output.schema_from_tool,
            max_reasks=job.output.max_reasks,
        ),
        pricing=pricing,
        budget=BudgetSpec(max_cost_usd=_decimal(job.budget.max_cost_usd)),
        batch=BatchSpec(**job.batch.model_dump()),
        cluster=ClusterSpec(
            engine=job.cluster.engine,
            address=job.cluster.address,
            workers=job.cluster.workers,
            shard_rows=job.cluster.shard_rows,
            state_root=(
                None
                if job.cluster.state_root is None
                else str(source.parent / Path(job.cluster.state_root).expanduser())
            ),
        ),
        notices=paths.notices,
    )


def load_job(path: Path | str) -> JobSpec:
    """Read and validate a job file."""
    return parse_job(read_job_file(path), path)


def read_job_file(path: Path | str) -> str:
    """A job file's text; a file that is missing or unreadable is a :class:`JobFileError`."""
    source = Path(path)
    try:
        return source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobFileError(source, "", "no such job file.", "Check the path.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobFileError(source, "", f"cannot be read ({exc}).") from None
