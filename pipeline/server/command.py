"""The built-in server's command line: ``pipeline serve`` and ``python -m pipeline.server``.

One click command, :data:`serve_command`: ``--host`` and ``--port`` (0 = a free port), and one
``--field-name`` option per field of :class:`ServerOptions`. ``pipeline`` registers it (lazily)
as ``serve``; ``python -m pipeline.server`` runs it. Once the server accepts connections it
prints one line, :func:`ready_line` (``listening on http://HOST:PORT/v1 (profile NAME)``), which
:class:`pipeline.server.process.LocalServer` reads to learn the port, and it serves until SIGINT
or SIGTERM. Invalid option values are usage errors (exit code 2).

Options
-------
Every field of :class:`ServerOptions` is the command-line flag ``--field-name``; its help text
is the field's ``metadata["help"]`` (and ``metadata["choices"]`` for ``profile``). A tuple
field (``served_models``) is one comma-separated value: ``--served-models a,b``; an empty
value adds nothing. The known models (``deepseek/deepseek-v4-flash``, ``deepseek-v4-flash``,
``gpt-4o-mini``) are always served; a request for any other model gets OpenAI's 404
``model_not_found``.

=========================  ============  =======================================================
option                     default       meaning
=========================  ============  =======================================================
``profile``                ``deepseek``  provider to imitate: ``deepseek`` or ``openai``
``latency_ms``             200           time to answer a request
``latency_jitter_ms``      0             up to this much more, drawn uniformly per request
``max_concurrency``        0             hidden cap on requests in flight (0 = none)
``rpm``                    0             openai profile: requests per minute (0 = none)
``tpm``                    0             openai profile: tokens per minute (0 = none)
``rate_window_s``          60            seconds rpm/tpm are enforced over (1 = per second)
``api_key``                (empty)       required bearer key; also ``$PIPELINE_SERVER_API_KEY``
``seed``                   0             seed of the replies and of the fault draws
``reply_min_fraction``     0.3           shortest reply drawn, as a fraction of ``max_tokens``
``truncate_rate``          0             text replies that run past ``max_tokens`` (cut)
``reasoning_min_tokens``   32            fewest reasoning tokens drawn in thinking mode
``reasoning_max_tokens``   256           most reasoning tokens drawn (doubled for ``max``)
``keepalive_after_ms``     100           deepseek: stream keep-alive lines when slower
``keepalive_interval_ms``  50            deepseek: time between keep-alive lines
``fault_500``              0             probability of a 500 JSON error
``fault_503``              0             probability of a 503 HTML page
``fault_502_html``         0             probability of a proxy's 502 HTML page
``fault_drop``             0             probability of closing the connection unanswered
``fault_malformed``        0             probability of a 200 with truncated JSON
``fault_timeout``          0             probability of hanging for ``timeout_hang_s``
``timeout_hang_s``         30            how long a timeout fault hangs
``fault_400``              0             fraction of distinct bodies that always get 400
``reject_substring``       (empty)       400 for every request whose messages contain it
``prefix_cache_entries``   100000        prompt-prefix fingerprints the cache remembers
``served_models``          (empty)       models served besides the known ones (comma-separated)
``invalid_json_rate``      0.05          fraction of schema answers that break the schema
=========================  ============  =======================================================

Pass ``api_key`` through the environment variable rather than the flag: command lines are
visible to every user of the machine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from pipeline.server.options import API_KEY_ENV, ServerOptions


def ready_line(host: str, port: int, profile: str) -> str:
    """What the server prints once it listens on ``host:port`` (an IPv6 host in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"listening on http://{shown}:{port}/v1 (profile {profile})"


@click.command(name="serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, help="Port (0 picks a free one).")
def serve_command(host: str, port: int, **fields: Any) -> None:
    """Run the built-in OpenAI-compatible server (what tests and --local use)."""
    from pipeline.server.serve import serve  # here: listing the command needs no uvicorn

    try:
        options = ServerOptions(**fields)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc

    def ready(bound: int) -> None:
        click.echo(ready_line(host, bound, options.profile))  # echo flushes: a pipe reads it

    serve(options, host=host, port=port, on_ready=ready)


def _comma_separated(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    """A tuple option's one comma-separated word (``a,b``) as a tuple; blank parts dropped."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _option_flags() -> list[click.Option]:
    """One ``--field-name`` option per field of :class:`ServerOptions`, in field order."""
    flags: list[click.Option] = []
    for field in dataclasses.fields(ServerOptions):
        default: Any = field.default
        flag = "--" + field.name.replace("_", "-")
        if isinstance(default, bool):
            flag = f"{flag}/--no-{field.name.replace('_', '-')}"
        choices = field.metadata.get("choices")
        kind: Any = click.Choice(list(choices)) if choices else type(default)
        listed = isinstance(default, tuple)  # one comma-separated word on the command line
        if listed:
            default = ",".join(default)
        option = click.Option(
            [flag, field.name],
            default=default,
            # the key may come from the environment; an empty list is said in the help
            show_default=field.name != "api_key" and not listed,
            type=str if listed else kind,
            metavar="NAME,..." if listed else None,
            callback=_comma_separated if listed else None,
            help=field.metadata.get("help"),
            envvar=API_KEY_ENV if field.name == "api_key" else None,
        )
        flags.append(option)
    return flags


serve_command.params.extend(_option_flags())
