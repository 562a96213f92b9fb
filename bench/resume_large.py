"""Resume a 1,000,000-row job with 900,000 rows done: time to first send, and memory per done row.

What it measures (the acceptance criterion):

    Resuming a 1,000,000-row job with 900,000 done starts sending within 10 seconds, and memory
    does not grow with the number of done rows beyond a few bytes per row.

How:

1. A ``--rows`` Parquet input (``rid`` + a ``text`` of about ``--text-bytes`` bytes, row groups
   of ``--row-group-rows``) and one job file per scenario (same input, same request, same
   built-in server, different output and state folder) are written to a temporary folder.
2. The state of each scenario (``--done`` rows done, plus each of ``--compare-done``) is made
   with the project's own code, without sending anything: the rows are planned exactly as a run
   plans them (:class:`pipeline.engine.context.JobContext`: ``planner.plan(batch, start)`` over
   :func:`pipeline.io.sources.iter_batches`, prompts counted with
   :func:`pipeline.rows.plan.with_prompt_tokens`), and for each done row the journal gets what a
   real run writes: its intent (``sent/``, with the worst-case cost) and an ``ok``
   :class:`~pipeline.results.RowResult` (``results/``), all in run 1, which then ends as
   ``interrupted``. ``pipeline status --json`` must then show ``done`` ok and the rest pending
   (its wall time is printed).
3. Each scenario is resumed with ``python -m pipeline run job.toml`` (through a two-line launcher
   that prints the process's own VmHWM as it exits) against the built-in server
   (``--latency-ms``, ``--in-flight`` requests in flight). The script polls the server's
   ``/_stats`` (over one kept-alive connection) and ``/proc/<pid>/status`` every 20 ms and
   records: the time from process start to the server's first request; the time the run
   printed its header line (input scanned, suspects counted: everything before the producer
   starts); RSS and VmHWM at the first request (VmHWM: the peak of the scan, the suspects count
   and the skipping of done rows); the peak RSS of the whole run; and, for the ``--done``
   scenario, the median RSS over 10-20 % and over 80-90 % of the skipping phase (header to
   first request). That slope shows whether skipping done rows accumulates memory; the ends of
   the phase are left out because the first batches warm up buffers and the tokenizer is
   loaded only when the first row to send is planned.
   The ``--done`` scenario runs to completion (its output must have ``--rows`` rows, each id
   once, all ok, and the server must have received each pending row once). Every other
   scenario is stopped with SIGINT once it has sent as many requests as the ``--done`` scenario
   had to send, so both did the same sending work and only the number of done rows differs.
   ``--sends N`` stops every scenario after N requests instead (then the output of the
   ``--done`` scenario is partial and is not checked, and the script says so).

Reading the output: a table with one column per scenario and, in the last column, the
difference between the ``--done`` scenario and the one with the fewest done rows divided by the
difference in done rows (microseconds of time, bytes of memory), then the RSS during the skipping
phase. "Peak RSS until first request" compares a process that has skipped 900,000 rows with one
that has just started, so it mixes in warm-up and start-up peaks (the scan of the ids); the
whole-run peak (same sending work in both) and the slope while skipping are the figures that
say whether memory grows with done rows. Then PASS/FAIL per check: first request within 10 s;
whole-run peak growth and skipping slope at most ``--max-bytes-per-row`` (8) bytes per done row
("a few bytes"; the slope only when skipping lasts 10 s or more, else "n/a"); ``pipeline
status`` counts; the output. Last, a JSON line
(``{"bench": "resume_large", ...}``). Exit status 0 when every check holds, 1 otherwise.

    .venv/bin/python bench/resume_large.py                  # the acceptance sizes
    .venv/bin/python bench/resume_large.py --rows 100000 --done 90000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.engine.context import JobContext
from pipeline.io.sources import iter_batches
from pipeline.job.load import load_job
from pipeline.money.pricing import Usage, cost
from pipeline.results import RowResult
from pipeline.rows.plan import with_prompt_tokens
from pipeline.server.options import ServerOptions
from pipeline.server.process import LocalServer, StatsClient
from pipeline.state.journal import Intent
from pipeline.state.runs import INTERRUPTED
from pipeline.state.seals import Seal, batch_digest

POLL_S = 0.02
FIRST_SEND_LIMIT_S = 10.0
MIN_SKIP_PHASE_S = 10.0
FLUSH_ROWS = 65_536
RUN_TIMEOUT_S = 1800.0
MAX_TOKENS = 32
WORDS = (
    "river",
    "stone",
    "lantern",
    "orchard",
    "copper",
    "meadow",
    "harbor",
    "violet",
    "thunder",
    "saddle",
    "pepper",
    "marble",
    "canyon",
    "willow",
    "ember",
    "falcon",
    "ribbon",
    "quartz",
    "tundra",
    "velvet",
    "anchor",
    "blossom",
    "cobalt",
    "drizzle",
    "glacier",
    "hazel",
    "island",
    "juniper",
    "kettle",
    "lagoon",
    "mosaic",
    "nectar",
    "oyster",
    "pebble",
    "quiver",
    "rustic",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="input rows (1000000)")
    parser.add_argument("--done", type=int, default=900_000, help="rows already done (900000)")
    parser.add_argument(
        "--compare-done",
        default="0",
        help="comma-separated done counts to compare memory and start-up with (0)",
    )
    parser.add_argument("--in-flight", type=int, default=256, help="max_in_flight (256)")
    parser.add_argument("--latency-ms", type=float, default=5.0, help="server latency (5)")
    parser.add_argument("--text-bytes", type=int, default=200, help="text per row, bytes (200)")
    parser.add_argument(
        "--row-group-rows", type=int, default=65_536, help="Parquet row group size (65536)"
    )
    parser.add_argument(
        "--sends", type=int, help="stop every resume with SIGINT after this many requests"
    )
    parser.add_argument(
        "--max-bytes-per-row",
        type=float,
        default=8.0,
        help="most memory growth per done row that passes (8)",
    )
    parser.add_argument("--workdir", type=Path, help="use this folder instead of a temp one")
    parser.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    args = parser.parse_args(argv)
    args.compare = sorted({int(x) for x in args.compare_done.split(",") if x.strip()} - {args.done})
    if not 0 < args.done < args.rows or any(not 0 <= d < args.rows for d in args.compare):
        parser.error("need 0 < --done < --rows and 0 <= each --compare-done < --rows")
    if not args.compare:
        parser.error("--compare-done needs a count different from --done")
    return args


# -- input and jobs ---------------------------------------------------------------------------


def write_input(path: Path, rows: int, text_bytes: int, row_group_rows: int) -> None:
    span = len(WORDS)
    texts = []
    for i in range(rows):
        head = f"Item {i}:"
        words = [WORDS[(i * 7 + k) % span] for k in range(text_bytes // 6)]
        texts.append(f"{head} {' '.join(words)}"[:text_bytes])
    table = pa.table({"rid": [f"r{i:07d}" for i in range(rows)], "text": texts})
    pq.write_table(table, path, row_group_size=row_group_rows)


def write_job(folder: Path, done: int, input_path: Path, base_url: str, in_flight: int) -> Path:
    job = folder / f"job_{done}.toml"
    job.write_text(
        f"""name = "resume-large-{done}"

