"""``pipeline estimate``: what a job will cost and how long it will take, before it is sent.

Nothing is sent (``--sample`` aside, see :mod:`pipeline.cli.estimate`). One streaming pass
over the input plans every row exactly as a run does and counts its prompt:

**Input tokens** are exact for DeepSeek models: each planned body is laid out as the built-in
server and :func:`pipeline.rows.tokens.count_prompt_tokens` lay it out, and encoded with the
DeepSeek V4 tokenizer's parallel ``encode_batch_fast`` (no character offsets),
:data:`ENCODE_CHUNK` bodies a call, in a worker thread while the next batch of
:data:`TOKENIZE_BATCH` rows is planned. The total equals the ``prompt_tokens`` the
built-in server reports when the job runs. Each batch is cross-checked against
``count_prompt_tokens`` on a few rows; on any disagreement that function's counts are used.
OpenAI models are counted by ``count_prompt_tokens`` with tiktoken where its encoding is on
this machine, labelled ``exact (tiktoken o200k_base)``; other models get its documented
heuristic, labelled as such (:func:`pipeline.rows.tokens.count_method`).

**Cached-prefix tokens** replay the rows, in input order, through
:class:`pipeline.rows.prefix.CompactPrefixCache` (DeepSeek's 64-token blocks), fed each
prompt's chained block fingerprints, computed in the worker thread as soon as a chunk is
encoded; token ids and ``Encoding`` objects are dropped right there.

**Output tokens** come from the answers already in the job's state folder (earlier runs, or
``--sample``): :func:`read_history` reads the most recent :data:`HISTORY_LIMIT` of them.
Rows that already have a result are not sent again by a run; they count with what they
really cost. The output-length model, the costs, the 95% interval, the duration and the
warnings are computed from the scan's totals by :mod:`pipeline.estimate.figures` and
:mod:`pipeline.estimate.checks`.

Memory is bounded by the batch size, the tokenizer chunk and the prefix cache's capacity
(:class:`~pipeline.rows.prefix.CompactPrefixCache`: about 10 bytes per remembered block),
never by the rows: the per-row figures are streamed to their Parquet batch by batch, and a
local input is read through a small buffer (:mod:`pipeline.io.sources`). A 1,000,000-row
estimate peaks under 300 MB (``bench/estimate_large.py``).
"""

from __future__ import annotations

import ctypes
import functools
import heapq
import os
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.engine.context import JobContext
from pipeline.errors import InputError, StateError
from pipeline.estimate.checks import warnings_for
from pipeline.estimate.figures import (
    SHOWN_IDS,
    Estimate,
    Observation,
    RowModel,
    Totals,
    assemble,
    output_model,
    summarize,
)
from pipeline.io.openai_batch import BatchPlanner
from pipeline.job.models import model_facts
from pipeline.job.spec import JobSpec
from pipeline.money.pricing import cost, quote_price
from pipeline.results import RowResult
from pipeline.rows import tokens
from pipeline.rows.plan import PlannedRow, Planner
from pipeline.rows.prefix import CompactPrefixCache, block_fingerprints
from pipeline.state.journal import Journal

HISTORY_LIMIT = 100_000
"""Most recent results read from the state folder to learn the output length."""
TOKENIZE_BATCH = 2048
"""Rows per input batch (planned, tokenized and accounted together): 8,192 held 230 MiB more
at the peak (two batches' bodies, texts and the tokenizer's buffers) for no speed."""
ENCODE_CHUNK = 256
"""Bodies per parallel tokenizer call: bounds the tokenizer's own (native) working memory."""
CACHE_BLOCKS = 1 << 20
"""Prompt blocks the estimate's prefix cache remembers: about a million (64M tokens of
prefixes), in about 10 MB (:class:`~pipeline.rows.prefix.CompactPrefixCache`)."""
CHECK_ROWS = 4
"""Rows of each batch cross-checked against :func:`pipeline.rows.tokens.count_prompt_tokens`."""

