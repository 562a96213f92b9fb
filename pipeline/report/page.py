"""Pure: the report as one self-contained HTML page (inline CSS and SVG; no script, no
font, no image and no link to fetch, so it opens the same offline)."""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal
from html import escape

from pipeline.report.data import ReportData, RunLine
from pipeline.report.figures import Histogram, TimeFigures
from pipeline.report.svg import (
    BLUE,
    GREEN,
    GREY,
    ORANGE,
    PURPLE,
    RED,
    Bar,
    Column,
    Marker,
    Series,
    bar_chart,
    column_chart,
    empty_chart,
    histogram_chart,
    line_chart,
    number,
)

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2937;
margin:0;background:#f3f4f6}
main{max-width:760px;margin:0 auto;padding:16px 20px 40px;background:#fff}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;margin:28px 0 6px;
border-bottom:1px solid #e5e7eb;padding-bottom:4px}h3{font-size:14px;margin:14px 0 4px}
.meta{color:#6b7280;font-size:12px;word-break:break-all}
.tiles{display:flex;flex-wrap:wrap;gap:8px;margin:12px 0}
.tile{border:1px solid #e5e7eb;border-radius:6px;padding:6px 10px;min-width:96px}
.tile b{display:block;font-size:17px}.tile span{color:#6b7280;font-size:12px}
.note{color:#6b7280;font-size:12px;margin:2px 0 8px}
svg.chart{display:block;max-width:100%;height:auto}
table{border-collapse:collapse;font-size:12px;width:100%}
th,td{text-align:right;padding:3px 6px;border-bottom:1px solid #f0f0f0}
th:nth-child(-n+3),td:nth-child(-n+3){text-align:left}
td.how-completed{color:#15803d}td.how-failed,td.how-did-not-end{color:#b91c1c}
"""


def usd(value: Decimal | None) -> str:
    """Dollars for display; None is an unknown price, never $0."""
    if value is None:
        return "unknown"
    if value and abs(value) < Decimal("0.01"):
        return f"${value:.6f}"
    return f"${value:,.4f}"


def when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def _tiles(data: ReportData) -> str:
    tiles = [
        (f"{data.rows_ok:,}", "rows ok"),
        (f"{data.rows_failed:,}", "rows failed"),
        (usd(data.spent_usd), "spent, all runs"),
        (f"{len(data.history):,}", "runs"),
    ]
    figures = data.time
    if figures is not None:
        outcomes = dict(figures.outcomes)
        tiles += [
            (f"{figures.attempts:,}", f"requests, run {data.time_run}"),
            (f"{outcomes.get('429 rate limited', 0):,}", "429s"),
            (_ms(figures.latency[0]), "latency p50"),
            (_ms(figures.latency[2]), "latency p99"),
        ]
    cells = "".join(
        f'<div class="tile"><b>{escape(v)}</b><span>{escape(k)}</span></div>' for v, k in tiles
    )
    return f'<div class="tiles">{cells}</div>'


def _over_time(data: ReportData) -> str:
    figures = data.time
    parts = [f"<h2>Run {data.time_run} over time</h2>" if figures else "<h2>Over time</h2>"]
    if data.time_note:
        parts.append(f'<p class="note">{escape(data.time_note)}</p>')
    if figures is None:
        return "".join(parts)
    parts.append(
        f'<p class="note">{figures.attempts:,} requests over {_span(figures)}, in bins of '
        f"{number(figures.bin_s)} s, by the time each was sent.</p>"
    )
    half = figures.bin_s / 2
    bins = figures.bins
    markers = [
        Marker(b.start_s + half, f"{b.rate_limited:,} answered 429 (sent at {_clock(b.start_s)})")
        for b in bins
        if b.rate_limited
    ]
    x_max = figures.duration_s
    parts.append("<h3>Requests per second, and the 429s</h3>")
    parts.append(
        line_chart(
            "requests",
            "Requests sent and answered ok per second",
            series=[
                Series("sent/s", BLUE, [(b.start_s + half, b.sent_per_s) for b in bins]),
                Series("answered ok/s", GREEN, [(b.start_s + half, b.ok_per_s) for b in bins]),
            ],
            markers=markers,
            x_max=x_max,
            x_label="time since the run started",
            y_label="requests/s",
        )
    )
    parts.append("<h3>In-flight cap (the limiter's) and requests in flight</h3>")
    parts.append(
        line_chart(
            "cap",
            "The limiter's in-flight cap and the requests in flight",
            series=[
                Series(
                    "cap",
                    ORANGE,
                    [(b.start_s, b.cap) for b in bins] + [(x_max, bins[-1].cap)],
                    step=True,
                ),
                Series(
                    "in flight",
                    PURPLE,
                    [(b.start_s + half, b.in_flight) for b in bins],
                    dashed=True,
                ),
            ],
            markers=markers,
            x_max=x_max,
            x_label="time since the run started",
            y_label="requests",
        )
    )
    parts.append("<h3>Latency percentiles (answers with HTTP 200)</h3>")
    parts.append(
        line_chart(
            "latency",
            "Latency percentiles p50, p90, p99 over time",
            series=[
                Series("p50", GREEN, [(b.start_s + half, b.p50_ms) for b in bins]),
                Series("p90", ORANGE, [(b.start_s + half, b.p90_ms) for b in bins]),
                Series("p99", RED, [(b.start_s + half, b.p99_ms) for b in bins]),
            ],
            x_max=x_max,
            x_label="time since the run started",
            y_label="ms",
        )
    )
    return "".join(parts)


def _span(figures: TimeFigures) -> str:
    return _clock(figures.duration_s)


def _clock(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _sampled(hist: Histogram) -> str:
    if not hist.sampled:
        return ""
    return f" (a uniform sample of {sum(hist.counts):,} of {hist.seen:,} rows)"


def _cost_axis(hist: Histogram) -> tuple[str, Callable[[float], str]]:
    top = max(hist.edges, default=0.0)
    if top < 0.01:
        return "cost per row (µ$: millionths of a dollar)", lambda v: f"{v * 1e6:.3g}"
    return "cost per row ($)", lambda v: f"{v:.3g}"


def _rows(data: ReportData) -> str:
    tokens = data.output_tokens
    parts = [
        "<h2>Rows</h2>",
        f'<p class="note">Each row by its last recorded result, rows that were sent'
        f"{escape(_sampled(tokens))}.</p>",
        "<h3>Output tokens per row</h3>",
        histogram_chart(
            "output-tokens",
            "Output tokens per row",
            tokens,
            x_label="output tokens (reasoning included)",
            x_text=number,
        ),
        "<h3>Cost per row</h3>",
    ]
    if data.row_cost is None:
        parts.append(empty_chart("row-cost", "Cost per row", "no price is known for this model"))
    else:
        label, text = _cost_axis(data.row_cost)
        parts.append(
            histogram_chart("row-cost", "Cost per row", data.row_cost, x_label=label, x_text=text)
        )
    return "".join(parts)


def _cost(data: ReportData) -> str:
    kinds = data.cost_by_kind
    priced = all(kind.usd is not None for kind in kinds)
    colors = (BLUE, GREEN, ORANGE, PURPLE)
    if priced:
        bars = [
            Bar(
                kind.name,
                float(kind.usd or 0),
                f"{usd(kind.usd)} ({kind.tokens:,} tokens)",
                color,
            )
            for kind, color in zip(kinds, colors, strict=False)
        ]
        what = f"Every billed answer of every run, {data.price_note}."
    else:
        bars = [
            Bar(kind.name, float(kind.tokens), f"{kind.tokens:,} tokens", color)
            for kind, color in zip(kinds, colors, strict=False)
        ]
        what = "No price is known for this model: tokens by kind instead of dollars."
    return (
        "<h2>Cost by kind</h2>"
        f'<p class="note">{escape(what)} Reasoning tokens are billed as output.</p>'
        + bar_chart("cost-by-kind", "Cost by kind of token", bars)
    )


def _failures(data: ReportData) -> str:
    parts = ["<h2>Failures</h2>", "<h3>Failed rows by reason</h3>"]
    if data.failures:
        bars = [Bar(reason, count, f"{count:,} rows", RED) for reason, count in data.failures]
        parts.append(bar_chart("failed-rows", "Failed rows by reason", bars))
    else:
        parts.append(empty_chart("failed-rows", "Failed rows by reason", "no row failed"))
    figures = data.time
    if figures is not None:
        parts.append(f"<h3>Attempts of run {data.time_run} that did not succeed, by outcome</h3>")
        failed = [(kind, count) for kind, count in figures.outcomes if kind != "ok"]
        if failed:
            bars = [Bar(kind, count, f"{count:,} attempts", ORANGE) for kind, count in failed]
            parts.append(bar_chart("failed-attempts", "Failed attempts by outcome", bars))
        else:
            parts.append(
                empty_chart(
                    "failed-attempts", "Failed attempts by outcome", "every attempt succeeded"
                )
            )
        parts.append(
            '<p class="note">A failed attempt is retried when it can be (429, 5xx, timeouts, '
            "connection errors); a row fails only when its last attempt does.</p>"
        )
    return "".join(parts)


def _history_table(lines: tuple[RunLine, ...]) -> str:
    head = (
        "<tr><th>run</th><th>started</th><th>how it ended</th><th>took</th><th>rows ok</th>"
        "<th>failed</th><th>requests</th><th>429s</th><th>cost</th></tr>"
    )
    rows = []
    for line in lines:
        how = escape(line.how + (" (fresh start)" if line.fresh else ""))
        took = "-" if line.ended_at is None else _clock(line.ended_at - line.started_at)
        rows.append(
            f"<tr><td>#{line.run}</td><td>{escape(when(line.started_at))}</td>"
            f'<td class="how-{escape(line.how.replace(" ", "-"))}">{how}</td>'
            f"<td>{took}</td>"
            f"<td>{line.rows_ok:,}</td><td>{line.rows_failed:,}</td>"
            f"<td>{'-' if line.requests is None else f'{line.requests:,}'}</td>"
            f"<td>{'-' if line.rate_limited is None else f'{line.rate_limited:,}'}</td>"
            f"<td>{escape(usd(line.cost_usd))}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _history(data: ReportData) -> str:
    columns = [
        Column(
            f"#{line.run}",
            [(line.rows_ok, GREEN, "rows ok"), (line.rows_failed, RED, "rows failed")],
            f"run {line.run}, {line.how}",
        )
        for line in data.history
    ]
    return (
        "<h2>Runs</h2>"
        '<p class="note">Rows each run recorded (a run that did not end: from the journal), '
        "and how it ended.</p>"
        + column_chart(
            "runs",
            "Rows recorded by each run",
            columns,
            y_label="rows",
            legend=("rows ok", "rows failed"),
        )
        + _history_table(data.history)
    )


def render(data: ReportData) -> str:
    """The whole page."""
    title = f"{data.job}: run report"
    meta = (
        f"model {data.model} · {data.endpoint} · state folder {data.state_dir} · made "
        f"{when(data.made_at)}"
    )
    body = "".join(
        [
            f"<h1>{escape(title)}</h1>",
            f'<p class="meta">{escape(meta)}</p>',
            _tiles(data),
            _over_time(data),
            _rows(data),
            _cost(data),
            _failures(data),
            _history(data),
            f'<p class="note" style="margin-top:24px;color:{GREY}">Made by pipeline report '
            "from the job's state folder. Self-contained: nothing is fetched to show it.</p>",
        ]
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )
