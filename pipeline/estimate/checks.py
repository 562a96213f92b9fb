"""The estimate's warnings: one line per thing to look at before money is spent.

Pure, like :mod:`pipeline.estimate.figures`, whose :class:`~pipeline.estimate.figures.Estimate`
they read; :func:`pipeline.estimate.scan.compute_estimate` attaches them.
"""

from __future__ import annotations

from pipeline.estimate.figures import SHOWN_IDS, Estimate

FEW_OBSERVATIONS = 20
"""Below this many observed answers the expected output length is flagged as uncertain."""


def _token_lines(e: Estimate) -> list[str]:
    """How the prompts were counted, and a prompt longer than the price's tier."""
    lines: list[str] = []
    if not e.exact_tokens:
        why = "; ".join(e.token_notes) or (
            f"{e.model} is neither a DeepSeek nor an OpenAI model with a tokenizer here"
        )
        lines.append(
            f"input tokens are an estimate (heuristic): {why}. Prompts are counted as one "
            "token per 4 UTF-8 bytes plus 4 per message."
        )
    elif e.token_notes:
        lines.extend(f"input tokens: {note}." for note in e.token_notes)
    quote = e.quote
    if quote is not None and quote.prompt_limit and e.longest_prompt > quote.prompt_limit:
        lines.append(
            f"the longest prompt has {e.longest_prompt:,} tokens, over the "
            f"{quote.prompt_limit:,} up to which {e.model}'s price holds: longer prompts cost "
            "more than estimated (the price is tiered by prompt length)."
        )
    return lines


def warnings_for(estimate: Estimate) -> list[str]:
    """One line per thing to look at before money is spent."""
    e = estimate
    lines = _token_lines(e)
    facts = e.facts
    if e.max_tokens is None:
        longest = f"{facts.max_output:,}" if facts is not None else "unknown"
        lines.append(
            f"THE JOB SETS NO max_tokens: the worst case assumes the model's longest answer "
            f"({longest} tokens) for every row. Set [request] max_tokens to bound the cost."
        )
    if e.output_source == "model_max_output":
        lines.append(
            "no earlier results to learn the output length from: the expected cost assumes the "
            "model's longest answer for every row. Run with --sample N for a realistic figure."
        )
    elif e.output_source == "max_tokens":
        lines.append(
            "no earlier results to learn the output length from: expected output is max_tokens "
            "per row (an upper bound). Run with --sample N for a realistic figure."
        )
    elif e.output_source == "unknown":
        lines.append(
            f"the output length is unknown: no earlier results, no max_tokens, and {e.model} "
            "is not in the model table. Set max_tokens or run with --sample N."
        )
    if e.over_context_rows:
        window = facts.context_window if facts is not None else 0
        shown = ", ".join(e.over_context_ids)
        more = f" (first {len(e.over_context_ids)})" if e.over_context_rows > SHOWN_IDS else ""
        lines.append(
            f"{e.over_context_rows:,} row(s) exceed the model's context window of {window:,} "
            f"tokens (prompt + max_tokens); the provider will refuse them. Ids{more}: {shown}"
        )
    s = e.stats
    if s is not None and s.count < FEW_OBSERVATIONS and e.rows_to_send > s.count:
        lines.append(
            f"the expected output comes from only {s.count} answer(s): it can be far off (the "
            "95% interval needs two, and means little under about "
            f"{FEW_OBSERVATIONS}). Sample more rows (--sample N or --sample P%)."
        )
    if s is not None and s.length_share > 0:
        lines.append(
            f"{s.length_share:.1%} of {s.count:,} observed answers stopped at the token limit "
            '(finish_reason "length"): they are likely truncated. Raise max_tokens.'
        )
    if s is not None and s.at_max_share:
        lines.append(
            f"{s.at_max_share:.1%} of {s.count:,} observed answers used at least max_tokens "
            f"({e.max_tokens:,}) output tokens: rows are likely truncated by max_tokens."
        )
    if e.price is None:
        lines.append(
            f"no price is known for {e.model} at {e.endpoint}: costs are unknown. Add a "
            "[pricing] table to the job or give --price input=USD,output=USD."
        )
    if e.rows_unrenderable:
        lines.append(
            f"{e.rows_unrenderable:,} row(s) cannot be rendered into a request; they will "
            "fail without being sent."
        )
    return lines