PER_ROW_SCHEMA_TAIL = [
    ("row", pa.int64()),
    ("prompt_tokens", pa.int64()),
    ("cached_prefix_tokens", pa.int64()),
    ("expected_output_tokens", pa.float64()),
    ("worst_output_tokens", pa.int64()),
    ("expected_cost_usd", pa.float64()),
    ("worst_cost_usd", pa.float64()),
    ("over_context", pa.bool_()),
]


# ---------------------------------------------------------------------------------------
# I/O: the state folder's history.


def read_history(journal: Journal, limit: int = HISTORY_LIMIT) -> list[Observation]:
    """The ``limit`` most recent answered results (latest run first, then latest written).

    A result counts when an answer came back: ok, or failed with a ``finish_reason`` (an
    answer cut at ``max_tokens`` may be recorded as failed, and it is exactly what the
    truncation check must see).
    """
    heap: list[tuple[int, int, Observation]] = []
    for seq, result in enumerate(journal.iter_results()):
        if result.status == "stopped" or (result.status != "ok" and result.finish_reason is None):
            continue
        item = (
            result.run,
            seq,
            Observation(
                completion_tokens=result.usage.completion_tokens,
                reasoning_tokens=result.usage.reasoning_tokens,
                finish_reason=result.finish_reason,
                latency_ms=result.latency_ms,
            ),
        )
        if len(heap) < limit:
            heapq.heappush(heap, item)
        elif limit > 0:
            heapq.heappushpop(heap, item)
    return [item[2] for item in sorted(heap, reverse=True)]


# ---------------------------------------------------------------------------------------
# I/O: the pass over the input.


def _layout(body: Mapping[str, Any]) -> str | None:
    """The text DeepSeek tokenizes for ``body``, or None when it is not a DeepSeek body
    this module can lay out (then only ``count_prompt_tokens`` counts it)."""
    if not tokens.is_deepseek_model(str(body.get("model", ""))):
        return None
    full = getattr(tokens, "deepseek_layout", None)  # chat with tools, and FIM bodies
    if full is not None:
        return str(full(body))
    if "messages" not in body or body.get("tools") or "prompt" in body:
        return None
    return tokens.deepseek_chat_layout(body["messages"], thinking=tokens.thinking_enabled(body))


Prefixes = list[tuple[int, ...] | None]
"""Per body: the chained fingerprints of its whole prompt blocks (None: not counted exactly)."""


@dataclass(frozen=True, slots=True)
class Counting:
    """How one batch's prompts were counted."""

    methods: frozenset[tokens.CountMethod]
    tools_approximate: bool = False
    """Some prompt counted with tiktoken has tool definitions or tool calls (approximate)."""

    @property
    def exact(self) -> bool:
        return all(method.exact for method in self.methods)


_Counted = tuple[list[int], Prefixes, Counting]


def _encode(texts: Sequence[str]) -> Iterator[list[int]]:
    """Token ids of ``texts``, :data:`ENCODE_CHUNK` a parallel call.

    ``encode_batch_fast`` (no character offsets) where this ``tokenizers`` has it; each
    chunk's ``Encoding`` objects are dropped as soon as their ids are read, so only one
    chunk's worth of them (not a whole input batch's) is ever alive.
    """
    tokenizer = tokens.deepseek_tokenizer()
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    for start in range(0, len(texts), ENCODE_CHUNK):
        encodings = encode(list(texts[start : start + ENCODE_CHUNK]), add_special_tokens=False)
        for encoding in encodings:
            yield encoding.ids
        del encodings


