"""SIGKILL a large run again and again, resume it each time, and check that nothing is lost.

What it measures (the acceptance criterion):

    20 SIGKILLs at random moments during a 20,000-row run against the built-in server, each
    followed by a resume, end with 20,000 output rows, each id exactly once; the requests the
    server received beyond 20,000 are no more than 20 x (in-flight cap + one second of
    completions), and each resumed run reported its suspects: exactly the requests that went
    out twice (a row's intent is recorded in the same step as its request's write to the
    socket, so a kill never leaves one that did not go).

How: the script writes a ``--rows`` Parquet input (``rid`` + a short ``text``) and a job file in
a temporary folder, starts the built-in server (:class:`pipeline.server.process.LocalServer`,
deepseek profile, ``--latency-ms`` plus up to ``--jitter-ms``, no faults) and then, ``--kills``
times: starts ``python -m pipeline run job.toml``, waits until the run's results journal grows
(it is really sending), waits a random ``--min-wait``..``--max-wait`` seconds more (seeded by
``--seed``) and SIGKILLs it. The next run is started at once. Every run after a kill must print
``run N stopped with K request(s) in flight ...`` (``runner.describe_suspects``): K is parsed
from its stdout+stderr (a run that is itself killed later is read after its kill). After the
last kill one more run goes to completion.

"Completions per second" in the bound is measured, not assumed: the server's ``ok`` counter is
read when each killed run's journal first grows and again just before the SIGKILL; the rate is
the sum of those deltas over the sum of those windows (the steady rate at the moments of the
kills). The final run's own rate and the overall rate are printed too, for comparison.

A kill is normally at the random moment; if fewer than ``8 x in-flight`` rows per remaining
kill would be left, the kill comes early so every kill still hits a run that is sending
(counted as "early kills"; zero with the defaults).

Reading the output: one line per kill (alive time, server requests and in-flight count at the
kill, K reported by the next run), then a table of figures with PASS/FAIL per invariant, then one
JSON line (``{"bench": "kill_resume", ...}``) for machines. Exit status 0 when every invariant
holds, 1 otherwise.

    .venv/bin/python bench/kill_resume.py            # the acceptance numbers
    .venv/bin/python bench/kill_resume.py --rows 3000 --kills 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.server.options import ServerOptions
from pipeline.server.process import LocalServer, StatsClient
from pipeline.state.runs import RunRecord, StateFolder

SUSPECTS_LINE = re.compile(r"run (\d+) stopped with ([\d,]+) request\(s\) in flight")
POLL_S = 0.02
PROGRESS_TIMEOUT_S = 120.0
FINAL_TIMEOUT_S = 1800.0
RESERVE_PER_KILL_FACTOR = 8  # rows left per remaining kill, in units of max_in_flight


@dataclass(slots=True)
class Kill:
    index: int
    run: int
    """The run number the state folder gave the killed run."""
    alive_s: float
    random_wait_s: float
    early: bool
    requests_at_kill: int
    in_flight_at_kill: int
    window_ok: int
    """Server ``ok`` answers between the first durable result and the kill."""
    window_s: float
    reported_run: int | None = None
    """The run number named by the next run's suspects line."""
    reported: int | None = None
    """K of the next run's suspects line."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="input rows (20000)")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs before the last run (20)")
    parser.add_argument("--in-flight", type=int, default=64, help="[limits] max_in_flight (64)")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="server latency (100)")
    parser.add_argument(
        "--jitter-ms", type=float, default=100.0, help="uniform extra latency, up to (100)"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the kill moments (7)")
    parser.add_argument("--min-wait", type=float, default=0.2, help="least extra wait, s (0.2)")
    parser.add_argument("--max-wait", type=float, default=3.0, help="most extra wait, s (3.0)")
    parser.add_argument("--workdir", type=Path, help="use this folder instead of a temp one")
    parser.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.kills < 0 or args.in_flight < 1:
        parser.error("--rows and --in-flight must be positive, --kills not negative")
    if not 0 <= args.min_wait <= args.max_wait:
        parser.error("need 0 <= --min-wait <= --max-wait")
    return args


def write_input(folder: Path, rows: int) -> Path:
    path = folder / "in.parquet"
    table = pa.table(
        {
            "rid": [f"r{i:07d}" for i in range(rows)],
            "text": [f"item {i}, a short line of text" for i in range(rows)],
        }
    )
    pq.write_table(table, path)
    return path


def write_job(folder: Path, input_path: Path, base_url: str, in_flight: int) -> Path:
    job = folder / "job.toml"
    job.write_text(
        f"""name = "kill-resume"

[input]
path = "{input_path}"
id_column = "rid"

[request]
base_url = "{base_url}"
model = "deepseek/deepseek-v4-flash"
prompt = "Write one line about {{text}}"
max_tokens = 16
thinking = {{ type = "disabled" }}

[limits]
max_in_flight = {in_flight}

[output]
path = "{folder / "out.parquet"}"
""",
        encoding="utf-8",
    )
    return job


def results_bytes(state_dir: Path) -> int:
    folder = state_dir / "results"
    if not folder.exists():
        return 0
    total = 0
    for path in folder.glob("*.jsonl"):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            continue
    return total


def start_run(job: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log.open("wb") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", str(job)],
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=job.parent,
            env=env,
        )


def reported_unanswered(log: Path) -> tuple[int, int] | None:
    """(run, K) from the ``run N stopped with K request(s) in flight`` line, if printed."""
    text = " ".join(log.read_text(encoding="utf-8", errors="replace").split())
    found = SUSPECTS_LINE.search(text)
    if found is None:
        return None
    return int(found.group(1)), int(found.group(2).replace(",", ""))


def last_run(state_dir: Path) -> tuple[int, bool]:
    """The last run's number and whether it recorded an end."""
    history = StateFolder(state_dir).history()
    if not history:
        return 0, False
    return history[-1].run, history[-1].ended


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def kill_one(
    index: int,
    *,
    kills: int,
    job: Path,
    logs: Path,
    counters: StatsClient,
    state_dir: Path,
    rng: random.Random,
    args: argparse.Namespace,
) -> Kill:
    """Start a run, wait until it sends and a random moment more, SIGKILL it."""
    log = logs / f"run{index:02d}.log"
    before = results_bytes(state_dir)
    began = time.monotonic()
    proc = start_run(job, log)
    deadline = began + PROGRESS_TIMEOUT_S
    while results_bytes(state_dir) <= before:
        if proc.poll() is not None:
            fail(f"run {index} exited ({proc.returncode}) before any progress:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            fail(f"run {index} made no progress in {PROGRESS_TIMEOUT_S:g} s")
        time.sleep(POLL_S)
    window_start = time.monotonic()
    ok_start = int(counters()["ok"])
    wait_s = rng.uniform(args.min_wait, args.max_wait)
    reserve = (kills - index + 1) * RESERVE_PER_KILL_FACTOR * args.in_flight
    early = False
    stats = counters()
    while time.monotonic() - window_start < wait_s:
        if proc.poll() is not None:
            fail(f"run {index} finished before its kill; use more --rows or a shorter --max-wait")
        if int(stats["distinct_requests"]) >= args.rows - reserve:
            early = True
            break
        time.sleep(POLL_S)
        stats = counters()
    stats = counters()
    proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    proc.wait()
    run, ended = last_run(state_dir)
    if ended:
        fail(f"run {run} recorded an end although it was killed")
    return Kill(
        index=index,
        run=run,
        alive_s=killed_at - began,
        random_wait_s=wait_s,
        early=early,
        requests_at_kill=int(stats["requests_total"]),
        in_flight_at_kill=int(stats["in_flight"]),
        window_ok=int(stats["ok"]) - ok_start,
        window_s=killed_at - window_start,
    )


def check(name: str, ok: bool, results: dict[str, bool]) -> str:
    results[name] = ok
    return "PASS" if ok else "FAIL"


@dataclass(slots=True)
class Outcome:
    kills: list[Kill]
    stats: dict[str, Any]
    """The server's counters after the final run."""
    history: list[RunRecord]
    final_rc: int
    final_s: float
    final_requests: int
    runs_s: float


def run_bench(args: argparse.Namespace, folder: Path) -> Outcome:
    logs = folder / "logs"
    logs.mkdir(exist_ok=True)
    rng = random.Random(args.seed)
    options = ServerOptions(
        profile="deepseek",
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.jitter_ms,
        seed=args.seed,
    )
    with LocalServer(options) as base:
        counters = StatsClient(base)
        input_path = write_input(folder, args.rows)
        job = write_job(folder, input_path, base, args.in_flight)
        state_dir = folder / "out.parquet.state"
        kills: list[Kill] = []
        runs_began = time.monotonic()
        print(
            f"{'kill':>4} {'run':>4} {'alive s':>8} {'wait s':>7} {'srv reqs':>9} "
            f"{'in flight':>9} {'K next':>7}"
        )
        for index in range(1, args.kills + 1):
            kill = kill_one(
                index,
                kills=args.kills,
                job=job,
                logs=logs,
                counters=counters,
                state_dir=state_dir,
                rng=rng,
                args=args,
            )
            if kills:  # this run resumed the previous kill: read its suspects line
                note_unanswered(kills[-1], logs / f"run{index:02d}.log")
            kills.append(kill)
        final_log = logs / f"run{args.kills + 1:02d}.log"
        requests_before = int(counters()["requests_total"])
        final_began = time.monotonic()
        final = start_run(job, final_log)
        try:
            final_rc = final.wait(FINAL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            final.kill()
            final.wait()
            fail(f"the final run did not finish in {FINAL_TIMEOUT_S:g} s")
        final_s = time.monotonic() - final_began
        runs_s = time.monotonic() - runs_began
        if kills:
            note_unanswered(kills[-1], final_log)
        if final_rc != 0:
            tail = final_log.read_text(encoding="utf-8", errors="replace")[-3000:]
            print(f"the final run exited {final_rc}:\n{tail}", file=sys.stderr)
        stats = counters()
        counters.close()
    return Outcome(
        kills=kills,
        stats=stats,
        history=StateFolder(state_dir).history(),
        final_rc=final_rc,
        final_s=final_s,
        final_requests=int(stats["requests_total"]) - requests_before,
        runs_s=runs_s,
    )


def note_unanswered(kill: Kill, log: Path) -> None:
    """Record and print what the run after ``kill`` reported."""
    found = reported_unanswered(log)
    if found is not None:
        kill.reported_run, kill.reported = found
    print_kill(kill)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="kill_resume_"))
    folder.mkdir(parents=True, exist_ok=True)
    print(
        f"kill_resume: {args.rows:,} rows, {args.kills} SIGKILLs, max_in_flight "
        f"{args.in_flight}, latency {args.latency_ms:g}+U(0,{args.jitter_ms:g}) ms, "
        f"extra wait U({args.min_wait:g},{args.max_wait:g}) s, seed {args.seed}"
    )
    print(f"work folder: {folder}")
    try:
        outcome = run_bench(args, folder)
        result = report(args, folder, outcome, began)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result, separators=(",", ":")))
    return 0 if result["pass"] else 1


