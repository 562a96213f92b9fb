"""Throughput against the provider's ceiling, side by side with a hand-written baseline.

Runs ``pipeline run`` (a real process) against the built-in server on 127.0.0.1 in four
scenarios and prints, for each: the achieved rate as a fraction of the ceiling, the share of
requests answered 429, and the client's CPU time per request (user + system time of the
client process alone, from ``os.wait4``; the server's CPU is never counted).

(a) no limits, 200 ms latency, max_in_flight 256: ceiling 1,280 requests/s;
(b) openai profile, server enforces 6,000 requests/min and 1,000,000 tokens/min, the job is
    told the same: the ceiling is the binding limit;
(c) deepseek profile with a hidden cap of 40 in flight and max_in_flight 500: ceiling
    40 / latency; the rate is measured after the first 20 s, from the server's counters;
(d) the baseline: the same requests as (a) sent by ``openai.AsyncOpenAI`` under an
    ``asyncio.Semaphore(256)`` (bench/baseline_openai.py), so throughput and CPU per request
    are compared in the same run;
(e) (a) with max_in_flight 1,000: the client's CPU per request at that concurrency;
(f) (c) run twice on the same job: the second run starts from the limit the first learned
    (rates counted from the first answer, no warm-up).

    python bench/throughput.py                 # all scenarios (about 9 minutes)
    python bench/throughput.py --only a d      # some of them
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.server.options import ServerOptions
from pipeline.server.process import LocalServer, StatsClient, server_stats

HERE = Path(__file__).resolve().parent
MAX_TOKENS = 32


@dataclass
class Result:
    name: str
    requests: int
    ok_rows: int
    wall_s: float
    cpu_s: float
    rate: float
    ceiling: float
    share_429: float
    notes: list[str] = field(default_factory=list)

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.cpu_s / max(self.requests, 1)


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


def run_measured(argv: list[str], sampler: Any = None) -> tuple[float, float, str]:
    """Run a process; return (wall seconds, its own CPU seconds, stdout)."""
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
        stop = threading.Event()
        thread = None
        if sampler is not None:
            thread = threading.Thread(target=sampler, args=(stop,), daemon=True)
            thread.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        stop.set()
        if thread is not None:
            thread.join()
        out.seek(0)
        text = out.read()
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{argv} failed with {proc.returncode}:\n{text[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, text


def pipeline_argv(job: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", str(job), "--fresh"]


def rows_ok(folder: Path, name: str) -> int:
    table = pq.read_table(folder / f"{name}.parquet", columns=["status"])
    return sum(1 for s in table.column("status").to_pylist() if s == "ok")


def scenario_a(folder: Path, rows: int, *, in_flight: int = 256, name: str = "a") -> Result:
    options = ServerOptions(latency_ms=200, keepalive_after_ms=60_000)
    with LocalServer(options) as base:
        limits = f"max_in_flight = {in_flight}"
        job = make_job(folder, name, make_input(folder, rows), base, limits)
        wall, cpu, _ = run_measured(pipeline_argv(job))
        stats = server_stats(base)
    requests = stats["requests_total"]
    return Result(
        name=f"({name}) no limits, 200 ms, {in_flight:,} in flight",
        requests=requests,
        ok_rows=rows_ok(folder, name),
        wall_s=wall,
        cpu_s=cpu,
        rate=rows / wall,
        ceiling=in_flight / 0.2,
        share_429=stats["429"] / max(requests, 1),
        notes=["rate = rows / wall time of the whole process, start to exit"],
    )


def scenario_e(folder: Path, rows: int) -> Result:
    """(a) at 1,000 in flight: the ceiling (5,000 req/s) is beyond two cores shared with the
    server; what it shows is the client's CPU per request at that concurrency."""
    result = scenario_a(folder, rows, in_flight=1000, name="e")
    result.notes.append("ceiling 5,000 req/s: beyond 2 cores; compare CPU ms/req with (a)")
    return result