def tokenize_bodies(bodies: Sequence[Mapping[str, Any]]) -> _Counted:
    """Prompt tokens of ``bodies`` and, where counted exactly, their block fingerprints.

    Returns ``(counts, prefixes, counting)``: ``prefixes[i]`` is
    :func:`block_fingerprints` of body ``i``'s ids (None when it was not counted with the
    DeepSeek tokenizer); ``counting`` says how the bodies were counted. Counts always agree
    with :func:`pipeline.rows.tokens.count_prompt_tokens`.
    """
    counts = [0] * len(bodies)
    prefixes: Prefixes = [None] * len(bodies)
    laid: list[int] = []
    texts: list[str] = []
    other: list[int] = []
    for index, body in enumerate(bodies):
        text = _layout(body)
        if text is None:
            other.append(index)
        else:
            laid.append(index)
            texts.append(text)
    if texts:
        for index, found in zip(laid, _encode(texts), strict=True):
            counts[index] = len(found)
            prefixes[index] = block_fingerprints(found)
    methods = {tokens.DEEPSEEK_COUNT} if laid else set()
    approximate = False
    if other:
        chosen = [bodies[i] for i in other]
        for index, count in zip(other, tokens.count_prompt_tokens(chosen), strict=True):
            counts[index] = count
        for body in chosen:
            method = tokens.count_method(str(body.get("model", "")))
            methods.add(method)
            approximate = approximate or (method.kind == "tiktoken" and tokens.has_tool_text(body))
    if laid:
        check = laid[:CHECK_ROWS]
        expected = tokens.count_prompt_tokens([bodies[i] for i in check])
        if [counts[i] for i in check] != expected:
            # The layout here and the counting function disagree: trust the function.
            counts = tokens.count_prompt_tokens(bodies)
    return counts, prefixes, Counting(frozenset(methods), approximate)


def plan_with_bodies(
    planner: Planner | BatchPlanner, batch: pa.RecordBatch, start: int, *, keyed: bool = True
) -> tuple[list[PlannedRow], list[dict[str, Any]]]:
    """``planner.plan(batch, start)``, and the body of each row that has one, as a dict
    (decoding the JSON just encoded would cost more than the encoding itself); not
    ``keyed``: without request keys or encoded bodies."""
    rows: list[PlannedRow] = []
    bodies: list[dict[str, Any]] = []
    for planned, body in planner.plan_bodies(batch, start, keyed=keyed):
        rows.append(planned)
        if body is not None:
            bodies.append(body)
    return rows, bodies


@dataclass(slots=True)
class _Prepared:
    batch: pa.RecordBatch
    start: int
    planned: list[PlannedRow]
    matched: list[RowResult | None]
    bodies: list[dict[str, Any]]


