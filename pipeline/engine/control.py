"""Whether a run goes on: stops, hard stops, aborts, and the signals that ask for them.

Three ways to end early, from gentle to abrupt:

- a **stop** (the first SIGINT/SIGTERM, :meth:`RunControl.stop`, or the budget's cap): no new
  requests; those in flight may finish and are recorded;
- a **hard stop** (a second signal, or the grace period running out): requests in flight are
  cancelled; finished rows are kept, and the output is not written;
- an **abort** (a refused API key, an endpoint never reached): the whole job stops at once
  and the run raises the first error that caused it.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import anyio
from anyio import CancelScope

from pipeline.errors import PipelineError


class RunControl:
    """The run's stop flags and the cancel scopes they act on."""

    def __init__(self) -> None:
        self.stopping = False
        """No new request is sent."""
        self.over_budget = False
        """The stop came from the budget: the next request could have passed its cap."""
        self.hard_stop = False
        """Requests in flight were cancelled: the output is not written."""
        self.fatal: PipelineError | None = None
        """The error that aborted the job, raised when the run ends."""
        self._producer: CancelScope | None = None
        self._work: CancelScope | None = None

    def bind(self, *, producer: CancelScope | None = None, work: CancelScope | None = None) -> None:
        """The scopes a stop cancels: reading new rows (``producer``), and sending (``work``)."""
        if producer is not None:
            self._producer = producer
        if work is not None:
            self._work = work

    def stop(self) -> None:
        """Stop sending new requests; requests in flight may finish."""
        self.stopping = True
        if self._producer is not None:
            self._producer.cancel()

    def stop_for_budget(self) -> None:
        """The next request would take the spend past the cap: send nothing new."""
        if not self.over_budget:
            self.over_budget = True
            self.stop()

    def stop_now(self) -> None:
        """Cancel the requests in flight too."""
        self.hard_stop = True
        self.cancel_work()

    def cancel_work(self) -> None:
        if self._work is not None:
            self._work.cancel()

    def abort(self, error: PipelineError) -> None:
        """Stop the whole job at once; the first error is the one the run raises."""
        if self.fatal is None:
            self.fatal = error
        self.stopping = True
        self.cancel_work()

    @property
    def interrupted(self) -> bool:
        """The run was stopped, and not by the budget."""
        return self.stopping and not self.over_budget

    async def watch_signals(
        self, *, grace_s: float, notice: Callable[[str], None], in_flight: Callable[[], int]
    ) -> None:
        """The first SIGINT/SIGTERM stops new requests and waits up to ``grace_s`` for those
        in flight; a second one (or the end of the wait) cancels them."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if self.stopping:
                    notice("stopping now; finished rows are kept.")
                    self.stop_now()
                    return
                self.stop()
                notice(
                    f"stopping: no new requests; waiting up to {grace_s:g} s for "
                    f"{in_flight()} in flight. Press Ctrl-C again to stop at once."
                )
                with anyio.move_on_after(grace_s):
                    async for _ in signals:
                        notice("stopping now; finished rows are kept.")
                        self.hard_stop = True
                        break
                self.cancel_work()
                return