def scenario_b(folder: Path, rows: int) -> Result:
    options = ServerOptions(profile="openai", latency_ms=200, rpm=6000, tpm=1_000_000)
    limits = "max_in_flight = 256\nrequests_per_minute = 6000\ntokens_per_minute = 1000000"
    with LocalServer(options) as base:
        job = make_job(folder, "b", make_input(folder, rows), base, limits)
        wall, cpu, text = run_measured(pipeline_argv(job))
        stats = server_stats(base)
    requests = stats["requests_total"]
    tokens_per_request = stats["prompt_tokens_total"] / max(stats["ok"], 1) + MAX_TOKENS
    ceiling = min(6000 / 60, 1_000_000 / 60 / tokens_per_request)
    binding = "requests/min" if 1_000_000 / 60 / tokens_per_request >= 6000 / 60 else "tokens/min"
    run_wall = _run_wall(text) or wall
    return Result(
        name="(b) openai profile, 6,000 req/min + 1M tok/min",
        requests=requests,
        ok_rows=rows_ok(folder, "b"),
        wall_s=wall,
        cpu_s=cpu,
        rate=rows / run_wall,
        ceiling=ceiling,
        share_429=stats["429"] / max(requests, 1),
        notes=[
            f"binding limit: {binding} ({ceiling:.1f} req/s at "
            f"{tokens_per_request:.0f} metered tokens per request)",
            f"rate = rows / the run's own wall time ({run_wall:.1f} s, after start-up)",
        ],
    )


HIDDEN_CAP = 40
HIDDEN_CAP_LATENCY_S = 0.2


def scenario_c(folder: Path, rows: int) -> Result:
    return hidden_cap_runs(folder, rows, runs=1, warmup_s=20.0, name="c")[0]


def scenario_f(folder: Path, rows: int) -> Result:
    """(c) twice on the same job and server: the second run starts from the limit the first
    one learned. Rates count from each run's first answer (no warm-up): where memory shows."""
    first, second = hidden_cap_runs(folder, rows, runs=2, warmup_s=0.0, name="f")
    second.name = "(f) (c) twice, second run (from the first answer)"
    second.notes = [
        f"first run, same count: {first.rate:.1f} req/s ({first.rate / first.ceiling:.1%}), "
        f"{first.share_429:.2%} 429s; the second starts from what the first learned"
    ]
    return second


def hidden_cap_runs(
    folder: Path, rows: int, *, runs: int, warmup_s: float, name: str
) -> list[Result]:
    """Run one job ``runs`` times (``--fresh``) against one deepseek-like server with a hidden
    cap; the rate of each is the server's ok answers/s after its first ``warmup_s`` seconds."""
    options = ServerOptions(latency_ms=HIDDEN_CAP_LATENCY_S * 1000, max_concurrency=HIDDEN_CAP)
    results: list[Result] = []
    with LocalServer(options) as base, StatsClient(base) as counters:
        job = make_job(folder, name, make_input(folder, rows), base, "max_in_flight = 500")
        for _ in range(runs):
            counters.reset()
            samples: list[tuple[float, int]] = []

            def sample(stop: threading.Event, samples: list[tuple[float, int]] = samples) -> None:
                while not stop.is_set():
                    samples.append((time.monotonic(), counters()["ok"]))
                    stop.wait(0.5)

            wall, cpu, _ = run_measured(pipeline_argv(job), sampler=sample)
            stats = counters()
            first = next((t for t, ok in samples if ok > 0), samples[0][0])
            after = [(t, ok) for t, ok in samples if t - first >= warmup_s]
            steady = 0.0
            if len(after) > 1:
                steady = (after[-1][1] - after[0][1]) / (after[-1][0] - after[0][0])
            requests = stats["requests_total"]
            ok_rows = rows_ok(folder, name)
            notes = [f"rate = server ok answers/s after the first {warmup_s:g} s"]
            if ok_rows != rows:
                notes.append(f"FAILED ROWS: {rows - ok_rows}")
            results.append(
                Result(
                    name=f"(c) deepseek, hidden cap {HIDDEN_CAP}, max_in_flight 500",
                    requests=requests,
                    ok_rows=ok_rows,
                    wall_s=wall,
                    cpu_s=cpu,
                    rate=steady,
                    ceiling=HIDDEN_CAP / HIDDEN_CAP_LATENCY_S,
                    share_429=stats["429"] / max(requests, 1),
                    notes=notes,
                )
            )
    return results


