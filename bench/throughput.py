"""Close to the floor: this project against a bare aiohttp loop, side by side in one run.

Every scenario runs ``pipeline run`` (a real process) against the built-in server on
127.0.0.1 and, in the same run, the *floor*: ``bench/baseline_aiohttp.py``, a bare aiohttp
loop with no journal, no output and no limiter. Each prints the figures of both and their
ratio, and checks the issue's target (``PASS``/``FAIL``). The client's CPU time is its own
(user + system, from ``os.wait4``; the server's is never counted); its peak RSS is the
``VmHWM`` of its ``/proc/PID/status``, polled every 50 ms; the time to the first request is
from the process start to the server's first request (both on the machine's monotonic clock).
Before measuring, the ``pipeline`` package's bytecode is compiled (``compileall``), as
``pip install`` of a wheel does: an editable install under ``PYTHONDONTWRITEBYTECODE=1`` would
otherwise compile ~65 modules from source at every start (~55 ms), which the floor, whose
libraries come with their bytecode, never pays.

(t) 20,000 rows, 200 ms latency, 256 in flight, no limits (ceiling 1,280 req/s): req/s from
    process start to exit and CPU per request against the floor's; the ``openai`` SDK
    (``AsyncOpenAI`` + ``Semaphore(256)``, bench/baseline_openai.py) beside them.
    Targets: >= 95% of the floor's req/s, CPU per request <= 1.5x the floor's.
(s) 5,000 rows, the same server: start-up (process start to the first request) <= 0.4 s.
(q) 3,000 rows, openai profile, 6,000 req/min enforced per second (``--rate-window-s 1``: a
    bucket of 100 requests refilled at 100/s), the job told 6,000 req/min; the floor is an
    even pacer at exactly 100 req/s. Rate from the first request to exit.
    Targets: >= 98% of the limit, 0 429s.
(h) 6,000 rows, a hidden cap of 40 in flight (429 without headers), 200 ms latency, the job's
    max_in_flight 256; the floor is told the real cap (40 in flight). Rate from the first
    request to exit, ramp included. Targets: >= 90% of 40 / latency, < 1% 429s, every row ok.
(x) ``pipeline estimate`` over 1,000,000 prompts (bench/estimate_large.py): peak RSS <= 300
    MB, speed >= 90% of raw ``encode_batch``.
(m) run memory: the (t) job at 100,000 and at 1,000,000 rows (20 ms latency), peak RSS of
    each. Targets: 1M at most 1.2x the 100k figure, and <= 300 MB. Not in the default set
    (about 15 minutes on two cores).
(b) openai profile, 6,000 req/min + 1M tok/min enforced per minute, the job told the same.
(e) (t) at 1,000 in flight: CPU per request at that concurrency.
(f) a hidden cap of 40 run twice on one job: the second run starts from what the first learned.

    python bench/throughput.py                 # t s q h x (about 10 minutes)
    python bench/throughput.py --only t        # one scenario
    python bench/throughput.py --repeat 3      # each scenario three times
    python bench/throughput.py --scale 0.2     # fewer requests, for a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.server.options import ServerOptions
from pipeline.server.process import LocalServer, StatsClient

HERE = Path(__file__).resolve().parent
MAX_TOKENS = 32
LATENCY_S = 0.2


# ---------------------------------------------------------------------------------------------
# Measuring one process


@dataclass
class Measured:
    """One client process, measured."""

    wall_s: float
    cpu_s: float
    peak_mib: float
    first_request_s: float
    requests: int
    rate_limited: int
    ok_rows: int
    output: str

    def cpu_ms_per(self, rows: int) -> float:
        return 1000 * self.cpu_s / max(rows, 1)


def make_input(folder: Path, rows: int) -> Path:
    path = folder / f"in-{rows}.parquet"
    if not path.exists():
        topics = [f"topic number {i} and its history" for i in range(rows)]
        pq.write_table(pa.table({"rid": list(range(rows)), "text": topics}), path)
    return path


def make_job(folder: Path, name: str, input_path: Path, base_url: str, limits: str) -> Path:
    job = folder / f"{name}.toml"
    job.write_text(
        f"""
