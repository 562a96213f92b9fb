"""The estimate's figures: pure values and arithmetic, no file, no tokenizer, no journal.

:mod:`pipeline.estimate.scan` reads the input and the state folder and sums what it sees into
:class:`Totals`; this module turns those sums and the observed answers into the
:class:`Estimate`: output tokens, costs, the interval, the duration and the warnings.

**Output tokens**, in order of preference:

1. results already in the job's state folder (earlier runs, or ``--sample``): the most
   recent answered results' ``completion_tokens`` (reasoning included), summarized by
   :func:`summarize`;
2. ``max_tokens`` per row (a worst case, not an expectation);
3. without ``max_tokens``: the model's longest output (:mod:`pipeline.job.models`), said loudly.

Rows that already have a result (ok or failed) are not sent again by a run; they count with
what they really cost. Every other row is expected to produce the observed mean, capped at
its own worst case.

**The 95% interval** of the expected cost (only when output comes from observations): with
``k`` observations of mean ``m`` and standard deviation ``s``, the output tokens of ``n`` rows
to send are ``n*m +- 1.96 * s * sqrt(n**2/k + n)``. The ``n**2/k`` term is the uncertainty of
the mean (the central limit theorem on the mean of ``k`` draws: ``n*m +- 1.96*n*s/sqrt(k)``);
the ``n`` term is the spread of the ``n`` rows' own sum around ``n`` times the true mean,
which matters only when ``n`` is not much larger than ``k``. Input costs are exact, so only the
output part of the cost is uncertain. The bounds are clipped to ``[0, worst case]``.

**Duration** is the requests to send divided by the binding rate among: ``max_in_flight /
latency`` (the mean observed ``latency_ms``, else :data:`DEFAULT_LATENCY_S`),
``requests_per_minute / 60``, and ``tokens_per_minute / 60`` over the tokens a request
reserves (its prompt plus ``max_tokens``, or plus the expected output without it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pipeline.job.models import ModelFacts
from pipeline.money.pricing import Price, Quote, Usage, cost_parts, off_peak_price

if TYPE_CHECKING:
    from pipeline.job.spec import JobSpec
    from pipeline.rows.tokens import CountMethod

DEFAULT_LATENCY_S = 2.0
"""Latency assumed for the duration when no result has been observed yet."""
Z95 = 1.96
SHOWN_IDS = 20
"""Ids of over-context rows kept to show."""


# ---------------------------------------------------------------------------------------
# Pure: statistics of observed outputs, the interval, the duration.


@dataclass(frozen=True, slots=True)
class Observation:
    """One answered result of an earlier run (or of ``--sample``)."""

    completion_tokens: int
    reasoning_tokens: int
    finish_reason: str | None
    latency_ms: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputStats:
    """What observed results say about the answers' length."""

    count: int
    mean: float
    """Mean completion tokens per row (reasoning included)."""
    sd: float | None
    """Sample standard deviation; None with fewer than two observations."""
    mean_reasoning: float
    length_share: float
    """Share of answers that stopped with ``finish_reason = "length"``."""
    at_max_share: float | None
    """Share of answers with at least ``max_tokens`` output tokens (None without it)."""
    mean_latency_s: float | None


def summarize(observations: Sequence[Observation], max_tokens: int | None) -> OutputStats | None:
    """Mean, spread and truncation shares of ``observations``; None when there are none."""
    k = len(observations)
    if k == 0:
        return None
    total = sum(o.completion_tokens for o in observations)
    mean = total / k
    sd = None
    if k > 1:
        # Integer sums keep the variance exact before the one division.
        squares = sum(o.completion_tokens * o.completion_tokens for o in observations)
        variance = (squares * k - total * total) / (k * (k - 1))
        sd = math.sqrt(max(variance, 0.0))
    latencies = [o.latency_ms for o in observations if o.latency_ms is not None]
    return OutputStats(
        count=k,
        mean=mean,
        sd=sd,
        mean_reasoning=sum(o.reasoning_tokens for o in observations) / k,
        length_share=sum(o.finish_reason == "length" for o in observations) / k,
        at_max_share=None
        if max_tokens is None
        else sum(o.completion_tokens >= max_tokens for o in observations) / k,
        mean_latency_s=sum(latencies) / len(latencies) / 1000 if latencies else None,
    )