def scenario_d(folder: Path, rows: int) -> Result:
    options = ServerOptions(latency_ms=200, keepalive_after_ms=60_000)
    with LocalServer(options) as base:
        argv = [
            sys.executable,
            str(HERE / "baseline_openai.py"),
            str(make_input(folder, rows)),
            base,
            "--concurrency",
            "256",
            "--max-tokens",
            str(MAX_TOKENS),
        ]
        wall, cpu, text = run_measured(argv)
        stats = server_stats(base)
    report = json.loads(text.strip().splitlines()[-1])
    requests = stats["requests_total"]
    return Result(
        name="(d) baseline: openai.AsyncOpenAI + Semaphore(256)",
        requests=requests,
        ok_rows=report["ok"],
        wall_s=wall,
        cpu_s=cpu,
        rate=rows / wall,
        ceiling=256 / 0.2,
        share_429=stats["429"] / max(requests, 1),
        notes=["rate = rows / wall time of the whole process, start to exit"],
    )


def _run_wall(text: str) -> float | None:
    for line in text.splitlines():
        if "wall time" in line:
            for token in line.replace("│", " ").split():
                try:
                    return float(token)
                except ValueError:
                    continue
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--only", nargs="*", default=["a", "b", "c", "d", "e", "f"])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply request counts")
    args = parser.parse_args()
    sizes = {"a": 60_000, "b": 9_000, "c": 12_000, "d": 20_000, "e": 60_000, "f": 12_000}
    runners = {
        "a": scenario_a,
        "b": scenario_b,
        "c": scenario_c,
        "d": scenario_d,
        "e": scenario_e,
        "f": scenario_f,
    }
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for key in args.only:
            rows = max(100, int(sizes[key] * args.scale))
            print(f"running {key} with {rows:,} rows ...", flush=True)
            results[key] = runners[key](folder, rows)
    print()
    header = f"{'scenario':<50} {'rows ok':>8} {'req/s':>8} {'ceiling':>8} {'of ceil':>8} "
    header += f"{'429s':>6} {'CPU ms/req':>10} {'wall s':>7}"
    print(header)
    for r in results.values():
        print(
            f"{r.name:<50} {r.ok_rows:>8,} {r.rate:>8.1f} {r.ceiling:>8.1f} "
            f"{r.rate / r.ceiling:>8.1%} {r.share_429:>6.2%} {r.cpu_ms_per_request:>10.3f} "
            f"{r.wall_s:>7.1f}"
        )
        for note in r.notes:
            print(f"    {note}")
    if "a" in results and "d" in results:
        a, d = results["a"], results["d"]
        print()
        print(f"throughput, pipeline / baseline:       {a.rate / d.rate:.2f}x")
        cpu_ratio = a.cpu_ms_per_request / d.cpu_ms_per_request
        print(f"CPU per request, pipeline / baseline:  {cpu_ratio:.3f}")
    summary = {
        k: {
            "rate": r.rate,
            "ceiling": r.ceiling,
            "fraction": r.rate / r.ceiling,
            "share_429": r.share_429,
            "cpu_ms_per_request": r.cpu_ms_per_request,
            "ok_rows": r.ok_rows,
            "wall_s": r.wall_s,
        }
        for k, r in results.items()
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
