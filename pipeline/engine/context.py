"""One job, opened: what ``run``, ``status``, ``estimate`` and ``export`` all need of it.

A :class:`JobContext` is built the same way by every command, from the validated
:class:`~pipeline.job.spec.JobSpec` alone: the request template and the planner that turns
input rows into requests, the endpoint's URL and the key under which a run remembers the
limit it learned, the price, and the job's state folder (journal and seals). Building one
reads no input and sends nothing; :meth:`JobContext.scan` checks the input against the job
(every column it names must exist) and counts its rows. Nothing outside the engine builds a
runner to reach these parts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import pyarrow as pa

from pipeline.engine.accounting import Pricing
from pipeline.errors import JobFileError
from pipeline.io.openai_batch import (
    BATCH_COLUMNS,
    BatchPlanner,
    iter_batch_records,
    scan_batch_file,
)
from pipeline.io.sinks import RESULT_COLUMNS, check_writable
from pipeline.io.sources import InputScan, iter_batches, resolve_input, scan_input
from pipeline.job.models import model_facts
from pipeline.job.spec import JobSpec
from pipeline.money.pricing import Price, resolve_price
from pipeline.provider.limits import LearnedLimit
from pipeline.rows.plan import PlannedRow, Planner, with_prompt_token_bounds, with_prompt_tokens
from pipeline.rows.templating import RequestTemplate
from pipeline.state.journal import Journal
from pipeline.state.resume import ResumeCursor
from pipeline.state.runs import StateFolder
from pipeline.state.seals import SealBook

BATCH_ROWS = 2048
"""Input rows read, planned and resumed together."""
THINKING_MIN_TOKENS = 1024
"""Below this ``max_tokens``, thinking mode often leaves no room for the answer."""


class JobContext:
    """A job with its template, planner, price and state folder (see the module docstring)."""

    __slots__ = (
        "batch_rows",
        "job",
        "journal",
        "limit_key",
        "planner",
        "price",
        "pricing",
        "seals",
        "state",
        "template",
        "url",
    )

    def __init__(self, job: JobSpec, *, batch_rows: int = BATCH_ROWS) -> None:
        self.job = job
        self.batch_rows = batch_rows
        self.template = request_template(job)
        self.url = f"{job.request.base_url}/{job.request.endpoint}"
        key_url = f"{job.request.key_base}/{job.request.endpoint}"
        whose = f"{key_url} {job.request.model}".encode()
        self.limit_key = hashlib.blake2b(whose, digest_size=8).hexdigest()
        """Whose in-flight limit a run learns: the endpoint's and the model's (a digest, so
        that no URL is written to the state folder)."""
        self.planner: Planner | BatchPlanner = Planner(
            template=self.template,
            url=key_url,
            id_column=job.input.id_column,
            row_offset=job.input.row_offset,
        )
        if job.input.format == "openai-batch":
            self.planner = BatchPlanner(
                url=key_url,
                model=job.request.model if job.request.model_override else None,
                params=job.request.params,
            )
        self.price: Price | None = resolve_price(
            job.request.base_url, job.request.model, job.pricing
        )
        facts = model_facts(job.request.model)
        self.pricing = Pricing(
            price=self.price,
            max_output=job.request.max_tokens or (facts.max_output if facts else None),
            max_tokens=job.request.max_tokens,
            attempts_per_row=1 + job.output.max_reasks if job.output.schema else 1,
        )
        """What a row can cost at most, and what it reserves from a tokens/min budget."""
        self.state = StateFolder(job.state_path)
        self.journal: Journal = self.state.journal
        self.seals = SealBook(self.state.folder)

    def warnings(self) -> list[str]:
        """What a person should know before the run spends anything."""
        found: list[str] = []
        request = self.job.request
        if self.job.budget.max_cost_usd is not None and request.max_tokens is None:
            worst = self.pricing.worst_cost(0)
            longest = self.pricing.max_output
            tokens = "an unknown number of" if longest is None else f"{longest:,}"
            money = "at a price not known" if worst is None else f"${worst:.4f} of output"
            found.append(
                f"a budget is set but max_tokens is not: every request reserves the model's "
                f"longest answer ({tokens} tokens, {money}) until it is answered. "
                "Set max_tokens."
            )
        if request.thinking and (request.max_tokens or 0) < THINKING_MIN_TOKENS:
            found.append(
                f"thinking is on and max_tokens is {request.max_tokens or 'unset'}: reasoning "
                f"tokens come out of max_tokens, so answers below ~{THINKING_MIN_TOKENS:,} "
                'tokens are often cut off (finish_reason "length"; JSON arrives broken). '
                "Such rows are marked failed as truncated. Raise max_tokens or set "
                'thinking = "disabled".'
            )
        return found

    def check_before_sending(self, *, write_output: bool = True) -> None:
        """What a run needs beyond a valid input: an output it can write (unless it writes
        none), a state folder it can make, and a price when the job has a budget."""
        job = self.job
        if write_output:
            where = "[output] path (or --output)"
            check_writable(job.output.path, job_source=job.source, key=where)
        where = "[output] state_dir (or the output's folder)"
        check_writable(job.state_path, job_source=job.source, key=where, folder=True)
        self.check_priced()

    def check_priced(self) -> None:
        """A budget needs a price to enforce."""
        if self.job.budget.max_cost_usd is not None and self.price is None:
            request = self.job.request
            where = "the built-in server" if request.local else request.base_url
            raise JobFileError(
                self.job.source,
                "[budget] max_cost_usd (or --max-cost)",
                f"needs a price, and {request.model} at {where} has no known price.",
                "Pass --price input=USD,output=USD (per million tokens) or add [pricing] "
                "input and output to the job file.",
            )

    def learned_limit(self) -> LearnedLimit | None:
        """What the job's last run against this endpoint and model learned of its limit."""
        for record in reversed(self.state.history()):
            entry = (record.summary or {}).get("limiter")
            if isinstance(entry, dict) and entry.get("endpoint") == self.limit_key:
                return LearnedLimit.from_dict(entry)
        return None

    def scan(self) -> InputScan:
        """Check the input against the job and count its rows; nothing is sent. Raises a
        :class:`~pipeline.errors.PipelineError` that names the mistake."""
        if self.job.input.format == "openai-batch":
            return self._scan_batch_file()
        files = resolve_input(self.job.input.path, self.job.source)
        found = scan_input(
            files,
            id_column=self.job.input.id_column,
            limit=self.job.input.limit,
            job_source=self.job.source,
        )
        check_columns(self.job, found, self.template)
        return found

    def _scan_batch_file(self) -> InputScan:
        job = self.job
        files = resolve_input(job.input.path, job.source)
        if len(files) != 1:
            raise JobFileError(
                job.source, "[input] path", "an OpenAI batch input is one .jsonl file."
            )
        if files[0].url is not None:
            raise JobFileError(
                job.source,
                "[input] path",
                f"an OpenAI batch input is read from a local file, not {files[0].url}.",
                "Copy it to this machine first.",
            )
        found = scan_batch_file(files[0].path, limit=job.input.limit)
        if found.endpoint != job.request.endpoint:
            raise JobFileError(
                job.source,
                "[request] endpoint",
                f"is {job.request.endpoint!r}, but {files[0].path} holds requests for "
                f"{found.endpoint!r}.",
                f'Set endpoint = "{found.endpoint}".',
            )
        return InputScan(files=files, rows=found.rows, columns=frozenset(BATCH_COLUMNS))

    def input_batches(
        self, scan: InputScan, extra: tuple[str, ...] = ()
    ) -> Iterator[pa.RecordBatch]:
        """The input in record batches of the columns planning needs (and ``extra``)."""
        if self.job.input.format == "openai-batch":
            return iter_batch_records(
                scan.files[0].path, limit=self.job.input.limit, batch_rows=self.batch_rows
            )
        columns = [*self.planner.columns, *extra]
        return iter_batches(
            scan.files, columns, limit=self.job.input.limit, batch_rows=self.batch_rows
        )

    def resume_cursor(
        self, *, retry_failed: bool = False, select_rows: frozenset[int] | None = None
    ) -> ResumeCursor:
        """A cursor over the input that knows which rows earlier runs finished."""
        return ResumeCursor(
            planner=self.planner,
            journal=self.journal,
            seals=self.seals,
            retry_failed=retry_failed,
            select_rows=select_rows,
            by_prefix=self.job.request.order == "prefix",
            count=prompt_counter(self.job),
        )


def prompt_counter(job: JobSpec) -> Callable[[list[PlannedRow]], list[PlannedRow]]:
    """How a run counts the prompts of the rows it sends.

    Exactly, with the DeepSeek tokenizer, when a tokens/min limit or a cost budget depends on
    the counts. Otherwise they only make the worst cost recorded with each request (an upper
    bound, reported for requests a crash left unanswered), so upper bounds do
    (:func:`~pipeline.rows.plan.with_prompt_token_bounds`): the run neither loads the
    tokenizer (about 0.25 s before its first request) nor tokenizes each prompt.
    """
    if job.limits.tokens_per_minute is not None or job.budget.max_cost_usd is not None:
        return with_prompt_tokens
    return with_prompt_token_bounds


def request_template(job: JobSpec) -> RequestTemplate:
    """The job's request template: what each row's request body is made from."""
    schema = job.output.schema
    return RequestTemplate(
        model=job.request.model,
        system=job.request.system,
        prompt=job.request.prompt,
        messages_column=job.request.messages_column,
        params=job.request.params,
        suffix=job.request.suffix,
        completions=job.request.endpoint == "completions",
        # The schema is told in the prompt unless the answer is a function's arguments (the
        # tool's schema says it) or the provider enforces it (a strict json_schema format).
        instruction=(
            schema.instruction()
            if schema is not None
            and job.output.schema_from_tool is None
            and not job.output.schema_enforced
            else None
        ),
    )


