from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError, JobFileError
from pipeline.io.sources import iter_batches, resolve_input, scan_input


def write_jsonl(path: Path, rows: list[dict[str, object]], *, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_folder_glob_and_file_resolve_in_name_order(tmp_path: Path) -> None:
    pq.write_table(pa.table({"a": [1]}), tmp_path / "b.parquet")
    write_jsonl(tmp_path / "a.jsonl", [{"a": 2}])
    write_jsonl(tmp_path / "c.ndjson.gz", [{"a": 3}], gz=True)
    (tmp_path / "notes.txt").write_text("ignored in folders")
    names = [f.path.name for f in resolve_input(str(tmp_path), "job")]
    assert names == ["a.jsonl", "b.parquet", "c.ndjson.gz"]
    names = [f.path.name for f in resolve_input(str(tmp_path / "*.parquet"), "job")]
    assert names == ["b.parquet"]


def test_missing_input_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(JobFileError, match=r"\[input\] path: no such file"):
        resolve_input(str(tmp_path / "none.parquet"), "job.toml")
    with pytest.raises(JobFileError, match="matches no file"):
        resolve_input(str(tmp_path / "*.jsonl"), "job.toml")


def test_unsupported_file_type(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a\n1\n")
    with pytest.raises(JobFileError, match=r"\.parquet, \.jsonl"):
        resolve_input(str(tmp_path / "x.csv"), "job.toml")


def test_batches_span_files_keep_order_and_fill_missing_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"a": list(range(5)), "b": ["x"] * 5}), tmp_path / "1.parquet")
    write_jsonl(tmp_path / "2.jsonl", [{"a": 5 + i} for i in range(4)])
    files = resolve_input(str(tmp_path), "job")
    batches = list(iter_batches(files, ["a", "b"], batch_rows=2))
    assert [v for b in batches for v in b.column(0).to_pylist()] == list(range(9))
    assert batches[-1].column(1).to_pylist() == [None, None]
    assert max(b.num_rows for b in batches) == 2
    limited = list(iter_batches(files, ["a"], limit=6, batch_rows=4))
    assert [v for b in limited for v in b.column(0).to_pylist()] == list(range(6))


def test_scan_counts_rows_and_columns(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "x.jsonl", [{"id": i, "t": "x"} for i in range(10)] + [{"id": 10, "u": 1}]
    )
    scan = scan_input(resolve_input(str(tmp_path), "j"), id_column="id", limit=None, job_source="j")
    assert scan.rows == 11
    assert scan.columns == {"id", "t", "u"}


def test_duplicate_ids_are_reported_with_both_rows(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["a", "b", "c", "b"]}), tmp_path / "x.parquet")
    files = resolve_input(str(tmp_path), "j")
    with pytest.raises(InputError, match=r"'b'.*rows 1 and 3"):
        scan_input(files, id_column="id", limit=None, job_source="j")
    # The duplicate lies beyond the limit: fine.
    assert scan_input(files, id_column="id", limit=3, job_source="j").rows == 3


def test_null_and_missing_ids(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["a", None]}), tmp_path / "x.parquet")
    with pytest.raises(InputError, match="null in row 1"):
        scan_input(resolve_input(str(tmp_path), "j"), id_column="id", limit=None, job_source="j")
    with pytest.raises(JobFileError, match=r"\[input\] id_column"):
        scan_input(resolve_input(str(tmp_path), "j"), id_column="nope", limit=None, job_source="j")


def test_bad_json_line_is_reported_with_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(InputError, match=r"x.jsonl: line 3 is not valid JSON"):
        scan_input(resolve_input(str(path), "j"), id_column=None, limit=None, job_source="j")


def test_gzipped_jsonl_streams(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl.gz", [{"t": str(i)} for i in range(3000)], gz=True)
    files = resolve_input(str(path), "j")
    assert scan_input(files, id_column=None, limit=None, job_source="j").rows == 3000
    batches = list(iter_batches(files, ["t"], batch_rows=1000))
    assert [b.num_rows for b in batches] == [1000, 1000, 1000]


# -- a byte-order mark (issue 12) ----------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_starting_with_a_byte_order_mark_is_read(tmp_path: Path, gz: bool) -> None:
    """Windows tools (Notepad, PowerShell, Excel) write UTF-8 with a BOM first."""
    text = '\ufeff{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n'
    path = tmp_path / ("x.jsonl.gz" if gz else "x.jsonl")
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    files = resolve_input(str(path), "j")
    scan = scan_input(files, id_column="id", limit=None, job_source="j")
    assert (scan.rows, scan.columns) == (2, {"id", "text"})
    [batch] = iter_batches(files, ["id", "text"])
    assert batch.to_pylist() == [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}]


def test_a_byte_order_mark_after_the_start_is_an_error_naming_its_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n\ufeff{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(InputError) as caught:
        scan_input(resolve_input(str(path), "j"), id_column=None, limit=None, job_source="j")
    assert str(caught.value) == (
        f"{path}: line 2 is not valid JSON (it starts with a byte-order mark, which only the "
        "start of the file may have). Fix that line."
    )


# -- one type per column (issue 12) --------------------------------------------------------


def mixed_error(path: Path, columns: list[str], batch_rows: int = 2048) -> str:
    files = resolve_input(str(path), "j")
    scan_input(files, id_column=None, limit=None, job_source="j")  # the scan reads any type
    with pytest.raises(InputError) as caught:
        list(iter_batches(files, columns, batch_rows=batch_rows))
    return str(caught.value)


def test_mixed_types_name_the_column_the_line_and_both_types(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n{"text": null}\n{}\n{"text": "c"}\n\n{"text": 5}\n')
    assert mixed_error(path, ["text"]) == (
        f'{path}: line 6: column "text" is a number here but text on earlier lines; '
        "make the column one type."
    )


def test_mixed_types_are_found_across_batches(tmp_path: Path) -> None:
    """Each batch alone is one type; the file is not."""
    rows: list[dict[str, object]] = [{"n": i} for i in range(5)] + [{"n": True}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    assert mixed_error(path, ["n"], batch_rows=2) == (
        f'{path}: line 6: column "n" is true/false here but a number on earlier lines; '
        "make the column one type."
    )


def test_mixed_contents_and_huge_numbers_name_their_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"tags": [1]}, {"tags": [2]}, {"tags": ["x"]}])
    message = mixed_error(path, ["tags"])
    assert message.startswith(f'{path}: line 3: column "tags" holds values whose contents')
    assert message.endswith("make the column one type.")
    path.write_text('{"n": 1}\n{"n": 2}\n{"n": 123456789012345678901234567890}\n')
    assert mixed_error(path, ["n"]) == (
        f'{path}: line 3: column "n" holds a number too large for 64 bits; make it smaller, '
        "or write the column's values in quotes, as text."
    )


def test_one_type_per_column_allows_nulls_mixed_numbers_and_unread_columns(
    tmp_path: Path,
) -> None:
    rows: list[dict[str, object]] = [
        {"n": 1, "other": "x"},
        {"n": None, "other": 2},
        {"n": 2.5, "other": [3]},
    ]
    files = resolve_input(str(write_jsonl(tmp_path / "x.jsonl", rows)), "j")
    assert scan_input(files, id_column=None, limit=None, job_source="j").rows == 3
    [batch] = iter_batches(files, ["n"])
    assert batch.column(0).to_pylist() == [1.0, None, 2.5]