def output_interval(n: int, mean: float, sd: float | None, k: int) -> tuple[float, float] | None:
    """95% interval of the output tokens of ``n`` rows (see the module docstring)."""
    if sd is None or k < 2:
        return None
    half = Z95 * sd * math.sqrt(n * n / k + n)
    return max(n * mean - half, 0.0), n * mean + half


@dataclass(frozen=True, slots=True, kw_only=True)
class Duration:
    seconds: float
    binding: str
    """``max_in_flight``, ``requests_per_minute``, ``tokens_per_minute`` (or ``none``)."""
    requests_per_s: float
    latency_s: float
    latency_observed: bool


def estimate_duration(
    requests: int,
    *,
    max_in_flight: int,
    latency_s: float,
    requests_per_minute: int | None,
    tokens_per_minute: int | None,
    tokens_per_request: float,
    latency_observed: bool = False,
) -> Duration:
    """How long ``requests`` take under the job's limits: the slowest rate binds."""
    rates = {"max_in_flight": max_in_flight / max(latency_s, 1e-9)}
    if requests_per_minute:
        rates["requests_per_minute"] = requests_per_minute / 60
    if tokens_per_minute and tokens_per_request > 0:
        rates["tokens_per_minute"] = tokens_per_minute / 60 / tokens_per_request
    binding = min(rates, key=rates.__getitem__)
    rate = rates[binding]
    return Duration(
        seconds=requests / rate if requests else 0.0,
        binding=binding if requests else "none",
        requests_per_s=rate,
        latency_s=latency_s,
        latency_observed=latency_observed,
    )


# ---------------------------------------------------------------------------------------
# The result.