def print_kill(kill: Kill) -> None:
    reported = "-" if kill.reported is None else f"{kill.reported:,}"
    early = " (early)" if kill.early else ""
    print(
        f"{kill.index:>4} {kill.run:>4} {kill.alive_s:>8.2f} {kill.random_wait_s:>7.2f} "
        f"{kill.requests_at_kill:>9,} {kill.in_flight_at_kill:>9} {reported:>7}{early}"
    )


def report(
    args: argparse.Namespace, folder: Path, outcome: Outcome, began: float
) -> dict[str, Any]:
    kills, stats, history = outcome.kills, outcome.stats, outcome.history
    final_rc, final_s, runs_s = outcome.final_rc, outcome.final_s, outcome.runs_s
    out = pl.read_parquet(folder / "out.parquet")
    ids = out["id"]
    expected = {f"r{i:07d}" for i in range(args.rows)}
    statuses = sorted(set(out["status"].to_list()))
    requests_total = int(stats["requests_total"])
    distinct = int(stats["distinct_requests"])
    extra = requests_total - args.rows
    window_ok = sum(k.window_ok for k in kills)
    window_s = sum(k.window_s for k in kills)
    rate = window_ok / window_s if window_s > 0 else 0.0
    overall_rate = int(stats["ok"]) / runs_s if runs_s > 0 else 0.0
    final_rate = outcome.final_requests / final_s if final_s > 0 else 0.0
    bound = args.kills * (args.in_flight + rate)
    reported = [k.reported for k in kills]
    reported_sum = sum(r for r in reported if r is not None)
    every_reported = all(r is not None and r >= 1 for r in reported)
    runs_match = all(k.reported_run == k.run for k in kills)
    recorded = {r.run: r.unanswered.count for r in history if r.unanswered is not None}
    recorded_match = all(recorded.get(k.run + 1) == k.reported for k in kills)
    per_kill_bound = args.in_flight + rate
    worst_kill = max((r for r in reported if r is not None), default=0)
    wall_s = time.monotonic() - began
    passed: dict[str, bool] = {}
    rows = [
        ("output rows", f"{out.height:,}", check("rows", out.height == args.rows, passed)),
        (
            "distinct ids",
            f"{ids.n_unique():,}",
            check("ids", ids.n_unique() == args.rows and set(ids.to_list()) == expected, passed),
        ),
        ("statuses", ",".join(statuses), check("statuses", statuses == ["ok"], passed)),
        ("final run exit code", str(final_rc), check("final_rc", final_rc == 0, passed)),
        ("kills done", f"{len(kills)}", check("kills", len(kills) == args.kills, passed)),
        ("early kills (guard)", f"{sum(k.early for k in kills)}", ""),
        ("server requests_total", f"{requests_total:,}", ""),
        (
            "server distinct_requests",
            f"{distinct:,}",
            check("distinct", distinct == args.rows, passed),
        ),
        ("extra = requests_total - rows", f"{extra:,}", ""),
        (
            "completions/s (server ok, kill windows)",
            f"{rate:,.1f}  ({window_ok:,} ok in {window_s:.1f} s)",
            "",
        ),
        (
            "  for comparison: final run",
            f"{final_rate:,.1f} req/s ({outcome.final_requests:,} in {final_s:.1f} s)",
            "",
        ),
        ("  for comparison: all runs", f"{overall_rate:,.1f} ok/s over {runs_s:.1f} s", ""),
        (
            f"bound = {args.kills} x ({args.in_flight} + {rate:,.1f})",
            f"{bound:,.0f}",
            check("bound", extra <= bound, passed),
        ),
        (
            "extra / bound",
            f"{extra / bound:.1%}" if bound else "-",
            "",
        ),
        ("suspects reported, sum", f"{reported_sum:,}", ""),
        (
            "extra == suspects sum (every repeat reported, none that never went)",
            f"{extra:,} == {reported_sum:,}",
            check("extra_reported", extra == reported_sum, passed),
        ),
        (
            "every resume reported suspects",
            f"{sum(r is not None and r >= 1 for r in reported)}/{len(kills)}",
            check("every_reported", every_reported, passed),
        ),
        (
            "suspects line names the killed run",
            f"{sum(k.reported_run == k.run for k in kills)}/{len(kills)}",
            check("runs_match", runs_match, passed),
        ),
        (
            "runs.jsonl suspects == printed K",
            f"{sum(recorded.get(k.run + 1) == k.reported for k in kills)}/{len(kills)}",
            check("recorded_match", recorded_match, passed),
        ),
        (
            "largest K / per-kill bound",
            f"{worst_kill:,} / {per_kill_bound:,.0f}",
            check("per_kill", worst_kill <= per_kill_bound, passed),
        ),
        ("max_sends_per_request", f"{stats['max_sends_per_request']}", ""),
        ("sends_histogram", json.dumps(stats["sends_histogram"]), ""),
        ("wall time, runs", f"{runs_s:.1f} s", ""),
        ("wall time, total", f"{wall_s:.1f} s", ""),
    ]
    width = max(len(name) for name, _, _ in rows)
    print()
    for name, value, verdict in rows:
        print(f"{name:<{width}}  {value:<34} {verdict}".rstrip())
    ok = all(passed.values())
    print(f"\nresult: {'PASS' if ok else 'FAIL'}")
    return {
        "bench": "kill_resume",
        "pass": ok,
        "rows": args.rows,
        "kills": len(kills),
        "in_flight": args.in_flight,
        "output_rows": out.height,
        "distinct_ids": ids.n_unique(),
        "all_ok": statuses == ["ok"],
        "requests_total": requests_total,
        "distinct_requests": distinct,
        "extra": extra,
        "completions_per_s": round(rate, 1),
        "completions_per_s_source": "server ok count / kill windows",
        "bound": round(bound),
        "suspects_sum": reported_sum,
        "suspects": reported,
        "every_resume_reported": every_reported,
        "max_sends_per_request": stats["max_sends_per_request"],
        "early_kills": sum(k.early for k in kills),
        "final_run_s": round(final_s, 1),
        "final_run_requests": outcome.final_requests,
        "wall_s": round(wall_s, 1),
        "checks": passed,
    }


if __name__ == "__main__":
    sys.exit(main())
