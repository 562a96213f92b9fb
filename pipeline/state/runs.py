"""The job's state folder: a lock, the history of runs, and the requests left unanswered.

::

    <state>/
      LOCK            held (flock) by the run in progress; says which process holds it
      runs.jsonl      one line when a run starts and one when it ends, with how it ended
      sent/           requests about to be sent        (see pipeline.state.journal)
      results/        finished rows                    (see pipeline.state.journal)
      timeline/       each run's attempts and in-flight cap, for `pipeline report`
                                                       (see pipeline.state.timeline)

A run that has a start line and no end line did not finish: it was killed (SIGKILL, power
loss, a crash). Requests of the last run that were sent but have no result are *unanswered*
(:class:`Unanswered`; ``pipeline status`` calls them double-spend suspects, and
``runs.jsonl`` keeps them under the key ``suspects``, as older state folders have them): the
provider may have billed them, and the next run sends them again. Their number is bounded by
the requests in flight plus the results of the last commit window, and is reported when the
next run starts and by ``pipeline status``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

from pipeline.errors import StateError
from pipeline.state.journal import Journal, append_lines

# How a run ended (the "how" of its end line).
COMPLETED = "completed"
INTERRUPTED = "interrupted"
FAILED = "failed"
OVER_BUDGET = "over_budget"
MTIME_SLACK_S = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Unanswered:
    """Requests of one run that were sent and have no result."""

    run: int
    count: int
    worst_cost_usd: Decimal | None
    """Their total worst-case cost; None when a price or ``max_tokens`` is unknown."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    run: int
    started_at: float
    pid: int
    ended_at: float | None = None
    how: str | None = None
    """``completed``, ``interrupted``, ``failed``; None when the run did not end."""
    summary: dict[str, Any] | None = None
    unanswered: Unanswered | None = None
    """What this run found left over by the run before it."""
    fresh: bool = False
    """The run started over (``--fresh``): nothing before it counts."""

    @property
    def ended(self) -> bool:
        return self.how is not None


class StateFolder:
    """One job's state folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.journal = Journal(folder)
        self._runs = folder / "runs.jsonl"
        self._lock_path = folder / "LOCK"
        self._lock: IO[str] | None = None

    # -- the lock ------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the job's lock, or explain who holds it. Creates the folder if needed."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = self._lock_path.open("a+", encoding="utf-8")
        except OSError as exc:
            raise StateError(
                f"cannot use the state folder {self.folder} ({exc.strerror or exc}). "
                "Make it writable, or set [output] state_dir to a folder you can write."
            ) from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StateError(
                f"another run of this job is in progress ({holder}); its state is in "
                f"{self.folder}. Wait for it to finish or stop it: two runs at once would "
                "send the same rows twice."
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        handle.write(f"pid {os.getpid()}, started {started}")
        handle.flush()
        self._lock = handle

    def release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.truncate(0)
            self._lock.close()
            self._lock = None

    def locked_by_other(self) -> str | None:
        """Who holds the lock, if another process does (for ``pipeline status``)."""
        try:
            handle = self._lock_path.open("r", encoding="utf-8")
        except OSError:
            return None
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return handle.read().strip() or "another process"
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return None

    # -- the history of runs -------------------------------------------------------------

    def history(self) -> list[RunRecord]:
        """Every run, oldest first."""
        runs: dict[int, RunRecord] = {}
        try:
            lines = self._runs.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(f"cannot read {self._runs} ({exc.strerror or exc}).") from None
        for line in lines:
            try:
                event = json.loads(line)
                run = int(event["run"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn line
            if event.get("event") == "start":
                found = event.get("suspects")
                unanswered = None
                if found:
                    worst = found.get("worst_cost_usd")
                    unanswered = Unanswered(
                        run=int(found["run"]),
                        count=int(found["count"]),
                        worst_cost_usd=None if worst is None else Decimal(worst),
                    )
                runs[run] = RunRecord(
                    run=run,
                    started_at=float(event["at"]),
                    pid=int(event.get("pid", 0)),
                    unanswered=unanswered,
                    fresh=bool(event.get("fresh", False)),
                )
            elif event.get("event") == "end" and run in runs:
                start = runs[run]
                runs[run] = RunRecord(
                    run=run,
                    started_at=start.started_at,
                    pid=start.pid,
                    ended_at=float(event["at"]),
                    how=str(event["how"]),
                    summary=event.get("summary"),
                    unanswered=start.unanswered,
                    fresh=start.fresh,
                )
        return [runs[key] for key in sorted(runs)]

    def begin_run(self, unanswered: Unanswered | None, *, fresh: bool = False) -> int:
        """Record that a run starts; returns its number."""
        history = self.history()
        run = history[-1].run + 1 if history else 1
        event: dict[str, Any] = {"event": "start", "run": run, "at": time.time()}
        event["pid"] = os.getpid()
        if fresh:
            event["fresh"] = True
        if unanswered is not None:
            worst = unanswered.worst_cost_usd
            event["suspects"] = {
                "run": unanswered.run,
                "count": unanswered.count,
                "worst_cost_usd": None if worst is None else str(worst),
            }
        append_lines(self._runs, [json.dumps(event)])
        return run

    def end_run(self, run: int, how: str, summary: dict[str, Any]) -> None:
        event = {"event": "end", "run": run, "at": time.time(), "how": how, "summary": summary}
        append_lines(self._runs, [json.dumps(event)])

    # -- double spend --------------------------------------------------------------------

    def unanswered(self) -> Unanswered | None:
        """Requests of the last run that were sent and have no result from that run."""
        history = self.history()
        if not history or history[-1].how == COMPLETED:
            return None  # a run that completed left nothing in flight
        last = history[-1]
        if last.summary is not None and "unanswered" in last.summary:
            # A run that ended counted its own unanswered requests.
            unanswered = int(last.summary["unanswered"])
            worst_text = last.summary.get("unanswered_worst_usd")
            if unanswered <= 0:
                return None
            return Unanswered(
                run=last.run,
                count=unanswered,
                worst_cost_usd=None if worst_text is None else Decimal(worst_text),
            )
        count = 0
        worst: Decimal | None = Decimal(0)
        runs = self.journal.results_for("run")
        since = last.started_at - MTIME_SLACK_S
        for intent in self.journal.intents_since(last.run, since):
            if runs.get(intent.row, intent.key) == last.run:
                continue
            count += 1
            if worst is not None and intent.worst_cost_usd is not None:
                worst += intent.worst_cost_usd
            else:
                worst = None
        if count == 0:
            return None
        return Unanswered(run=last.run, count=count, worst_cost_usd=worst)

    # -- money ---------------------------------------------------------------------------

    def spent_usd(self, *, before: int | None = None) -> Decimal | None:
        """What the job has spent since its last fresh start (None: a price was unknown),
        counting only the runs before run ``before`` when it is given.

        A run that ended recorded its cost, and the worst case of requests it left
        unanswered. A run that was killed did not: its results in the journal are summed,
        plus the worst case of the requests it left in flight, which the next run recorded.
        """
        every = self.history()
        history = [r for r in every if before is None or r.run < before]
        current = [r for r in every if r.run == before]
        starts = [index for index, record in enumerate(history) if record.fresh]
        runs = history[starts[-1] :] if starts else history
        if current and current[0].fresh:
            return Decimal(0)
        left_over = {
            r.unanswered.run: r.unanswered for r in [*runs, *current] if r.unanswered is not None
        }
        killed = {r.run for r in runs if r.summary is None or "cost_usd" not in r.summary}
        total = Decimal(0)
        for record in runs:
            if record.run in killed:
                continue
            assert record.summary is not None
            for name in ("cost_usd", "unanswered_worst_usd"):
                value = record.summary.get(name)
                if value is None and (name == "cost_usd" or record.summary.get("unanswered")):
                    return None
                total += Decimal(value or 0)
        if killed:
            for result in self.journal.iter_results():
                if result.run in killed:
                    if result.cost_usd is None:
                        return None
                    total += result.cost_usd
            for run in killed:
                unanswered = left_over.get(run)
                if unanswered is not None:
                    if unanswered.worst_cost_usd is None:
                        return None
                    total += unanswered.worst_cost_usd
        return total