class _PerRowWriter:
    """The per-row Parquet, streamed batch by batch, renamed into place at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(f".{path.name}.partial")
        self._writer: pq.ParquetWriter | None = None
        self._id_type: pa.DataType | None = None

    def write(self, ids: pa.Array, columns: dict[str, list[Any]]) -> None:
        if self._id_type is None:
            self._id_type = ids.type if not pa.types.is_null(ids.type) else pa.string()
        if ids.type != self._id_type:
            try:
                ids = ids.cast(self._id_type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise InputError(
                    self.path, f"the ids change type between input batches ({exc})."
                ) from None
        schema = pa.schema([("id", self._id_type), *PER_ROW_SCHEMA_TAIL])
        arrays = [ids] + [pa.array(columns[name], type=kind) for name, kind in PER_ROW_SCHEMA_TAIL]
        table = pa.Table.from_arrays(arrays, schema=schema)
        try:
            if self._writer is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._writer = pq.ParquetWriter(self._tmp, schema)
            self._writer.write_table(table)
        except OSError as exc:
            raise StateError(f"cannot write {self.path} ({exc.strerror or exc}).") from None

    def close(self, *, keep: bool) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        try:
            if keep and self._tmp.exists():
                os.replace(self._tmp, self.path)
            else:
                self._tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise StateError(f"cannot write {self.path} ({exc.strerror or exc}).") from None


def _usd(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


@functools.cache
def _trim_native_heap() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)``: give the native heap's free pages back to the system.

    The tokenizer's threads allocate and free a chunk's encodings in glibc's per-thread
    arenas; trimming after each batch keeps those freed pages out of the RSS (measured over
    450,000 rows: 95 MiB less RSS at the end, 27 MiB lower peak). A no-op where the C
    library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return lambda: None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return functools.partial(trim, 0)


def compute_estimate(
    job: JobSpec,
    *,
    per_row: Path | None = None,
    sampled: int = 0,
    history_limit: int = HISTORY_LIMIT,
    batch_rows: int = TOKENIZE_BATCH,
    cache_blocks: int = CACHE_BLOCKS,
    journal: Journal | None = None,
) -> Estimate:
    """Estimate ``job``: one streaming pass over its input; nothing is sent.

    ``per_row`` writes one row per input row (see :data:`PER_ROW_SCHEMA_TAIL`); ``sampled``
    says how many rows ``--sample`` just sent (they are in the state folder's history).
    ``journal`` holds the results of earlier runs, if not the job's state folder's (a cluster
    run's shards: :class:`pipeline.cluster.status.ShardedJournal`). Raises
    :class:`~pipeline.errors.PipelineError` for a bad job or input.
    """
    context = JobContext(job, batch_rows=batch_rows)
    scan = context.scan()
    price = context.price
    max_tokens = job.request.max_tokens
    facts = model_facts(job.request.model)
    journal = journal or context.journal
    stats = summarize(read_history(journal, history_limit), max_tokens)
    source, expected_out = output_model(stats, max_tokens, facts, sampled)
    model = RowModel(
        max_tokens=max_tokens,
        facts=facts,
        expected_out=expected_out,
        price=None if price is None else replace(price, off_peak=None),
    )

    def prepared() -> Iterator[_Prepared]:
        start = 0
        known = journal.results_for("result")
        keyed = journal.has_results()  # no result to match: no key needed
        for batch in context.input_batches(scan):
            planned, bodies = plan_with_bodies(context.planner, batch, start, keyed=keyed)
            matched = [known.get(row.row, row.key) if keyed else None for row in planned]
            yield _Prepared(batch, start, planned, matched, bodies)
            start += batch.num_rows

    accountant = _Accountant(model, CompactPrefixCache(cache_blocks), job.input.id_column)
    writer = None if per_row is None else _PerRowWriter(per_row)
    ok = False
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
            # Tokenizing batch i (Rust, GIL released) overlaps planning batch i + 1.
            waiting: tuple[_Prepared, Future[_Counted]] | None = None
            trim = _trim_native_heap()
            for item in prepared():
                future = pool.submit(tokenize_bodies, item.bodies)
                if waiting is not None:
                    accountant.add(waiting[0], waiting[1].result(), writer)
                    trim()
                waiting = (item, future)
            if waiting is not None:
                accountant.add(waiting[0], waiting[1].result(), writer)
        ok = True
    finally:
        if writer is not None:
            writer.close(keep=ok)
    quote = quote_price(job.request.base_url, job.request.model, job.pricing)
    estimate = assemble(
        job,
        accountant.totals,
        stats,
        source=source,
        sampled=sampled,
        model=model,
        price=price,
        quote=quote,
    )
    return replace(estimate, warnings=tuple(warnings_for(estimate)))


class _Accountant:
    """Accounts tokenized batches in input order: prefix cache, totals, per-row columns."""

    def __init__(self, model: RowModel, cache: CompactPrefixCache, id_column: str | None) -> None:
        self.model = model
        self.cache = cache
        self.id_column = id_column
        self.totals = Totals()
        price = model.price
        self._prices = (
            None
            if price is None
            else (float(price.input), float(price.cached_input), float(price.output))
        )

    def add(self, item: _Prepared, counted: _Counted, writer: _PerRowWriter | None) -> None:
        counts, prefixes, counting = counted
        totals = self.totals
        totals.methods |= counting.methods
        totals.tools_approximate = totals.tools_approximate or counting.tools_approximate
        n = len(item.planned)
        totals.rows += n
        columns: dict[str, list[Any]] = {
            name: [None] * n for name, _ in PER_ROW_SCHEMA_TAIL if name != "over_context"
        }
        columns["row"] = list(range(item.start, item.start + n))
        columns["over_context"] = [False] * n
        row_ids = None
        if self.id_column is not None:
            row_ids = item.batch.column(item.batch.schema.names.index(self.id_column))
        body_index = 0
        for offset, (planned, found) in enumerate(zip(item.planned, item.matched, strict=True)):
            if planned.body is None:
                totals.unrenderable += 1
                continue
            prompt = counts[body_index]
            blocks = prefixes[body_index]
            body_index += 1
            cached = self.cache.lookup_and_add_blocks(blocks) if blocks is not None else 0
            totals.input_tokens += prompt
            totals.longest_prompt = max(totals.longest_prompt, prompt)
            columns["prompt_tokens"][offset] = prompt
            columns["cached_prefix_tokens"][offset] = cached
            if self.model.over_context(prompt):
                totals.over_context += 1
                if len(totals.over_context_ids) < SHOWN_IDS:
                    shown = row_ids[offset].as_py() if row_ids is not None else planned.row
                    totals.over_context_ids.append(str(shown))
                columns["over_context"][offset] = True
            if found is not None:
                self._done(found, offset, columns)
                if found.usage.prompt_tokens:
                    totals.done_first_prompt += prompt
                    totals.done_billed_prompt += found.usage.prompt_tokens
            else:
                self._to_send(prompt, cached, offset, columns)
        if writer is not None:
            if row_ids is None:
                row_ids = pa.array(columns["row"], type=pa.int64())
            writer.write(row_ids, columns)

    def _done(self, found: RowResult, offset: int, columns: dict[str, list[Any]]) -> None:
        """A row done by an earlier run (or --sample): not sent again; it cost what it cost."""
        totals = self.totals
        if found.status == "ok":
            totals.done_ok += 1
        else:
            totals.done_failed += 1
        spent = (
            found.cost_usd if found.cost_usd is not None else cost(found.usage, self.model.price)
        )
        if spent is None or totals.spent is None:
            totals.spent = None
        else:
            totals.spent += spent
        real = found.usage.completion_tokens
        columns["expected_output_tokens"][offset] = float(real)
        columns["worst_output_tokens"][offset] = real
        columns["expected_cost_usd"][offset] = _usd(spent)
        columns["worst_cost_usd"][offset] = _usd(spent)

    def _to_send(
        self, prompt: int, cached: int, offset: int, columns: dict[str, list[Any]]
    ) -> None:
        totals = self.totals
        model = self.model
        totals.to_send += 1
        totals.input_to_send += prompt
        totals.cached_to_send += cached
        worst = model.worst_out(prompt)
        columns["worst_output_tokens"][offset] = worst
        if worst is None:
            totals.worst_known = False
        else:
            totals.worst_out_to_send += worst
        expected = model.expected_out
        if expected is not None and worst is not None:
            expected = min(expected, float(worst))
        columns["expected_output_tokens"][offset] = expected
        if expected is not None:
            totals.expected_out_to_send += expected
        reserved = model.max_tokens if model.max_tokens is not None else expected
        totals.tokens_per_request += prompt + round(reserved or 0)
        if self._prices is not None:
            # Per-row figures are floats (the file's columns); the totals are exact Decimals.
            p_in, p_cached, p_out = self._prices
            base = (prompt - cached) * p_in + cached * p_cached
            if expected is not None:
                columns["expected_cost_usd"][offset] = (base + expected * p_out) / 1e6
            if worst is not None:
                columns["worst_cost_usd"][offset] = (prompt * p_in + worst * p_out) / 1e6