@dataclass(frozen=True, slots=True, kw_only=True)
class CostFigures:
    """USD of the rows still to send at one flat price."""

    expected: Decimal
    """Expected output, prefix-cache hits at the cached-input price."""
    expected_without_cache: Decimal
    worst_case: Decimal | None
    """Prompt uncached plus the worst output of every row (None when that is unknown)."""
    interval_95: tuple[Decimal, Decimal] | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Estimate:
    job: str
    model: str
    endpoint: str
    exact_tokens: bool
    """Input tokens counted with the model's tokenizer (else the heuristic)."""
    token_count: str = "exact"
    """How: ``exact`` (DeepSeek's tokenizer), ``exact (tiktoken o200k_base)``, ``heuristic``."""
    token_notes: tuple[str, ...] = ()
    """Why the heuristic, or what is approximate, for people."""
    rows: int
    rows_to_send: int
    rows_done_ok: int
    rows_done_failed: int
    rows_unrenderable: int
    input_tokens: int
    """Prompt tokens of every row that can be rendered (what a full run sends once)."""
    input_tokens_to_send: int
    input_tokens_billed_expected: int = 0
    """``input_tokens_to_send`` times the billed-per-prompt ratio the history shows (prompts
    sent again: re-asks of invalid answers, retries of billed attempts)."""
    cached_prefix_tokens: int
    """Of the rows to send: prompt tokens a 64-token-block prefix cache would serve."""
    output_source: str
    """``sample``, ``history``, ``max_tokens``, ``model_max_output`` or ``unknown``."""
    sampled: int
    stats: OutputStats | None
    max_tokens: int | None
    facts: ModelFacts | None
    output_tokens_expected: int | None
    output_tokens_worst: int | None
    output_interval_95: tuple[int, int] | None
    price: Price | None
    quote: Quote | None = None
    """Where the price comes from (the job's [pricing], the built-in table, genai-prices)."""
    longest_prompt: int = 0
    spent_usd: Decimal | None
    """What the rows that already have a result cost (None when unknown)."""
    cost: CostFigures | None
    """At the peak (standard) price; None when the price or the output is unknown."""
    cost_off_peak: CostFigures | None
    duration: Duration
    over_context_rows: int
    over_context_ids: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())

    @property
    def total_expected_usd(self) -> Decimal | None:
        if self.cost is None or self.spent_usd is None:
            return None
        return self.spent_usd + self.cost.expected

    def _source(self) -> dict[str, Any]:
        quote = self.quote
        assert quote is not None
        return {
            "source": quote.source,
            "date": None if quote.as_of is None else f"{quote.as_of:%Y-%m-%d}",
            "date_kind": quote.date_kind,
            "provider": quote.provider,
            "model": quote.model,
            "notes": list(quote.notes),
        }

    def to_dict(self) -> dict[str, Any]:
        """The estimate for machines; Decimals as strings."""

        def text(value: Decimal | None) -> str | None:
            return None if value is None else str(value)

        def figures(c: CostFigures | None) -> dict[str, Any] | None:
            if c is None:
                return None
            return {
                "expected": text(c.expected),
                "expected_without_cache": text(c.expected_without_cache),
                "worst_case": text(c.worst_case),
                "interval_95": None
                if c.interval_95 is None
                else [str(c.interval_95[0]), str(c.interval_95[1])],
            }

        s = self.stats
        price = self.price
        window = None if price is None else price.off_peak
        return {
            "job": self.job,
            "model": self.model,
            "endpoint": self.endpoint,
            "token_count": self.token_count,
            "rows": {
                "total": self.rows,
                "to_send": self.rows_to_send,
                "done_ok": self.rows_done_ok,
                "done_failed": self.rows_done_failed,
                "unrenderable": self.rows_unrenderable,
            },
            "requests": self.rows_to_send,
            "input_tokens": {
                "total": self.input_tokens,
                "to_send": self.input_tokens_to_send,
                "billed_expected": self.input_tokens_billed_expected,
                "cached_prefix": self.cached_prefix_tokens,
                "count_notes": list(self.token_notes),
            },
            "output_tokens": {
                "source": self.output_source,
                "sampled": self.sampled,
                "observations": 0 if s is None else s.count,
                "mean_per_row": None if s is None else s.mean,
                "sd_per_row": None if s is None else s.sd,
                "mean_reasoning_per_row": None if s is None else s.mean_reasoning,
                "max_tokens": self.max_tokens,
                "expected": self.output_tokens_expected,
                "worst_case": self.output_tokens_worst,
                "interval_95": None
                if self.output_interval_95 is None
                else list(self.output_interval_95),
            },
            "cost_usd": {
                "price": None
                if price is None
                else {
                    "input": str(price.input),
                    "cached_input": str(price.cached_input),
                    "output": str(price.output),
                    "off_peak": None
                    if window is None
                    else {
                        "start": f"{window.start:%H:%M}",
                        "end": f"{window.end:%H:%M}",
                        "discount": str(window.discount),
                    },
                },
                "price_source": None if self.quote is None else self._source(),
                "spent": text(self.spent_usd),
                "to_send": figures(self.cost),
                "to_send_off_peak": figures(self.cost_off_peak),
                "total_expected": text(self.total_expected_usd),
            },
            "duration": {
                "seconds": round(self.duration.seconds, 3),
                "binding": self.duration.binding,
                "requests_per_s": round(self.duration.requests_per_s, 3),
                "latency_s": self.duration.latency_s,
                "latency_observed": self.duration.latency_observed,
            },
            "checks": {
                "context_window": None if self.facts is None else self.facts.context_window,
                "over_context": {
                    "count": self.over_context_rows,
                    "ids": list(self.over_context_ids),
                },
                "truncation": None
                if s is None
                else {
                    "observations": s.count,
                    "finish_reason_length_share": s.length_share,
                    "at_max_tokens_share": s.at_max_share,
                },
            },
            "warnings": list(self.warnings),
        }


