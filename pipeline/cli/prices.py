"""``pipeline prices [MODEL]``: the prices this tool knows, and where each comes from.

Prices come, first match wins, from a job's ``[pricing]`` or ``--price``, the built-in table,
and the ``genai-prices`` package's bundled data (:mod:`pipeline.money.pricing`). With a MODEL
the command shows the price a job for that model pays at ``--base-url`` (by the model id
alone without one, as on the built-in server), and the lower sources it wins over; a name
that matches nothing gets a "did you mean" from the known model ids (exit code 1). Without a
MODEL it lists every price of the tables (of ``--base-url``'s provider, if given). ``--job``
reads the model, the endpoint and the ``[pricing]`` of a job file or batch file.
"""

from __future__ import annotations

import difflib
import json
import sys
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import click

from pipeline.cli.common import PRICE_HELP, load_to_read, price_option, report_errors
from pipeline.errors import EXIT_FAILED_TO_RUN, UsageError
from pipeline.money import catalog
from pipeline.money.pricing import (
    BUILTIN_PRICES,
    Price,
    PriceOverride,
    Quote,
    builtin_quotes,
    catalog_provider,
    catalog_quote,
    catalog_source,
    provider_of,
    quote_price,
    table_quotes,
)

ANYWHERE = "http://127.0.0.1/v1"
"""What a MODEL without --base-url is priced at: on loopback the model id alone decides."""


def _usd(value: Decimal) -> str:
    return f"${value.normalize():f}"


def _window(price: Price) -> str:
    return "-" if price.off_peak is None else price.off_peak.describe()


def _data_line(today: datetime) -> str:
    newest = catalog.data_date(today.date())
    since = f"; its newest dated price change: {newest:%Y-%m-%d}" if newest else ""
    return (
        f"{catalog_source()}: the package's bundled data{since}; never updated online. "
        "A job's [pricing] or --price wins over the built-in table, which wins over "
        "genai-prices."
    )


def _date_text(quote: Quote, today: datetime, *, long: bool = False) -> str:
    """``checked 2026-11-29``, ``since 2026-09-10``, or for an undated genai-prices entry
    ``undated`` (``long``: with the data's newest change)."""
    if quote.as_of is not None:
        return quote.date_text
    if not quote.source.endswith(catalog_source()):
        return "-"
    newest = catalog.data_date(today.date())
    if not long or newest is None:
        return "undated"
    return f"undated in {catalog_source()}, whose newest price change is of {newest:%Y-%m-%d}"


def _quote_lines(quote: Quote, today: datetime) -> list[tuple[str, str]]:
    price = quote.price
    lines = [
        ("input", f"{_usd(price.input)} per million tokens"),
        ("cached input", f"{_usd(price.cached_input)} per million tokens"),
        ("output", f"{_usd(price.output)} per million tokens (reasoning included)"),
    ]
    if price.off_peak is not None:
        lines.append(("off-peak", price.off_peak.describe()))
    matched = "" if quote.model is None else f" ({quote.provider or '?'}: {quote.model})"
    lines.append(("source", quote.source + matched))
    lines.append(("date", _date_text(quote, today, long=True)))
    lines += [("note", note) for note in quote.notes]
    return lines


def _suggestions(model: str, base_url: str | None) -> list[str]:
    provider = None if base_url is None else catalog_provider(base_url)
    known = [name for (_, name) in BUILTIN_PRICES]
    ours = difflib.get_close_matches(model, known, n=3, cutoff=0.6)
    return list(dict.fromkeys([*ours, *catalog.near_misses(model, provider)]))[:3]


def show_model(
    model: str,
    base_url: str | None,
    override: PriceOverride | None,
    *,
    as_json: bool,
    today: datetime,
) -> bool:
    """Print ``model``'s price and what it wins over; False when no price is known."""
    url = base_url or ANYWHERE
    winner = quote_price(url, model, override, when=today)
    below = table_quotes(url, model, when=today)
    shadowed = below if override is not None and winner is not None else below[1:]
    where = base_url or "any endpoint (by the model id alone)"
    hints = [] if winner is not None else _suggestions(model, base_url)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "model": model,
                    "base_url": base_url,
                    "price": None if winner is None else _json_quote(winner, today),
                    "wins_over": [_json_quote(q, today) for q in shadowed],
                    "did_you_mean": hints,
                    "genai_prices": _json_catalog(today),
                },
                indent=2,
            )
        )
        return winner is not None
    if winner is None:
        hint = f" Did you mean {' or '.join(hints)}?" if hints else ""
        click.echo(
            f"no price is known for {model!r} at {where}.{hint} Give one with --price "
            "input=USD,output=USD or a job's [pricing] table.",
            err=True,
        )
        return False
    click.echo(f"{model} at {where}")
    for label, value in _quote_lines(winner, today):
        click.echo(f"  {label:<13}{value}")
    for quote in shadowed:
        click.echo(
            f"  overrides    {quote.source}: input {_usd(quote.price.input)}, cached input "
            f"{_usd(quote.price.cached_input)}, output {_usd(quote.price.output)}, off-peak "
            f"{_window(quote.price)} ({_date_text(quote, today)})"
        )
    click.echo(_data_line(today))
    return True