name = "bench-{name}"
[input]
path = "{input_path}"
id_column = "rid"
[request]
base_url = "{base_url}"
model = "deepseek/deepseek-v4-flash"
prompt = "Write about {{text}}"
max_tokens = {MAX_TOKENS}
thinking = {{ type = "disabled" }}
[limits]
{limits}
[output]
path = "{folder / name}.parquet"
"""
    )
    return job


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(argv: list[str], counters: StatsClient) -> Measured:
    """Run a client process against the server behind ``counters`` (reset first)."""
    counters.reset()
    peak = [0]
    with tempfile.TemporaryFile("w+") as out:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _vm_hwm_kib(proc.pid) or 0)
                stop.wait(0.05)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
        stop.set()
        thread.join()
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if code not in (0, 3):
        raise SystemExit(f"{argv} failed with {code}:\n{text[-3000:]}")
    stats = counters()
    return Measured(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_mib=peak[0] / 1024,
        first_request_s=(stats["first_request_at"] or started + wall) - started,
        requests=stats["requests_total"],
        rate_limited=stats["429"],
        ok_rows=stats["ok"],
        output=text,
    )


def pipeline_argv(job: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", str(job), "--fresh"]


def floor_argv(
    input_path: Path, base: str, concurrency: int, rate: float | None = None
) -> list[str]:
    argv = [sys.executable, str(HERE / "baseline_aiohttp.py"), str(input_path), base]
    argv += ["--concurrency", str(concurrency), "--max-tokens", str(MAX_TOKENS)]
    return argv + (["--rate", str(rate)] if rate is not None else [])


def sdk_argv(input_path: Path, base: str, concurrency: int) -> list[str]:
    argv = [sys.executable, str(HERE / "baseline_openai.py"), str(input_path), base]
    return [*argv, "--concurrency", str(concurrency), "--max-tokens", str(MAX_TOKENS)]


def rows_ok(folder: Path, name: str) -> int:
    table = pq.read_table(folder / f"{name}.parquet", columns=["status"])
    return sum(1 for s in table.column("status").to_pylist() if s == "ok")


# ---------------------------------------------------------------------------------------------
# The table


@dataclass
class Line:
    """One figure of a scenario: this project's, the floor's, and the target on their ratio."""

    what: str
    ours: float
    floor: float | None
    unit: str
    target: str = ""
    passed: bool | None = None

    def cells(self) -> list[str]:
        ratio = "" if not self.floor else f"{self.ours / self.floor:.3f}"
        floor = "" if self.floor is None else _fmt(self.floor, self.unit)
        verdict = "" if self.passed is None else ("PASS" if self.passed else "FAIL")
        return [self.what, _fmt(self.ours, self.unit), floor, ratio, self.target, verdict]


@dataclass
class Scenario:
    name: str
    lines: list[Line] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _fmt(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.2%}"
    if unit == "":
        return f"{value:,.0f}"
    if unit == "req/s":
        return f"{value:,.1f} req/s"
    return f"{value:,.3f} {unit}" if value < 10 else f"{value:,.1f} {unit}"


def print_table(scenarios: list[Scenario]) -> None:
    header = ["  figure", "this project", "floor", "ratio", "target", ""]
    rows = [[f"  {line.cells()[0]}", *line.cells()[1:]] for s in scenarios for line in s.lines]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def show(row: list[str]) -> None:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))

    show(header)
    for scenario in scenarios:
        print(scenario.name)
        for line in scenario.lines:
            show([f"  {line.cells()[0]}", *line.cells()[1:]])
        for note in scenario.notes:
            print(f"    note: {note}")


# ---------------------------------------------------------------------------------------------
# Scenarios of the table


def no_limits_server() -> ServerOptions:
    return ServerOptions(latency_ms=LATENCY_S * 1000, keepalive_after_ms=60_000)


def scenario_t(folder: Path, rows: int, *, sdk: bool = True) -> Scenario:
    data = make_input(folder, rows)
    with LocalServer(no_limits_server()) as base, StatsClient(base) as counters:
        job = make_job(folder, "t", data, base, "max_in_flight = 256")
        floor = measure(floor_argv(data, base, 256), counters)
        ours = measure(pipeline_argv(job), counters)
        openai_sdk = measure(sdk_argv(data, base, 256), counters) if sdk else None
    rate, floor_rate = rows / ours.wall_s, rows / floor.wall_s
    cpu, floor_cpu = ours.cpu_ms_per(rows), floor.cpu_ms_per(rows)
    scenario = Scenario(f"(t) {rows:,} rows, 256 in flight, no limits (ceiling 1,280 req/s)")
    scenario.lines = [
        Line(
            "req/s, process start to exit",
            rate,
            floor_rate,
            "req/s",
            ">= 0.95",
            rate >= 0.95 * floor_rate,
        ),
        Line("CPU per request", cpu, floor_cpu, "ms", "<= 1.5", cpu <= 1.5 * floor_cpu),
        Line("peak RSS", ours.peak_mib, floor.peak_mib, "MiB"),
        Line("first request after", ours.first_request_s, floor.first_request_s, "s"),
    ]
    if openai_sdk is not None:
        scenario.notes.append(
            f"openai SDK + Semaphore(256): {rows / openai_sdk.wall_s:,.1f} req/s, "
            f"{openai_sdk.cpu_ms_per(rows):.3f} ms CPU/request, {openai_sdk.peak_mib:.0f} MiB; "
            f"this project sends {rate / (rows / openai_sdk.wall_s):.2f}x its requests/s"
        )
    if ours.ok_rows != rows:
        scenario.notes.append(f"FAILED ROWS: {rows - ours.ok_rows}")
    return scenario


def scenario_s(folder: Path, rows: int) -> Scenario:
    data = make_input(folder, rows)
    with LocalServer(no_limits_server()) as base, StatsClient(base) as counters:
        job = make_job(folder, "s", data, base, "max_in_flight = 256")
        floor = measure(floor_argv(data, base, 256), counters)
        ours = measure(pipeline_argv(job), counters)
    start = ours.first_request_s
    scenario = Scenario(f"(s) {rows:,} rows, same server")
    scenario.lines = [
        Line(
            "start-up: first request after",
            start,
            floor.first_request_s,
            "s",
            "<= 0.4 s",
            start <= 0.4,
        ),
        Line("req/s, process start to exit", rows / ours.wall_s, rows / floor.wall_s, "req/s"),
        Line("CPU per request", ours.cpu_ms_per(rows), floor.cpu_ms_per(rows), "ms"),
        Line("peak RSS", ours.peak_mib, floor.peak_mib, "MiB"),
    ]
    return scenario


RPM = 6000


def scenario_q(folder: Path, rows: int) -> Scenario:
    data = make_input(folder, rows)
    options = ServerOptions(
        profile="openai", latency_ms=LATENCY_S * 1000, rpm=RPM, rate_window_s=1.0
    )
    with LocalServer(options) as base, StatsClient(base) as counters:
        job = make_job(folder, "q", data, base, f"max_in_flight = 256\nrequests_per_minute = {RPM}")
        floor = measure(floor_argv(data, base, 256, rate=RPM / 60), counters)
        ours = measure(pipeline_argv(job), counters)
    limit = RPM / 60
    rate = ours.ok_rows / (ours.wall_s - ours.first_request_s)
    floor_rate = floor.ok_rows / (floor.wall_s - floor.first_request_s)
    share = ours.rate_limited / max(ours.requests, 1)
    scenario = Scenario(
        f"(q) {rows:,} rows, {RPM:,} req/min enforced per second, the job told {RPM:,} req/min"
    )
    scenario.lines = [
        Line(
            "of the limit, first request to exit",
            rate / limit,
            floor_rate / limit,
            "%",
            ">= 98%",
            rate >= 0.98 * limit,
        ),
        Line("429s", ours.rate_limited, floor.rate_limited, "", "0", ours.rate_limited == 0),
        Line("share of requests answered 429", share, None, "%"),
    ]
    if floor.ok_rows != rows:
        scenario.notes.append(f"the floor lost {rows - floor.ok_rows} rows to 429s (no retries)")
    if rows_ok(folder, "q") != rows:
        scenario.notes.append(f"FAILED ROWS: {rows - rows_ok(folder, 'q')}")
    return scenario


HIDDEN_CAP = 40


def scenario_h(folder: Path, rows: int) -> Scenario:
    data = make_input(folder, rows)
    options = ServerOptions(latency_ms=LATENCY_S * 1000, max_concurrency=HIDDEN_CAP)
    with LocalServer(options) as base, StatsClient(base) as counters:
        job = make_job(folder, "h", data, base, "max_in_flight = 256")
        floor = measure(floor_argv(data, base, HIDDEN_CAP), counters)
        ours = measure(pipeline_argv(job), counters)
    ceiling = HIDDEN_CAP / LATENCY_S
    rate = rows / (ours.wall_s - ours.first_request_s)
    floor_rate = rows / (floor.wall_s - floor.first_request_s)
    share = ours.rate_limited / max(ours.requests, 1)
    ok = rows_ok(folder, "h")
    scenario = Scenario(
        f"(h) {rows:,} rows, hidden cap of {HIDDEN_CAP} in flight (429 without headers), "
        "max_in_flight 256; the floor is told the cap"
    )
    scenario.lines = [
        Line(
            "of 40 / latency, first request to exit",
            rate / ceiling,
            floor_rate / ceiling,
            "%",
            ">= 90%",
            rate >= 0.9 * ceiling,
        ),
        Line("share of requests answered 429", share, None, "%", "< 1%", share < 0.01),
        Line("rows ok", ok, rows, "", f"= {rows:,}", ok == rows),
    ]
    return scenario


def scenario_x(folder: Path, rows: int) -> Scenario:
    argv = [sys.executable, str(HERE / "estimate_large.py"), "--rows", str(rows)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"estimate_large.py failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    scenario = Scenario(f"(x) pipeline estimate, {rows:,} rows (bench/estimate_large.py)")
    scenario.lines = [
        Line(
            "peak RSS",
            report["peak_mib"],
            None,
            "MiB",
            "<= 300 MB",
            report["peak_mib"] * 1.048576 <= 300,
        ),
        Line(
            "speed, of raw encode_batch",
            report["ratio"],
            1.0,
            "%",
            ">= 90%",
            report["ratio"] >= 0.9,
        ),
        Line("time", report["seconds"], None, "s"),
    ]
    return scenario


def scenario_m(folder: Path, rows: int) -> Scenario:
    small = max(100, rows // 10)
    peaks: dict[int, Measured] = {}
    options = ServerOptions(latency_ms=20, keepalive_after_ms=60_000)
    for count in (small, rows):
        data = make_input(folder, count)
        with LocalServer(options) as base, StatsClient(base) as counters:
            job = make_job(folder, f"m{count}", data, base, "max_in_flight = 256")
            peaks[count] = measure(pipeline_argv(job), counters)
    ratio = peaks[rows].peak_mib / peaks[small].peak_mib
    peak_mb = peaks[rows].peak_mib * 1.048576
    scenario = Scenario(f"(m) run memory, {small:,} against {rows:,} rows")
    scenario.lines = [
        Line(
            f"peak RSS at {rows:,} rows (floor column: {small:,})",
            peaks[rows].peak_mib,
            peaks[small].peak_mib,
            "MiB",
            "<= 1.2",
            ratio <= 1.2,
        ),
        Line(f"peak RSS at {rows:,} rows, MB", peak_mb, None, "MB", "<= 300 MB", peak_mb <= 300),
    ]
    for count, measured in peaks.items():
        scenario.notes.append(
            f"{count:,} rows: {count / measured.wall_s:,.0f} req/s, {measured.peak_mib:.0f} MiB"
        )
    return scenario


# ---------------------------------------------------------------------------------------------
# Further scenarios: per-minute budgets, 1,000 in flight, memory across runs


def scenario_b(folder: Path, rows: int) -> Scenario:
    options = ServerOptions(profile="openai", latency_ms=200, rpm=RPM, tpm=1_000_000)
    limits = f"max_in_flight = 256\nrequests_per_minute = {RPM}\ntokens_per_minute = 1000000"
    data = make_input(folder, rows)
    with LocalServer(options) as base, StatsClient(base) as counters:
        job = make_job(folder, "b", data, base, limits)
        ours = measure(pipeline_argv(job), counters)
        prompt = counters()["prompt_tokens_total"] / max(ours.ok_rows, 1)
    ceiling = min(RPM / 60, 1_000_000 / 60 / (prompt + MAX_TOKENS))
    rate = ours.ok_rows / (ours.wall_s - ours.first_request_s)
    share = ours.rate_limited / max(ours.requests, 1)
    scenario = Scenario(f"(b) {rows:,} rows, {RPM:,} req/min + 1M tok/min enforced per minute")
    scenario.lines = [
        Line("of the binding limit, first request to exit", rate / ceiling, None, "%"),
        Line("share of requests answered 429", share, None, "%"),
    ]
    return scenario


def scenario_e(folder: Path, rows: int) -> Scenario:
    """(t) at 1,000 in flight: the ceiling (5,000 req/s) is beyond two cores shared with the
    server; what it shows is the client's CPU per request at that concurrency."""
    data = make_input(folder, rows)
    with LocalServer(no_limits_server()) as base, StatsClient(base) as counters:
        job = make_job(folder, "e", data, base, "max_in_flight = 1000")
        floor = measure(floor_argv(data, base, 1000), counters)
        ours = measure(pipeline_argv(job), counters)
    scenario = Scenario(f"(e) {rows:,} rows, 1,000 in flight (ceiling 5,000 req/s)")
    scenario.lines = [
        Line("req/s, process start to exit", rows / ours.wall_s, rows / floor.wall_s, "req/s"),
        Line("CPU per request", ours.cpu_ms_per(rows), floor.cpu_ms_per(rows), "ms"),
        Line("peak RSS", ours.peak_mib, floor.peak_mib, "MiB"),
    ]
    return scenario


