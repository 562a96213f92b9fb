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