def _json_quote(quote: Quote, today: datetime) -> dict[str, Any]:
    data = quote.to_dict()
    data["date_text"] = _date_text(quote, today)
    return data


def _json_catalog(today: datetime) -> dict[str, Any]:
    newest = catalog.data_date(today.date())
    return {
        "version": catalog.version(),
        "newest_price_change": None if newest is None else f"{newest:%Y-%m-%d}",
        "updated_online": False,
    }


def _rows(base_url: str | None, today: datetime) -> list[dict[str, Any]]:
    """Every price of the tables (of ``base_url``'s provider), built-in first."""
    ours = None if base_url is None else provider_of(base_url)
    local = ours == "local"
    everywhere = base_url is None or local
    quotes = [q for q in builtin_quotes() if everywhere or q.provider == ours]
    theirs = None if everywhere or base_url is None else catalog_provider(base_url)
    if everywhere or theirs is not None:
        for entry in catalog.entries(theirs, today):
            if not everywhere and (ours, entry.model) in BUILTIN_PRICES:
                continue  # the built-in table wins at this endpoint
            quotes.append(catalog_quote(entry))
    return [_json_quote(quote, today) for quote in quotes]


def list_prices(base_url: str | None, *, as_json: bool, today: datetime) -> bool:
    """Print every known price (of ``base_url``'s provider); False when there is none."""
    rows = _rows(base_url, today)
    if as_json:
        data = {"base_url": base_url, "prices": rows, "genai_prices": _json_catalog(today)}
        click.echo(json.dumps(data, indent=2))
        return bool(rows)
    if not rows:
        click.echo(
            f"no price table knows {base_url}: give prices with --price input=USD,output=USD "
            "or a job's [pricing] table.",
            err=True,
        )
        return False
    header = ("provider", "model", "input", "cached", "output", "source", "date")
    table = [header]
    for row in rows:
        marks = " *" if row["notes"] or row["off_peak"] else ""
        table.append(
            (
                row["provider"] or "-",
                row["model"] + marks,
                f"${row['input']}",
                f"${row['cached_input']}",
                f"${row['output']}",
                row["source"],
                row["date_text"],
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    click.echo(
        "USD per million tokens. * has an off-peak window or a note: "
        "`pipeline prices MODEL --base-url URL` shows it."
    )
    click.echo(_data_line(today))
    return True


@click.command(name="prices")
@click.argument("model", required=False)
@click.option("--base-url", help="The endpoint (its host picks the provider).")
@click.option(
    "--job",
    "job_file",
    type=click.Path(dir_okay=False, path_type=str),
    help="A job file or batch file: its model, endpoint and [pricing].",
)
@click.option("--price", "price_text", metavar="input=USD,output=USD", help=PRICE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@report_errors
def prices(
    model: str | None,
    *,
    base_url: str | None,
    job_file: str | None,
    price_text: str | None,
    as_json: bool,
) -> None:
    """Show the price of MODEL (or list every known price) and where it comes from."""
    override = price_option(price_text)
    if job_file is not None:
        job = load_to_read(job_file)
        model = model or job.request.model
        base_url = base_url or job.request.base_url
        override = job.pricing if override is None else override.over(job.pricing)
    today = datetime.now(UTC)
    if model is None:
        if override is not None:
            raise UsageError("--price needs a MODEL (or --job) to price.")
        if not list_prices(base_url, as_json=as_json, today=today):
            sys.exit(EXIT_FAILED_TO_RUN)
        return
    if not show_model(model, base_url, override, as_json=as_json, today=today):
        sys.exit(EXIT_FAILED_TO_RUN)


if __name__ == "__main__":
    prices()