def check_columns(job: JobSpec, scan: InputScan, template: RequestTemplate) -> None:
    """Every column the job names must exist in the input."""

    def missing(column: str, key: str, what: str) -> JobFileError:
        shown = ", ".join(sorted(scan.columns)[:30]) or "none"
        return JobFileError(
            job.source,
            key,
            f"{what} {column!r}, which the input lacks (its columns: {shown}).",
            "Fix the name or the input.",
        )

    key = "[request] messages_column" if job.request.messages_column else "[request] prompt"
    what = "names the column" if job.request.messages_column else "has a placeholder for column"
    for column in template.columns:
        if column not in scan.columns:
            raise missing(column, key, what)
    for column in job.output.keep_columns:
        if column not in scan.columns:
            raise missing(column, "[output] keep_columns", "names the column")
        if column == "id" or column in RESULT_COLUMNS:
            raise JobFileError(
                job.source,
                "[output] keep_columns",
                f"{column!r} would clash with the output column of the same name.",
                "Rename that input column or do not keep it.",
            )
    # A job file's schema is checked at load (pipeline.job.structured); a JobSpec made in code
    # is checked here.
    schema = job.output.schema
    own = ("id", *RESULT_COLUMNS)
    for column in schema.columns if schema is not None else ():
        if column in own:
            raise JobFileError(
                job.source,
                "[output] schema",
                f"the property {column!r} is a column the output already has "
                f"({', '.join(own)}): rename the property.",
            )
        if column in job.output.keep_columns:
            raise JobFileError(
                job.source,
                "[output] schema",
                f"the property {column!r} is also in [output] keep_columns: both would be "
                "the output column of that name.",
                "Rename the property, or do not keep that input column.",
            )