def scenario_f(folder: Path, rows: int) -> Scenario:
    """A hidden cap run twice on one job: the second run starts from what the first learned."""
    data = make_input(folder, rows)
    options = ServerOptions(latency_ms=LATENCY_S * 1000, max_concurrency=HIDDEN_CAP)
    ceiling = HIDDEN_CAP / LATENCY_S
    with LocalServer(options) as base, StatsClient(base) as counters:
        job = make_job(folder, "f", data, base, "max_in_flight = 256")
        runs = [measure(pipeline_argv(job), counters) for _ in range(2)]
    scenario = Scenario(f"(f) {rows:,} rows, hidden cap of {HIDDEN_CAP}, run twice")
    for label, run in zip(("first run", "second run"), runs, strict=True):
        rate = rows / (run.wall_s - run.first_request_s)
        share = run.rate_limited / max(run.requests, 1)
        scenario.lines.append(Line(f"{label}: of 40 / latency", rate / ceiling, None, "%"))
        scenario.lines.append(Line(f"{label}: share answered 429", share, None, "%"))
    return scenario


SIZES = {
    "t": 20_000,
    "s": 5_000,
    "q": 3_000,
    "h": 6_000,
    "x": 1_000_000,
    "m": 1_000_000,
    "b": 9_000,
    "e": 60_000,
    "f": 12_000,
}
RUNNERS: dict[str, Callable[[Path, int], Scenario]] = {
    "t": scenario_t,
    "s": scenario_s,
    "q": scenario_q,
    "h": scenario_h,
    "x": scenario_x,
    "m": scenario_m,
    "b": scenario_b,
    "e": scenario_e,
    "f": scenario_f,
}


def compile_package() -> None:
    """Write the bytecode of the ``pipeline`` package (what a wheel install does)."""
    import compileall

    import pipeline

    compileall.compile_dir(Path(pipeline.__file__).parent, quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--only", nargs="*", default=["t", "s", "q", "h", "x"], choices=RUNNERS)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply request counts")
    parser.add_argument("--repeat", type=int, default=1, help="run each scenario this often")
    parser.add_argument("--rows", type=int, default=None, help="rows (one scenario only)")
    args = parser.parse_args()
    compile_package()
    scenarios: list[Scenario] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for key in args.only:
            rows = args.rows or max(100, int(SIZES[key] * args.scale))
            for n in range(args.repeat):
                print(f"running ({key}) with {rows:,} rows, run {n + 1} ...", flush=True)
                scenario = RUNNERS[key](folder, rows)
                if args.repeat > 1:
                    scenario.name += f" [run {n + 1}]"
                scenarios.append(scenario)
    print()
    print_table(scenarios)
    failed = [s.name for s in scenarios for line in s.lines if line.passed is False]
    print(
        json.dumps([{"scenario": s.name, "lines": [vars(x) for x in s.lines]} for s in scenarios])
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
