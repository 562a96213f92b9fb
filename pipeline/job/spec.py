"""The job: frozen values (:class:`JobSpec` and its sections) used everywhere inside the
package, and the command line's :class:`Overrides`. Job files are read and validated into
these by :mod:`pipeline.job.load`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.job.urls import is_url, local_state_folder, url_name, url_with_name
from pipeline.money.pricing import PriceOverride

if TYPE_CHECKING:
    from pipeline.rows.schema import OutputSchema

DEFAULT_BASE_URL = "https://llm.wavespeed.ai/v1"
DEFAULT_MODEL = "deepseek/deepseek-v4-flash"
LOCAL_IDENTITY = "local://built-in-server"
"""Request keys of --local runs: stable across the built-in server's ports, and never the
same as a real provider's, so results made by the built-in server are never taken for real
answers."""
LOCAL_STATE = "local"
"""The folder, inside a job's state folder, that holds its --local runs' state."""

Endpoint = Literal["chat/completions", "completions"]
Order = Literal["input", "prefix"]
Mode = Literal["online", "batch"]


# ---------------------------------------------------------------------------------------
# The validated job: frozen values used everywhere inside the package.


InputFormat = Literal["rows", "openai-batch"]


@dataclass(frozen=True, slots=True, kw_only=True)
class InputSpec:
    path: str
    id_column: str | None = None
    limit: int | None = None
    format: InputFormat = "rows"
    """``rows``: Parquet/JSONL rows rendered by the prompt template; ``openai-batch``: a
    JSONL file of ready-made requests in the OpenAI Batch API format."""
    row_offset: int = 0
    """The input row number of this input's first row: a shard of a cluster run (see
    :mod:`pipeline.cluster`) numbers, keys and ids its rows as the whole input does."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestSpec:
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str | None = None
    model: str = DEFAULT_MODEL
    endpoint: Endpoint = "chat/completions"
    system: str | None = None
    prompt: str | None = None
    suffix: str | None = None
    """FIM: the text after the hole (``endpoint = "completions"`` only), a template."""
    messages_column: str | None = None
    order: Order = "input"
    """``"prefix"``: within each input batch, send rows that share a prompt prefix together."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """Body parameters sent with every request: the known request parameters the job sets
    (max_tokens, temperature, ...), then its ``[request.extra_body]`` keys as they are."""
    identity: str | None = None
    """What identifies the endpoint in request keys, if not ``base_url`` (``--local``)."""
    model_override: bool = True
    """OpenAI batch input: replace each line's model with ``model`` (else keep the lines')."""
    mode: Mode = "online"
    """``"batch"``: send the rows through the provider's Batch API (:mod:`pipeline.batch`)."""

    @property
    def key_base(self) -> str:
        return self.identity or self.base_url

    @property
    def local(self) -> bool:
        """Whether the job runs against the built-in server (``--local``)."""
        return self.identity == LOCAL_IDENTITY

    @property
    def max_tokens(self) -> int | None:
        value = self.params.get("max_tokens", self.params.get("max_completion_tokens"))
        return value if isinstance(value, int) else None

    @property
    def thinking(self) -> bool:
        """Whether requests ask for thinking mode: DeepSeek models think unless told not to,
        other models only when asked."""
        from pipeline.rows.tokens import is_deepseek_model, thinking_enabled

        if self.endpoint != "chat/completions":
            return False
        explicit = "thinking" in self.params or "reasoning_effort" in self.params
        return thinking_enabled(self.params) and (explicit or is_deepseek_model(self.model))


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
    schema: OutputSchema | None = None
    """Answers are JSON validated against this schema; its fields become typed columns."""
    schema_from_tool: str | None = None
    """The schema is this function's parameters, and its call's arguments are the answer."""
    max_reasks: int = 2
    """How often an answer that fails the schema is asked again, with the error appended."""
    schema_enforced: bool = False
    """The provider enforces :attr:`schema` (a ``json_schema`` response format with
    ``strict = true``), so it is not repeated in the prompt."""