[input]
path = "{input_path}"
id_column = "rid"

[request]
base_url = "{base_url}"
model = "deepseek/deepseek-v4-flash"
prompt = "Summarize in one line: {{text}}"
max_tokens = {MAX_TOKENS}
thinking = {{ type = "disabled" }}

[limits]
max_in_flight = {in_flight}

[output]
path = "{folder / f"out_{done}.parquet"}"
""",
        encoding="utf-8",
    )
    return job


# -- the state of a job with rows done --------------------------------------------------------


@dataclass(slots=True)
class Target:
    """One job whose state gets the first ``done`` rows."""

    done: int
    context: JobContext
    run: int = 0
    results: list[RowResult] = field(default_factory=list)
    intents: list[Intent] = field(default_factory=list)
    seals: list[Seal] = field(default_factory=list)

    def seal_if_done(self, start: int, rows: int, digest: str) -> None:
        """Seal a batch all of whose rows are done (written at the next flush)."""
        if start + rows <= self.done:
            self.seals.append(Seal(start=start, rows=rows, digest=digest, ok=rows, failed=0))

    def flush(self) -> None:
        if self.intents:
            self.context.journal.append_intents(self.intents)
        if self.results:
            self.context.journal.append_results(self.results)
        # As a real run does: a batch is sealed only once all its results are durable.
        self.context.seals.append(self.seals)
        self.intents.clear()
        self.results.clear()
        self.seals.clear()


def build_states(jobs: dict[int, Path]) -> float:
    """Write the state of every job with done > 0 in one planning pass; returns seconds."""
    began = time.monotonic()
    targets = [Target(done=d, context=JobContext(load_job(p))) for d, p in jobs.items()]
    targets = [t for t in targets if t.done > 0]
    if not targets:
        return 0.0
    lead = targets[0].context
    scan = lead.scan()
    for target in targets:
        target.context.state.acquire()
        target.context.journal.open()
        target.run = target.context.state.begin_run(None)
    if len({t.run for t in targets}) != 1:
        raise RuntimeError("the state folders were not empty")
    run = targets[0].run
    price = lead.price
    model = lead.job.request.model
    most = max(t.done for t in targets)
    spent = Usage()
    spent_usd = Decimal(0)
    start = 0
    for batch in iter_batches(scan.files, lead.planner.columns, limit=most):
        for planned in with_prompt_tokens(list(lead.planner.plan(batch, start))):
            prompt_tokens = planned.prompt_tokens or 0
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=12 + planned.row % 20)
            result = RowResult(
                key=planned.key,
                row=planned.row,
                status="ok",
                response=f"Item {planned.row} in one line: a calm, short and plain summary.",
                finish_reason="stop",
                usage=usage,
                cost_usd=cost(usage, price),
                attempts=1,
                latency_ms=5,
                model=model,
                run=run,
            )
            worst = Usage(prompt_tokens=prompt_tokens, completion_tokens=MAX_TOKENS)
            intent = Intent(
                key=planned.key, row=planned.row, run=run, worst_cost_usd=cost(worst, price)
            )
            for target in targets:
                if planned.row < target.done:
                    target.intents.append(intent)
                    target.results.append(result)
            if planned.row < targets[0].done:
                spent = spent + usage
                spent_usd += result.cost_usd or Decimal(0)
        digest = batch_digest(lead.planner.fingerprint, batch)
        for target in targets:
            target.seal_if_done(start, batch.num_rows, digest)
        start += batch.num_rows
        for target in targets:
            if len(target.results) >= FLUSH_ROWS:
                target.flush()
    for target in targets:
        target.flush()
        summary = {
            "rows_ok": target.done,
            "rows_failed": 0,
            "rows_resumed": 0,
            "requests": target.done,
            "output_rows": target.done,
            # A run stopped with Ctrl-C after its requests in flight came back.
            "unanswered": 0,
            "unanswered_worst_usd": "0",
        }
        target.context.state.end_run(target.run, INTERRUPTED, summary)
        target.context.state.release()
    return time.monotonic() - began


def job_status(job: Path) -> tuple[dict[str, Any], float]:
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "status", str(job), "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=job.parent,
    )
    elapsed = time.monotonic() - began
    data: dict[str, Any] = json.loads(done.stdout)
    return data, elapsed


# -- one resume -------------------------------------------------------------------------------


# ``python -m pipeline`` that reports its own peak RSS (VmHWM) on the way out. The peak cannot
# come from ``ru_maxrss``: a child started by fork/vfork and exec keeps the parent's RSS at the
# fork as its ``ru_maxrss`` floor, and this benchmark's own process is a few hundred MiB.
LAUNCHER = """
import atexit, runpy, sys
def _report_peak():
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                sys.stderr.write("bench-vmhwm-kb: " + line.split()[1] + "\\n")
                sys.stderr.flush()
