"""Pure: a spending cap that requests reserve against before they are sent.

Each request reserves its worst-case cost (its prompt plus ``max_tokens`` of output at the
current price) before it goes out; when it is answered the reservation is replaced by what
the answer really cost. A request whose reservation would take the committed total (spent
plus reserved) past the cap is not sent, and from then on nothing new is: the budget is
*exhausted*, requests in flight finish, and the run stops with its own exit code. Because
every request in flight holds a worst-case reservation, the spend never passes the cap.
An answer that never came (a timeout, a dropped connection) may still have been billed, so
it keeps its whole reservation as spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

ZERO = Decimal(0)
Decision = Literal["reserved", "wait", "exhausted"]


@dataclass(slots=True)
class Budget:
    """Spent and reserved dollars against a cap; touched only from the event loop."""

    cap: Decimal
    spent: Decimal = ZERO
    """Spent by earlier runs and by this run's answered requests."""
    reserved: Decimal = ZERO
    """Held by requests in flight."""
    exhausted: bool = False
    """Set once a reservation was refused: no new request may start."""

    def reserve(self, worst: Decimal) -> Decision:
        """Hold ``worst`` for a request about to be sent, if it fits beside those in flight;
        ``wait`` for them to settle if it would fit without them; else the budget is
        ``exhausted``."""
        if self.exhausted or self.spent + worst > self.cap:
            self.exhausted = True
            return "exhausted"
        if self.spent + self.reserved + worst > self.cap:
            return "wait"
        self.reserved += worst
        return "reserved"

    def settle(self, reserved: Decimal, actual: Decimal | None) -> None:
        """Release a reservation, spending ``actual`` (None: unknown, spend all of it)."""
        self.reserved -= reserved
        self.spent += reserved if actual is None else actual

    @property
    def remaining(self) -> Decimal:
        return max(ZERO, self.cap - self.spent)