@dataclass(frozen=True, slots=True)
class Notice:
    """Something a person should know about a job file that loads all the same (a path found
    only the old way, relative to the current folder). ``str()`` is the whole message, which
    names the file and the key; print it as ``warning: ...``."""

    key: str
    """The key it is about (``[input] path``), so that a command-line override can drop it."""
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetSpec:
    max_cost_usd: Decimal | None = None
    """The most this job may spend, over all its runs (since the last ``--fresh``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchSpec:
    """``[batch]``: how batch mode splits, submits and waits (see :mod:`pipeline.batch`)."""

    max_requests_per_file: int = 50_000
    """The provider's limit of requests per batch input file (OpenAI: 50,000)."""
    max_bytes_per_file: int = 200_000_000
    """The provider's limit of bytes per batch input file (OpenAI: 200 MB)."""
    completion_window: str = "24h"
    poll_s: float = 5.0
    """The first wait between two looks at a batch; it doubles up to :attr:`poll_max_s`."""
    poll_max_s: float = 60.0


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """``[cluster]``: run the job across a Ray cluster (see :mod:`pipeline.cluster`)."""

    engine: Literal["local", "ray"] = "local"
    address: str | None = None
    """The Ray cluster: ``auto`` (the running one), ``ray://host:10001``; None: a local one."""
    workers: int = 4
    shard_rows: int | None = None
    """Rows per shard (None: about four shards per worker)."""
    state_root: str | None = None
    """Where the shards' state lives (every node must reach it); None: the job's state folder."""


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
    budget: BudgetSpec = BudgetSpec()
    batch: BatchSpec = BatchSpec()
    cluster: ClusterSpec = ClusterSpec()
    notices: tuple[Notice, ...] = ()
    """Warnings from loading the job file, to show before anything runs (see :class:`Notice`)."""

    @property
    def state_path(self) -> Path:
        """The job's state folder: ``[output] state_dir``, or ``<output>.state`` beside the
        output; for an output in object storage (a URL), ``.pipeline/state/<job name>`` under
        the current folder, since the state needs appends and fsync."""
        output = self.output
        if output.state_dir is not None:
            return Path(output.state_dir)
        if is_url(output.path):
            return local_state_folder(self.name, output.path)
        out = Path(output.path)
        return out.with_name(out.name + ".state")

    def api_key(self) -> str | None:
        """The API key from the environment variable the job names (never stored)."""
        if self.request.api_key_env is None:
            return None
        return os.environ.get(self.request.api_key_env)


@dataclass(frozen=True, slots=True, kw_only=True)
class Overrides:
    """Command-line overrides, applied after the file is validated. Their paths are relative
    to the current folder (a job file's are relative to the job file's folder)."""

    input: str | None = None
    output: str | None = None
    base_url: str | None = None
    limit: int | None = None
    max_cost: Decimal | None = None
    model: str | None = None
    price: PriceOverride | None = None
    """``--price``: over the job's ``[pricing]``."""
    local: bool = False
    """The built-in server's side of the job (``--local``): its own request keys, output and
    state, never summed with the real endpoint's (see :func:`local_side`)."""
    mode: Mode | None = None
    """``--mode``: over ``[request] mode``."""


def local_side(job: JobSpec, output: OutputSpec, *, renamed: bool) -> OutputSpec:
    """Where a job's ``--local`` runs keep their results: a state folder of their own inside
    the job's (``<state>/local``), so that their spend, learned limits and history are never
    summed with the real endpoint's, and, when ``renamed``, an output of their own
    (``labels.parquet`` -> ``labels.local.parquet``) that a real run never overwrites.
    ``output`` is ``job``'s output with ``--output`` applied."""
    state = replace(job, output=output).state_path / LOCAL_STATE
    path = output.path
    if renamed and is_url(path):
        name = Path(url_name(path))
        path = url_with_name(path, f"{name.stem}.local{name.suffix}")
    elif renamed:
        out = Path(path)
        path = str(out.with_name(f"{out.stem}.local{out.suffix}"))
    return replace(output, path=path, state_dir=str(state))


def apply_overrides(job: JobSpec, overrides: Overrides) -> JobSpec:
    """The job with the command line's overrides applied."""
    input_spec = job.input
    moot: set[str] = set()
    if overrides.input is not None:
        input_spec = replace(input_spec, path=overrides.input)
        moot.add("[input] path")
    if overrides.limit is not None:
        input_spec = replace(input_spec, limit=overrides.limit)
    output_spec = job.output
    if overrides.output is not None:
        output_spec = replace(output_spec, path=overrides.output)
        moot.add("[output] path")
    if overrides.local:
        output_spec = local_side(job, output_spec, renamed=overrides.output is None)
    request = job.request
    if overrides.base_url is not None:
        request = replace(request, base_url=overrides.base_url.rstrip("/"))
    if overrides.model is not None:
        request = replace(request, model=overrides.model, model_override=True)
    if overrides.local:
        request = replace(request, identity=LOCAL_IDENTITY)
    if overrides.mode is not None:
        request = replace(request, mode=overrides.mode)
    pricing = job.pricing
    if overrides.price is not None:
        pricing = overrides.price.over(pricing)
    budget = job.budget
    if overrides.max_cost is not None:
        budget = replace(budget, max_cost_usd=overrides.max_cost)
    notices = tuple(notice for notice in job.notices if notice.key not in moot)
    return replace(
        job,
        input=input_spec,
        output=output_spec,
        request=request,
        pricing=pricing,
        budget=budget,
        notices=notices,
    )
