from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import StateError
from pipeline.money.pricing import Usage
from pipeline.results import RowResult
from pipeline.state.journal import BUCKET_ROWS, Intent, Journal
from pipeline.state.runs import StateFolder


def result(row: int, key: str | None = None, status: str = "ok") -> RowResult:
    return RowResult(
        key=key or f"k{row}",
        row=row,
        status=status,  # type: ignore[arg-type]
        response=f"answer {row} ✓",
        usage=Usage(prompt_tokens=row, completion_tokens=2),
        cost_usd=Decimal("0.000001"),
        attempts=1,
        run=1,
    )


def test_results_round_trip_by_bucket(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    journal.append_results([result(0), result(5), result(BUCKET_ROWS + 1)])
    assert set(journal.read_bucket(0)) == {"k0", "k5"}
    assert journal.read_bucket(0)["k5"] == result(5)
    assert set(journal.read_bucket(1)) == {f"k{BUCKET_ROWS + 1}"}
    assert journal.read_bucket(7) == {}
    assert journal.result_buckets() == [0, 1]


def test_last_record_of_a_key_wins(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    journal.append_results([result(3, status="failed")])
    journal.append_results([result(3)])
    assert journal.read_bucket(0)["k3"].status == "ok"


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.integers(0, 200), min_size=1, max_size=30, unique=True), cut=st.data())
def test_a_torn_tail_loses_only_the_torn_record(
    tmp_path_factory: pytest.TempPathFactory, rows: list[int], cut: st.DataObject
) -> None:
    folder = tmp_path_factory.mktemp("j")
    journal = Journal(folder)
    journal.open()
    for row in rows:
        journal.append_results([result(row)])
    path = folder / "results" / "000000.jsonl"
    data = path.read_bytes()
    last_line_start = data.rstrip(b"\n").rfind(b"\n") + 1
    keep = cut.draw(st.integers(last_line_start, len(data) - 1))
    path.write_bytes(data[:keep])  # a crash in the middle of the last write
    found = journal.read_bucket(0)
    assert set(found) >= {f"k{r}" for r in rows[:-1]}
    assert set(found) <= {f"k{r}" for r in rows}
    for record in found.values():
        assert record == result(record.row)


def test_intents_of_a_run(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    intents = [Intent(key=f"k{i}", row=i, run=2, worst_cost_usd=Decimal("0.5")) for i in range(3)]
    journal.append_intents([*intents, Intent(key="x", row=9, run=1, worst_cost_usd=None)])
    assert list(journal.intents_since(2, 0.0)) == intents


def test_unwritable_state_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(StateError, match="cannot use the state folder"):
        Journal(blocker).open()
    with pytest.raises(StateError, match="cannot use the state folder"):
        StateFolder(blocker).acquire()


def test_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    first = StateFolder(tmp_path / "s")
    first.acquire()
    second = StateFolder(tmp_path / "s")
    with pytest.raises(StateError, match=r"another run of this job is in progress \(pid \d+"):
        second.acquire()
    assert second.locked_by_other() is not None
    first.release()
    second.acquire()
    second.release()


def test_history_and_suspects(tmp_path: Path) -> None:
    state = StateFolder(tmp_path / "s")
    state.acquire()
    state.journal.open()
    run = state.begin_run(None)
    state.journal.append_intents(
        [Intent(key=f"k{i}", row=i, run=run, worst_cost_usd=Decimal("0.25")) for i in range(4)]
    )
    state.journal.append_results([RowResult(key="k0", row=0, status="ok", run=run)])
    # The process dies here: no end line.
    with (state.folder / "runs.jsonl").open("a") as handle:
        handle.write('{"event": "end", "ru')  # a torn line
    history = state.history()
    assert [r.run for r in history] == [1]
    assert not history[0].ended
    unanswered = state.unanswered()
    assert unanswered is not None
    assert (unanswered.run, unanswered.count, unanswered.worst_cost_usd) == (1, 3, Decimal("0.75"))
    state.release()


def test_appending_after_a_torn_tail_keeps_the_new_records(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    journal.append_results([result(1)])
    path = tmp_path / "results" / "000000.jsonl"
    with path.open("ab") as handle:
        handle.write(b'{"key": "k2", "row": 2, "sta')  # a write cut short by a full disk
    journal.append_results([result(3)])
    assert set(journal.read_bucket(0)) == {"k1", "k3"}


def test_cheap_scans_agree_with_full_records(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    journal.append_results([result(1), result(2, status="failed"), result(3)])
    journal.append_results([RowResult(key="k3", row=3, status="failed", run=4)])
    with (tmp_path / "results" / "000000.jsonl").open("ab") as handle:
        handle.write(b'{"key":"k9","row":9,"status":"ok","respo')  # torn
    full = journal.read_bucket(0)
    assert journal.bucket_status(0) == {key: r.status for key, r in full.items()}
    assert journal.bucket_runs(0) == {key: r.run for key, r in full.items()}
    assert "k9" not in journal.bucket_status(0)


@settings(max_examples=50, deadline=None)
@given(
    texts=st.lists(st.text(max_size=40) | st.just(',"tokens":[9,9,9,9],"cost_usd":"5"'), max_size=8)
)
def test_spent_agrees_with_full_records_whatever_the_answers_say(
    tmp_path_factory: pytest.TempPathFactory, texts: list[str]
) -> None:
    journal = Journal(tmp_path_factory.mktemp("spent"))
    journal.open()
    records = [
        RowResult(
            key=f"k{i}",
            row=i * 1000,  # several buckets
            status=("ok", "failed", "stopped")[i % 3],  # type: ignore[arg-type]
            response=text,
            structured={"note": text, "run": 1} if i % 2 else None,
            usage=Usage(
                prompt_tokens=i, completion_tokens=2 * i, cached_tokens=1, reasoning_tokens=i
            ),
            cost_usd=Decimal(f"0.00000{i}"),
            run=1,
        )
        for i, text in enumerate(texts)
    ]
    journal.append_results(records)
    with (journal.results_dir / "000000.jsonl").open("ab") as handle:
        handle.write(b'{"key":"k9","row":9,"status":"ok","response":"x","tokens":[5,5,5,5],"co')
    usage, cost = journal.spent()
    expected = sum((r.usage for r in journal.iter_results()), Usage())
    assert usage == expected
    assert cost == sum((r.cost_usd or Decimal(0) for r in journal.iter_results()), Decimal(0))


def test_spent_is_unknown_when_a_record_has_no_price(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    journal.append_results([result(1), RowResult(key="k2", row=2, status="ok", run=1)])
    usage, cost = journal.spent()
    assert usage.prompt_tokens == 1
    assert cost is None
