"""The seam through which a run shares its limiter and budget with other runs.

A single-machine run owns its :class:`~pipeline.provider.limiter.Limiter` and its
:class:`~pipeline.money.budget.Budget`. A shard of a cluster run (:mod:`pipeline.cluster`)
gets both from :class:`SharedLimits` instead: a limiter that hands out permits leased from the
cluster's coordinator, and a budget that reserves against dollars leased from it. The engine
sees the same two types either way.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pipeline.engine.accounting import Accounts
    from pipeline.money.budget import Budget
    from pipeline.provider.limiter import Limiter
    from pipeline.provider.limits import LimiterConfig


class SharedLimits(Protocol):
    """A limiter and a budget shared with other runs."""

    def limiter(self, config: LimiterConfig) -> Limiter:
        """The run's limiter, for a job whose own limits are ``config``."""
        ...

    def budget_for(self, cap: Decimal) -> Budget:
        """The run's budget, for a job whose cap is ``cap`` (the shared books know what
        every run spent)."""
        ...

    def bind(self, accounts: Accounts) -> None:
        """The run's books are open: the shared budget wakes their waiters through them."""
        ...