# ---------------------------------------------------------------------------------------
# From the scan's totals to the estimate.


@dataclass(slots=True)
class Totals:
    """What the scan sums over the input, batch by batch (an accumulator, hence mutable)."""

    rows: int = 0
    to_send: int = 0
    done_ok: int = 0
    done_failed: int = 0
    unrenderable: int = 0
    input_tokens: int = 0
    input_to_send: int = 0
    cached_to_send: int = 0
    worst_out_to_send: int = 0
    worst_known: bool = True
    expected_out_to_send: float = 0.0
    spent: Decimal | None = Decimal(0)
    methods: set[CountMethod] = field(default_factory=set)
    """How the prompts were counted (:func:`pipeline.rows.tokens.count_method`)."""
    tools_approximate: bool = False
    longest_prompt: int = 0
    over_context: int = 0
    over_context_ids: list[str] = field(default_factory=list)
    tokens_per_request: int = 0
    """Prompt plus reserved output of the rows to send (for tokens_per_minute)."""
    done_first_prompt: int = 0
    """Prompt tokens of one attempt, over the rows earlier runs answered ..."""
    done_billed_prompt: int = 0
    """... and the prompt tokens they were billed: more when answers were asked again (an
    invalid structured answer) or a billed attempt was retried."""

    @property
    def exact(self) -> bool:
        return all(method.exact for method in self.methods)

    @property
    def input_factor(self) -> float:
        """Billed prompt tokens per prompt token, as observed (1 without history)."""
        if not self.done_first_prompt or not self.done_billed_prompt:
            return 1.0
        return max(1.0, self.done_billed_prompt / self.done_first_prompt)


@dataclass(frozen=True, slots=True, kw_only=True)
class RowModel:
    """What a row to send is expected to cost, from the job and the observations."""

    max_tokens: int | None
    facts: ModelFacts | None
    expected_out: float | None
    price: Price | None

    def worst_out(self, prompt: int) -> int | None:
        if self.max_tokens is not None:
            return self.max_tokens
        if self.facts is None:
            return None
        return max(min(self.facts.max_output, self.facts.context_window - prompt), 0)

    def over_context(self, prompt: int) -> bool:
        if self.facts is None:
            return False
        return prompt + (self.max_tokens or 0) > self.facts.context_window


def output_model(
    stats: OutputStats | None, max_tokens: int | None, facts: ModelFacts | None, sampled: int
) -> tuple[str, float | None]:
    """Where the expected output per row comes from, and its value."""
    if stats is not None:
        return ("sample" if sampled else "history"), stats.mean
    if max_tokens is not None:
        return "max_tokens", float(max_tokens)
    if facts is not None:
        return "model_max_output", float(facts.max_output)
    return "unknown", None


def _figures(
    totals: Totals,
    expected_out: int,
    interval: tuple[int, int] | None,
    price: Price,
    *,
    worst_attempts: int,
) -> CostFigures:
    """Costs of the rows to send. The expected input counts the re-sent prompts that the
    history shows (``input_factor``); the worst case lets every row use all its re-asks."""
    prompt, cached = totals.input_to_send, totals.cached_to_send
    expected_prompt = round(prompt * totals.input_factor)

    def at(output: int, cached_tokens: int, prompt_tokens: int = expected_prompt) -> Decimal:
        usage = Usage(
            prompt_tokens=prompt_tokens, cached_tokens=cached_tokens, completion_tokens=output
        )
        return cost_parts(usage, price).total

    worst_out = totals.worst_out_to_send * worst_attempts
    return CostFigures(
        expected=at(expected_out, cached),
        expected_without_cache=at(expected_out, 0),
        worst_case=at(worst_out, 0, prompt * worst_attempts) if totals.worst_known else None,
        interval_95=None
        if interval is None
        else (at(interval[0], cached), at(interval[1], cached)),
    )