atexit.register(_report_peak)
sys.argv[0] = "pipeline"
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
"""
PEAK_MARK = "bench-vmhwm-kb: "


@dataclass(slots=True)
class Resume:
    done: int
    first_send_s: float | None = None
    header_s: float | None = None
    """When the run printed its header (input scanned, suspects counted)."""
    rss_first_kb: int = 0
    hwm_first_kb: int = 0
    """Peak RSS up to the first request (scan, suspects, skipping done rows)."""
    peak_kb: int = 0
    """Peak RSS of the whole process (VmHWM as it exits)."""
    skip_rss_kb: tuple[int, int] = (0, 0)
    """Median RSS over 10-20 % and over 80-90 % of the time from the header to the first
    request (the done rows being skipped)."""
    cpu_s: float = 0.0
    sent: int = 0
    distinct: int = 0
    stopped_after: int | None = None
    """Requests sent when SIGINT was delivered, if it was."""
    total_s: float = 0.0
    exit_code: int = 0
    tail: str = ""


def proc_status_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in kB (empty once it is gone)."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, amount = line.split(":", 1)
                    values[name] = int(amount.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values


def collect_lines(stream: IO[bytes], began: float, lines: list[tuple[float, str]]) -> None:
    for raw in iter(stream.readline, b""):
        lines.append((time.monotonic() - began, raw.decode("utf-8", errors="replace")))


def median_rss(samples: list[tuple[float, int]], since: float, until: float) -> int:
    """The median RSS of the samples taken in [since, until]."""
    inside = sorted(rss for at, rss in samples if since <= at <= until)
    return inside[len(inside) // 2] if inside else 0


def resume(job: Path, done: int, counters: StatsClient, stop_after: int | None) -> Resume:
    """Run the job, measure, stop it with SIGINT after ``stop_after`` requests if given."""
    counters.reset()
    result = Resume(done=done)
    lines: list[tuple[float, str]] = []
    samples: list[tuple[float, int]] = []
    hwm_seen = 0
    began = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, "run", str(job)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=job.parent,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert proc.stdout is not None
    reader = threading.Thread(target=collect_lines, args=(proc.stdout, began, lines), daemon=True)
    reader.start()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        now = time.monotonic() - began
        if now > RUN_TIMEOUT_S:
            proc.kill()
            continue
        memory = proc_status_kb(proc.pid)
        samples.append((now, memory.get("VmRSS", 0)))
        hwm_seen = max(hwm_seen, memory.get("VmHWM", 0))
        sent = int(counters()["requests_total"])
        if result.first_send_s is None and sent > 0:
            result.first_send_s = now
            result.rss_first_kb = memory.get("VmRSS", 0)
            result.hwm_first_kb = memory.get("VmHWM", 0)
        if stop_after is not None and result.stopped_after is None and sent >= stop_after:
            proc.send_signal(signal.SIGINT)
            result.stopped_after = sent
        time.sleep(POLL_S)
    result.total_s = time.monotonic() - began
    result.exit_code = os.waitstatus_to_exitcode(status)
    proc.returncode = result.exit_code  # reaped here by wait4, so Popen must not wait again
    reader.join(10)
    proc.stdout.close()
    result.cpu_s = usage.ru_utime + usage.ru_stime
    stats = counters()
    result.sent = int(stats["requests_total"])
    result.distinct = int(stats["distinct_requests"])
    result.peak_kb = hwm_seen
    for at, line in lines:
        if result.header_s is None and " rows from " in line:
            result.header_s = at
        if line.startswith(PEAK_MARK):
            result.peak_kb = int(line[len(PEAK_MARK) :])
    if result.header_s is not None and result.first_send_s is not None:
        head, first = result.header_s, result.first_send_s
        span = first - head
        result.skip_rss_kb = (
            median_rss(samples, head + 0.1 * span, head + 0.2 * span),
            median_rss(samples, head + 0.8 * span, head + 0.9 * span),
        )
    result.tail = "".join(line for _, line in lines[-25:] if not line.startswith(PEAK_MARK))
    return result


def check_output(path: Path, rows: int) -> tuple[int, int, bool]:
    """(rows, distinct ids, every status ok) of the output Parquet."""
    frame = (
        pl.scan_parquet(path)
        .select(
            pl.len().alias("rows"),
            pl.col("id").n_unique().alias("ids"),
            (pl.col("status") == "ok").all().alias("ok"),
        )
        .collect()
    )
    return int(frame["rows"][0]), int(frame["ids"][0]), bool(frame["ok"][0])


# -- the report -------------------------------------------------------------------------------


def mib(kb: int) -> str:
    return f"{kb / 1024:,.1f}"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def per_row(main: float | None, base: float | None, rows: int, scale: float, unit: str) -> str:
    if main is None or base is None or rows <= 0:
        return "-"
    return f"{(main - base) * scale / rows:,.2f} {unit}"


def skip_growth(run: Resume) -> float:
    """Bytes of RSS per done row skipped, between the two windows of the skipping phase."""
    low, high = run.skip_rss_kb
    return (high - low) * 1024 / (0.7 * run.done) if run.done else 0.0


def print_table(resumes: list[Resume], main: Resume) -> None:
    base = min(resumes, key=lambda r: r.done)
    done_diff = main.done - base.done
    header = ["", *(f"done={r.done:,}" for r in resumes), "per done row"]
    table: list[list[str]] = [
        [
            "time to first request (s)",
            *(seconds(r.first_send_s) for r in resumes),
            per_row(main.first_send_s, base.first_send_s, done_diff, 1e6, "us"),
        ],
        [
            "header printed at (s)",
            *(seconds(r.header_s) for r in resumes),
            per_row(main.header_s, base.header_s, done_diff, 1e6, "us"),
        ],
        [
            "RSS at first request (MiB)",
            *(mib(r.rss_first_kb) for r in resumes),
            per_row(main.rss_first_kb, base.rss_first_kb, done_diff, 1024, "B"),
        ],
        [
            "peak RSS until first request (MiB)",
            *(mib(r.hwm_first_kb) for r in resumes),
            per_row(main.hwm_first_kb, base.hwm_first_kb, done_diff, 1024, "B"),
        ],
        [
            "peak RSS, whole run (MiB)",
            *(mib(r.peak_kb) for r in resumes),
            per_row(main.peak_kb, base.peak_kb, done_diff, 1024, "B"),
        ],
        ["requests sent", *(f"{r.sent:,}" for r in resumes), ""],
        ["distinct requests", *(f"{r.distinct:,}" for r in resumes), ""],
        [
            "stopped with SIGINT after",
            *("no" if r.stopped_after is None else f"{r.stopped_after:,} req" for r in resumes),
            "",
        ],
        ["run wall time (s)", *(seconds(r.total_s) for r in resumes), ""],
        ["run CPU time (s)", *(seconds(r.cpu_s) for r in resumes), ""],
        ["exit code", *(str(r.exit_code) for r in resumes), ""],
    ]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        cells = [
            row[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)),
        ]
        print("  ".join(cells))
    low, high = main.skip_rss_kb
    print(
        f"RSS while the done={main.done:,} run skips its done rows (median over 10-20% / 80-90% "
        f"of header -> first request): {mib(low)} / {mib(high)} MiB, "
        f"{skip_growth(main):,.2f} B per row skipped"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="resume_large_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return run_bench(args, folder, began)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)


@dataclass(slots=True)
class Prepared:
    jobs: dict[int, Path]
    state_s: float
    status_s: float
    status_rows: dict[str, int]


def prepare(args: argparse.Namespace, folder: Path, base: str) -> Prepared:
    """Write the input, the job files and the states; check the main one with status."""
    input_path = folder / "in.parquet"
    step = time.monotonic()
    write_input(input_path, args.rows, args.text_bytes, args.row_group_rows)
    size = input_path.stat().st_size
    print(f"input written: {size / 2**20:,.1f} MiB in {time.monotonic() - step:.1f} s")
    scenarios = sorted({args.done, *args.compare}, reverse=True)
    jobs = {d: write_job(folder, d, input_path, base, args.in_flight) for d in scenarios}
    state_s = build_states(jobs)
    print(f"states written (one planning pass, tokens counted): {state_s:.1f} s")
    status, status_s = job_status(jobs[args.done])
    rows: dict[str, int] = status["rows"]
    print(
        f"pipeline status --json: {rows['ok']:,} ok, {rows['pending']:,} pending, "
        f"{rows['failed']:,} failed of {rows['total']:,} in {status_s:.1f} s"
    )
    return Prepared(jobs=jobs, state_s=state_s, status_s=status_s, status_rows=rows)


def run_bench(args: argparse.Namespace, folder: Path, began: float) -> int:
    scenarios = sorted({args.done, *args.compare}, reverse=True)
    remaining = args.rows - args.done
    print(
        f"resume_large: {args.rows:,} rows, done {', '.join(f'{d:,}' for d in scenarios)}; "
        f"server latency {args.latency_ms:g} ms, max_in_flight {args.in_flight}"
    )
    print(f"work folder: {folder}")
    with LocalServer(ServerOptions(profile="deepseek", latency_ms=args.latency_ms)) as base:
        prepared = prepare(args, folder, base)
        counters = StatsClient(base)
        resumes: list[Resume] = []
        for done in scenarios:
            limit = args.sends
            if limit is None and done != args.done:
                limit = remaining  # the same sending work as the main scenario
            kind = "to completion" if limit is None else f"SIGINT after {limit:,} requests"
            print(f"resuming done={done:,} ({kind}) ...", flush=True)
            resumes.append(resume(prepared.jobs[done], done, counters, limit))
        counters.close()
    main_run = next(r for r in resumes if r.done == args.done)
    print()
    print_table(resumes, main_run)
    print()
    summary = evaluate(args, folder, prepared, resumes, main_run)
    summary["wall_s"] = round(time.monotonic() - began, 1)
    print(f"wall time, whole benchmark: {summary['wall_s']:.1f} s")
    print(f"\nresult: {'PASS' if summary['pass'] else 'FAIL'}")
    print(json.dumps(summary, separators=(",", ":")))
    return 0 if summary["pass"] else 1


def evaluate(
    args: argparse.Namespace,
    folder: Path,
    prepared: Prepared,
    resumes: list[Resume],
    main_run: Resume,
) -> dict[str, Any]:
    """Print PASS/FAIL per check; return the JSON summary (without the wall time)."""
    remaining = args.rows - args.done
    counted = prepared.status_rows
    checks: dict[str, bool] = {}
    checks["status"] = (
        counted["total"] == args.rows
        and counted["ok"] == args.done
        and counted["pending"] == remaining
        and counted["failed"] == 0
    )
    first = main_run.first_send_s
    checks["first_send"] = first is not None and first <= FIRST_SEND_LIMIT_S
    low = min(resumes, key=lambda r: r.done)
    done_diff = args.done - low.done
    growth_peak = (main_run.peak_kb - low.peak_kb) * 1024 / done_diff
    growth_first = (main_run.hwm_first_kb - low.hwm_first_kb) * 1024 / done_diff
    growth_skip = skip_growth(main_run)
    skip_s = (first or 0.0) - (main_run.header_s or 0.0)
    checks["memory_peak"] = growth_peak <= args.max_bytes_per_row
    skip_verdict: bool | None = None  # too short a phase to tell growth from warm-up
    if skip_s >= MIN_SKIP_PHASE_S:
        skip_verdict = checks["memory_skip"] = growth_skip <= args.max_bytes_per_row
    verdicts: list[tuple[str, str, bool | None]] = [
        (
            "pipeline status: ok / pending",
            f"{counted['ok']:,} / {counted['pending']:,}",
            checks["status"],
        ),
        (
            f"first request within {FIRST_SEND_LIMIT_S:g} s (done={args.done:,})",
            seconds(first) + " s",
            checks["first_send"],
        ),
        (
            f"peak RSS growth per done row <= {args.max_bytes_per_row:g} B",
            f"{growth_peak:,.2f} B",
            checks["memory_peak"],
        ),
        (
            f"RSS growth while skipping, per row <= {args.max_bytes_per_row:g} B",
            f"{growth_skip:,.2f} B",
            skip_verdict,
        ),
    ]
    output: dict[str, Any] = {}
    if main_run.stopped_after is None:
        out_rows, ids, all_ok = check_output(folder / f"out_{args.done}.parquet", args.rows)
        checks["output"] = out_rows == args.rows and ids == args.rows and all_ok
        checks["exit_code"] = main_run.exit_code == 0
        checks["no_repeats"] = main_run.sent == main_run.distinct == remaining
        output = {"rows": out_rows, "distinct_ids": ids, "all_ok": all_ok}
        verdicts += [
            (
                "output rows / distinct ids / all ok",
                f"{out_rows:,} / {ids:,} / {all_ok}",
                checks["output"],
            ),
            (
                "requests sent == distinct == pending rows",
                f"{main_run.sent:,} / {main_run.distinct:,} / {remaining:,}",
                checks["no_repeats"],
            ),
            ("exit code", str(main_run.exit_code), checks["exit_code"]),
        ]
        finish = f"finished the remaining {remaining:,} rows in {main_run.total_s:.1f} s"
    else:
        finish = (
            f"NOTE: the done={args.done:,} run was stopped with SIGINT after "
            f"{main_run.stopped_after:,} requests (--sends); its output was not checked"
        )
    for name, value, ok in verdicts:
        verdict = "n/a" if ok is None else "PASS" if ok else "FAIL"
        print(f"{name:<52} {value:>24}  {verdict}")
    if skip_verdict is None:
        print(
            f"(the skipping phase lasted {skip_s:.1f} s, under {MIN_SKIP_PHASE_S:g} s: too short "
            "to tell growth from warm-up, so its slope is not checked)"
        )
    print(finish)
    for r in resumes:
        if r.exit_code not in (0, 130):
            print(f"done={r.done:,} exited {r.exit_code}:\n{r.tail}", file=sys.stderr)
    return {
        "bench": "resume_large",
        "pass": all(checks.values()),
        "rows": args.rows,
        "done": args.done,
        "state_build_s": round(prepared.state_s, 1),
        "status_s": round(prepared.status_s, 1),
        "first_send_s": None if first is None else round(first, 2),
        "header_s": None if main_run.header_s is None else round(main_run.header_s, 2),
        "finished": main_run.stopped_after is None,
        "resume_total_s": round(main_run.total_s, 1),
        "peak_rss_mib": {str(r.done): round(r.peak_kb / 1024, 1) for r in resumes},
        "peak_rss_until_first_send_mib": {
            str(r.done): round(r.hwm_first_kb / 1024, 1) for r in resumes
        },
        "first_send_s_by_done": {
            str(r.done): None if r.first_send_s is None else round(r.first_send_s, 2)
            for r in resumes
        },
        "bytes_per_done_row_peak": round(growth_peak, 2),
        "bytes_per_done_row_until_first_send": round(growth_first, 2),
        "bytes_per_row_while_skipping": round(growth_skip, 2),
        "output": output,
        "checks": checks,
    }


if __name__ == "__main__":
    sys.exit(main())
