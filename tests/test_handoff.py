"""The work queue between the producer and the workers (pipeline.engine.handoff)."""

from __future__ import annotations

import anyio

from pipeline.engine.handoff import WorkQueue
from pipeline.rows.plan import PlannedRow


def planned(row: int) -> PlannedRow:
    return PlannedRow(row, f"k{row}", b"{}", None)


def test_rows_come_out_in_order_and_none_after_close() -> None:
    async def main() -> list[int | None]:
        queue = WorkQueue(8)
        async with queue:
            for row in range(5):
                await queue.put(planned(row))
        taken = [await queue.take() for _ in range(6)]
        return [None if p is None else p.row for p in taken]

    assert anyio.run(main) == [0, 1, 2, 3, 4, None]


def test_the_producer_waits_when_full_and_refills_at_half() -> None:
    """At most ``size`` rows wait; the producer wakes once half of them are taken."""

    async def main() -> list[tuple[str, int]]:
        queue = WorkQueue(4)
        events: list[tuple[str, int]] = []

        async def produce() -> None:
            async with queue:
                for row in range(8):
                    await queue.put(planned(row))
                    events.append(("put", row))

        async with anyio.create_task_group() as group:
            group.start_soon(produce)
            await anyio.wait_all_tasks_blocked()
            assert [e for e in events if e[0] == "put"] == [("put", r) for r in range(4)]
            taken = await queue.take()  # 3 left: more than half, the producer sleeps on
            assert taken is not None
            events.append(("take", taken.row))
            await anyio.wait_all_tasks_blocked()
            assert events[-1] == ("take", 0)
            taken = await queue.take()  # 2 left: half, the producer refills to 4
            assert taken is not None
            events.append(("take", taken.row))
            await anyio.wait_all_tasks_blocked()
            assert events[-3:] == [("take", 1), ("put", 4), ("put", 5)]
            while (row := await queue.take()) is not None:
                events.append(("take", row.row))
        return events

    events = anyio.run(main)
    assert [row for kind, row in events if kind == "take"] == list(range(8))


def test_waiting_workers_wake_for_a_row_and_for_the_end() -> None:
    async def main() -> list[int | None]:
        queue = WorkQueue(4)
        got: list[int | None] = []

        async def worker() -> None:
            row = await queue.take()
            got.append(None if row is None else row.row)

        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(worker)
            await anyio.wait_all_tasks_blocked()
            await queue.put(planned(7))
            await anyio.wait_all_tasks_blocked()
            queue.close()
        return got

    assert sorted(anyio.run(main), key=lambda r: -1 if r is None else r) == [None, None, 7]


def test_a_cancelled_worker_sends_no_row() -> None:
    """A row is taken with a check for a cancellation: a cancelled worker gets none."""

    async def main() -> tuple[object, bool]:
        queue = WorkQueue(4)
        await queue.put(planned(1))
        taken: object = "nothing"
        with anyio.CancelScope() as scope:
            scope.cancel()
            taken = await queue.take()
        return taken, scope.cancelled_caught

    assert anyio.run(main) == ("nothing", True)