def assemble(
    job: JobSpec,
    totals: Totals,
    stats: OutputStats | None,
    *,
    source: str,
    sampled: int,
    model: RowModel,
    price: Price | None,
    quote: Quote | None = None,
) -> Estimate:
    n = totals.to_send
    # An answer that fails the output schema is asked again, up to max_reasks times.
    attempts = 1 + job.output.max_reasks if job.output.schema is not None else 1
    worst_out = totals.worst_out_to_send * attempts if totals.worst_known else None
    expected_out = None if model.expected_out is None else round(totals.expected_out_to_send)
    interval = None
    if stats is not None:
        found = output_interval(n, stats.mean, stats.sd, stats.count)
        if found is not None:
            low, high = found
            if worst_out is not None:
                high = min(high, worst_out)
                low = min(low, high)
            interval = (math.floor(low), math.ceil(high))
    flat = model.price
    figures = off_peak = None
    if flat is not None and expected_out is not None:
        figures = _figures(totals, expected_out, interval, flat, worst_attempts=attempts)
        if price is not None and price.off_peak is not None:
            cheaper = off_peak_price(flat, price.off_peak)
            off_peak = _figures(totals, expected_out, interval, cheaper, worst_attempts=attempts)
    latency = DEFAULT_LATENCY_S
    observed = stats is not None and stats.mean_latency_s is not None
    if stats is not None and stats.mean_latency_s is not None:
        latency = max(stats.mean_latency_s, 0.001)
    limits = job.limits
    duration = estimate_duration(
        n,
        max_in_flight=limits.max_in_flight,
        latency_s=latency,
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        tokens_per_request=totals.tokens_per_request / n if n else 0.0,
        latency_observed=observed,
    )
    return Estimate(
        job=job.name,
        model=job.request.model,
        endpoint=job.request.base_url,
        exact_tokens=totals.exact,
        token_count=count_label(totals.methods),
        token_notes=tuple(count_notes(totals)),
        quote=quote,
        longest_prompt=totals.longest_prompt,
        rows=totals.rows,
        rows_to_send=n,
        rows_done_ok=totals.done_ok,
        rows_done_failed=totals.done_failed,
        rows_unrenderable=totals.unrenderable,
        input_tokens=totals.input_tokens,
        input_tokens_to_send=totals.input_to_send,
        input_tokens_billed_expected=round(totals.input_to_send * totals.input_factor),
        cached_prefix_tokens=totals.cached_to_send,
        output_source=source,
        sampled=sampled,
        stats=stats,
        max_tokens=model.max_tokens,
        facts=model.facts,
        output_tokens_expected=expected_out,
        output_tokens_worst=worst_out,
        output_interval_95=interval,
        price=price,
        spent_usd=totals.spent,
        cost=figures,
        cost_off_peak=off_peak,
        duration=duration,
        over_context_rows=totals.over_context,
        over_context_ids=tuple(totals.over_context_ids),
    )


def count_label(methods: set[CountMethod]) -> str:
    """One label for the ways prompts were counted: ``heuristic`` if any was, else
    ``exact`` (DeepSeek), ``exact (tiktoken o200k_base)``, or both named."""
    if any(not method.exact for method in methods):
        return "heuristic"
    labels = sorted({method.label for method in methods})
    if len(labels) <= 1:
        return labels[0] if labels else "exact"
    names = sorted(
        f"tiktoken {m.encoding}" if m.kind == "tiktoken" else "DeepSeek V4 tokenizer"
        for m in methods
    )
    return f"exact ({', '.join(names)})"


def count_notes(totals: Totals) -> list[str]:
    """What a person should know about how the prompts were counted."""
    notes = sorted({m.reason for m in totals.methods if m.reason is not None})
    if totals.tools_approximate:
        notes.append(
            "tool definitions and tool calls are counted as the tokens of their JSON; "
            "OpenAI lays tools out its own way, so those prompts are approximate"
        )
    return notes
