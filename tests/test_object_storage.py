"""Issue 13, part 1: inputs and outputs in object storage and on the Hub.

S3 is a real S3-compatible server started here on 127.0.0.1 (moto in server mode), reached
over HTTP through the code users run (fsspec's s3fs, found by AWS_ENDPOINT_URL); the Hub is
a local folder standing in for ``huggingface_hub.HfFileSystem``, read through the same code
path as the real one. The requests go to the built-in server.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from moto.server import ThreadedMotoServer

from pipeline.cli.commands import cli
from pipeline.errors import JobFileError, StateError
from pipeline.io import remote
from pipeline.io.sinks import OutputWriter, check_writable
from pipeline.io.sources import iter_batches, resolve_input, scan_input
from pipeline.job.load import parse_job
from pipeline.job.spec import Overrides, apply_overrides
from pipeline.results import RowResult
from pipeline.server.process import reset_server_stats, server_stats
from pipeline.testing import local_server as start_local_server

SECRET = "moto-secret-0123456789abcdef"
"""The secret key the tests use: it must never be written anywhere."""
_BUCKETS = itertools.count()


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


class Bucket:
    """A fresh bucket on the moto server, and the AWS variables that reach it."""

    def __init__(self, endpoint: str) -> None:
        self.name = f"bucket-{next(_BUCKETS)}"
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
        )
        self.client.create_bucket(Bucket=self.name)

    def url(self, key: str) -> str:
        return f"s3://{self.name}/{key}"

    def put(self, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)
        return self.url(key)

    def put_parquet(self, key: str, table: pa.Table) -> str:
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return self.put(key, sink.getvalue())

    def get(self, key: str) -> bytes:
        body: bytes = self.client.get_object(Bucket=self.name, Key=key)["Body"].read()
        return body

    def objects(self) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.name)
        return sorted(item["Key"] for item in listed.get("Contents", []))

    def unfinished_uploads(self) -> list[dict[str, Any]]:
        uploads: list[dict[str, Any]] = self.client.list_multipart_uploads(Bucket=self.name).get(
            "Uploads", []
        )
        return uploads


@pytest.fixture
def bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Bucket:
    """A bucket, with AWS_* set (for this process and the runs it starts) so that s3:// URLs
    reach it; nothing is read from ~/.aws. The current folder is ``tmp_path``."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.chdir(tmp_path)
    return Bucket(moto_endpoint)


@pytest.fixture(scope="module")
def llm() -> Iterator[str]:
    """The built-in server, shared by the tests that send few or no requests."""
    with start_local_server(latency_ms=1) as url:
        yield url


def rows_table(count: int, start: int = 0) -> pa.Table:
    ids = [f"r{i}" for i in range(start, start + count)]
    return pa.table({"rid": ids, "text": [f"text {i}" for i in range(start, start + count)]})


def write_job(
    folder: Path, *, input_: str, output: str, base_url: str, extra: str = "", name: str = "s3job"
) -> Path:
    job = folder / "job.toml"
    job.write_text(
        f"""
name = "{name}"
[input]
path = "{input_}"
id_column = "rid"
[request]
base_url = "{base_url}"
model = "deepseek/deepseek-v4-flash"
prompt = "Label {{text}}."
max_tokens = 16
thinking = {{ type = "disabled" }}
[limits]
max_in_flight = 8
[output]
path = "{output}"
{extra}
"""
    )
    return job


def invoke(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args], env={"WAVESPEED_API_KEY": None})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


def read_output(bucket: Bucket, key: str) -> pa.Table:
    return pq.read_table(io.BytesIO(bucket.get(key)))


def assert_no_secret(*places: Path | str) -> None:
    for place in places:
        if isinstance(place, str):
            assert SECRET not in place
            continue
        for path in [place] if place.is_file() else place.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------------------------------
# A job in a bucket, end to end.


def test_a_job_reads_its_input_from_a_bucket_and_writes_its_output_there(
    bucket: Bucket, tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=1)
    source = bucket.put_parquet("in/rows.parquet", rows_table(300))
    job = write_job(tmp_path, input_=source, output=bucket.url("out/labels.parquet"), base_url=base)
    code, said = invoke("run", job)
    assert code == 0, said
    out = read_output(bucket, "out/labels.parquet")
    assert out["id"].to_pylist() == [f"r{i}" for i in range(300)]
    assert set(out["status"].to_pylist()) == {"ok"}
    assert server_stats(base)["requests_total"] == 300
    # The state is local, under the current folder, with the summary beside it.
    state = tmp_path / ".pipeline" / "state" / "s3job"
    assert (state / "results").is_dir()
    summary = json.loads((state.parent / "s3job.summary.json").read_text())
    assert summary["output"] == bucket.url("out/labels.parquet")
    assert summary["this_run"]["rows_ok"] == 300
    assert ".pipeline/state/s3job.summary.json" in said
    assert bucket.url("out/labels.parquet") in said
    # Nothing but the output was left in the bucket; no upload was left unfinished.
    assert bucket.objects() == ["in/rows.parquet", "out/labels.parquet"]
    assert bucket.unfinished_uploads() == []
    assert not list(state.glob(".*.partial"))
    # A second run finds every row done and sends nothing.
    code, said = invoke("run", job)
    assert code == 0, said
    assert server_stats(base)["requests_total"] == 300
    # export reads the output from the bucket and writes beside it.
    code, said = invoke("export", job)
    assert code == 0, said
    lines = bucket.get("out/labels.openai-batch.jsonl").decode().splitlines()
    assert [json.loads(line)["custom_id"] for line in lines] == [f"r{i}" for i in range(300)]
    assert_no_secret(tmp_path, said)
    assert SECRET.encode() not in bucket.get("out/labels.parquet")


def test_a_glob_or_a_folder_in_a_bucket_reads_every_file_in_name_order(bucket: Bucket) -> None:
    for part in (2, 0, 1):
        bucket.put_parquet(f"data/part-{part}.parquet", rows_table(1000, start=1000 * part))
    bucket.put("data/README.txt", b"not data")
    bucket.put("data/nested/part-9.parquet", b"not read: only the folder's own files")
    expected = [bucket.url(f"data/part-{part}.parquet") for part in range(3)]
    for given in (bucket.url("data/*.parquet"), bucket.url("data"), bucket.url("data/")):
        files = resolve_input(given, "job.toml")
        assert [f.url for f in files] == expected, given
    files = resolve_input(bucket.url("data/*.parquet"), "job.toml")
    scan = scan_input(files, id_column="rid", limit=None, job_source="job.toml")
    assert scan.rows == 3000
    assert {"rid", "text"} <= scan.columns
    batches = list(iter_batches(files, ["rid"], batch_rows=256))
    assert max(b.num_rows for b in batches) <= 256
    ids = [v for b in batches for v in b.column(0).to_pylist()]
    assert ids == [f"r{i}" for i in range(3000)]
    # A gzipped JSONL file in a bucket reads like a local one.
    lines = "".join(json.dumps({"rid": f"j{i}", "text": "x"}) + "\n" for i in range(5))
    url = bucket.put("json/rows.jsonl.gz", gzip.compress(lines.encode()))
    files = resolve_input(url, "job.toml")
    assert [b.column(0).to_pylist() for b in iter_batches(files, ["rid"])] == [
        [f"j{i}" for i in range(5)]
    ]


def test_resume_after_a_kill_sends_no_row_twice_but_those_reported(
    bucket: Bucket, tmp_path: Path, local_server: Callable[..., str]
) -> None:
    rows = 400
    base = local_server(latency_ms=40)
    source = bucket.put_parquet("in/rows.parquet", rows_table(rows))
    job = write_job(tmp_path, input_=source, output=bucket.url("out/r.parquet"), base_url=base)
    results = tmp_path / ".pipeline" / "state" / "s3job" / "results"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while sum(p.stat().st_size for p in results.glob("*.jsonl")) < 2000:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert "out/r.parquet" not in bucket.objects()  # killed: no output, not even part of one
    code, said = invoke("run", job)
    assert code == 0, said
    found = re.search(r"stopped with ([\d,]+) request", said)
    assert found, said
    reported = int(found.group(1).replace(",", ""))
    out = read_output(bucket, "out/r.parquet")
    assert out["id"].to_pylist() == [f"r{i}" for i in range(rows)]
    assert set(out["status"].to_pylist()) == {"ok"}
    stats = server_stats(base)
    assert stats["distinct_requests"] == rows
    assert stats["requests_total"] - rows <= reported


# ---------------------------------------------------------------------------------------------
# The output appears whole or not at all.

KILL_BEFORE_COMPLETING = """
import os, runpy, signal, sys
import s3fs
from pipeline.io import remote

remote.UPLOAD_PART_BYTES = 5 * 2**20  # S3's smallest part: a 12 MB output goes in parts
call_s3 = s3fs.S3FileSystem._call_s3

async def killed_before_completing(self, method, *args, **kwargs):
    if method == "complete_multipart_upload":
        os.kill(os.getpid(), signal.SIGKILL)
    return await call_s3(self, method, *args, **kwargs)

s3fs.S3FileSystem._call_s3 = killed_before_completing
sys.argv[0] = "pipeline"
runpy.run_module("pipeline", run_name="__main__")
"""


def test_a_run_killed_while_uploading_leaves_no_object_and_the_next_run_writes_it(
    bucket: Bucket, tmp_path: Path, llm: str
) -> None:
    rows = 120
    pad = [os.urandom(100_000).hex() for _ in range(rows)]  # ~12 MB compressed
    pq.write_table(rows_table(rows).append_column("pad", pa.array(pad)), tmp_path / "in.parquet")
    job = write_job(
        tmp_path,
        input_=str(tmp_path / "in.parquet"),
        output=bucket.url("out/big.parquet"),
        base_url=llm,
        extra='keep_columns = ["pad"]',
    )
    reset_server_stats(llm)
    killed = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_COMPLETING, "run", str(job)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert bucket.objects() == []  # every part was sent, none of it is an object
    [upload] = bucket.unfinished_uploads()
    assert upload["Key"] == "out/big.parquet"
    parts = bucket.client.list_parts(
        Bucket=bucket.name, Key="out/big.parquet", UploadId=upload["UploadId"]
    )
    assert len(parts["Parts"]) >= 2
    assert server_stats(llm)["requests_total"] == rows
    code, said = invoke("run", job)
    assert code == 0, said
    out = read_output(bucket, "out/big.parquet")
    assert out["id"].to_pylist() == [f"r{i}" for i in range(rows)]
    assert out["pad"].to_pylist() == pad
    assert server_stats(llm)["requests_total"] == rows  # every row was in the state
    assert bucket.unfinished_uploads() == []  # the killed run's upload was aborted


def test_an_upload_that_fails_leaves_nothing_and_says_the_rows_are_kept(
    bucket: Bucket, tmp_path: Path
) -> None:
    url = bucket.url("out/x.parquet")
    writer = OutputWriter(url, staging=tmp_path / "state")
    writer.__enter__()
    writer.write(pa.array(["a"]), [], [RowResult(key="k", row=0, status="ok", response="x")])
    bucket.client.delete_bucket(Bucket=bucket.name)  # gone before the upload
    with pytest.raises(StateError, match="cannot upload the output") as caught:
        writer.__exit__(None, None, None)
    assert "every finished row is kept in the state folder" in str(caught.value)
    assert "does not exist" in str(caught.value)
    assert list((tmp_path / "state").iterdir()) == []  # the staged file is not left behind


# ---------------------------------------------------------------------------------------------
# Mistakes: one clear line, exit 2, before any request.


@pytest.mark.parametrize("side", ["input", "output"])
def test_a_wrong_bucket_gives_one_clear_line_before_any_request(
    bucket: Bucket, tmp_path: Path, llm: str, side: str
) -> None:
    source = bucket.put_parquet("in/rows.parquet", rows_table(3))
    wrong = "s3://no-such-bucket/in/rows.parquet"
    job = write_job(
        tmp_path,
        input_=wrong if side == "input" else source,
        output=wrong if side == "output" else bucket.url("out.parquet"),
        base_url=llm,
    )
    reset_server_stats(llm)
    code, said = invoke("run", job)
    assert code == 2, said
    assert said.count("\n") == 1, said
    assert f"[{side}] path" in said
    assert "the bucket 'no-such-bucket' does not exist" in said
    assert server_stats(llm)["requests_total"] == 0


@pytest.mark.parametrize("side", ["input", "output"])
def test_missing_credentials_give_one_clear_line_before_any_request(
    bucket: Bucket, tmp_path: Path, llm: str, side: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = bucket.put_parquet("in/rows.parquet", rows_table(3))
    (tmp_path / "in.parquet").write_bytes(bucket.get("in/rows.parquet"))
    job = write_job(
        tmp_path,
        input_=source if side == "input" else str(tmp_path / "in.parquet"),
        output=bucket.url("out.parquet") if side == "output" else str(tmp_path / "out.parquet"),
        base_url=llm,
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    reset_server_stats(llm)
    code, said = invoke("run", job)
    assert code == 2, said
    assert said.count("\n") == 1, said
    assert "no S3 credentials were found; set AWS_ACCESS_KEY_ID" in said
    assert server_stats(llm)["requests_total"] == 0


@pytest.mark.parametrize(
    "case",
    [
        ("s3://b/in.parquet", "s3fs", "s3"),
        ("gs://b/in.parquet", "gcsfs", "gcs"),
        ("az://c/in.parquet", "adlfs", "az"),
        ("hf://datasets/u/r/in.parquet", "huggingface_hub", "hf"),
    ],
)
def test_a_url_whose_extra_is_missing_names_the_extra(
    tmp_path: Path, llm: str, case: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, module, extra = case
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
    job = write_job(tmp_path, input_=url, output=str(tmp_path / "out.parquet"), base_url=llm)
    reset_server_stats(llm)
    code, said = invoke("run", job)
    assert code == 2, said
    assert said.count("\n") == 1, said
    assert f"pip install 'pipeline[{extra}]'" in said
    assert server_stats(llm)["requests_total"] == 0


def test_an_openai_batch_file_in_a_bucket_is_refused_clearly(
    bucket: Bucket, tmp_path: Path, llm: str
) -> None:
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}
    url = bucket.put("b/batch.jsonl", json.dumps(line).encode() + b"\n")
    job = write_job(tmp_path, input_=url, output=str(tmp_path / "o.parquet"), base_url=llm)
    job.write_text(job.read_text().replace('id_column = "rid"', 'format = "openai-batch"'))
    reset_server_stats(llm)
    code, said = invoke("run", job)
    assert code == 2, said
    assert said.count("\n") == 1, said
    assert f"an OpenAI batch input is read from a local file, not {url}" in said
    assert server_stats(llm)["requests_total"] == 0


def test_a_state_folder_in_a_bucket_is_refused(bucket: Bucket) -> None:
    with pytest.raises(JobFileError, match="needs a local"):
        check_writable(bucket.url("state"), job_source="j", key="[output] state_dir", folder=True)


# ---------------------------------------------------------------------------------------------
# Paths: URLs are kept as written, and the state of a remote output is local.


def test_urls_in_a_job_file_are_kept_and_their_state_is_local(tmp_path: Path) -> None:
    text = """
name = "my labels/v2"
[input]
path = "hf://datasets/u/r/data/*.parquet"
[request]
prompt = "{text}"
[output]
path = "s3://b/out/labels.parquet"
"""
    job = parse_job(text, tmp_path / "jobs" / "job.toml")
    assert job.input.path == "hf://datasets/u/r/data/*.parquet"
    assert job.output.path == "s3://b/out/labels.parquet"
    assert job.state_path == Path(".pipeline/state/my_labels_v2")
    local = apply_overrides(job, Overrides(local=True))
    assert local.output.path == "s3://b/out/labels.local.parquet"
    assert local.state_path == Path(".pipeline/state/my_labels_v2/local")
    moved = apply_overrides(job, Overrides(output="gs://c/x.parquet"))
    assert moved.state_path == Path(".pipeline/state/my_labels_v2")
    explicit = parse_job(text + 'state_dir = "st"\n', tmp_path / "jobs" / "job.toml")
    assert explicit.state_path == tmp_path / "jobs" / "st"  # an explicit one still wins
    assert apply_overrides(job, Overrides(output="o.parquet")).state_path == Path("o.parquet.state")


# ---------------------------------------------------------------------------------------------
# The Hub: a local folder stands in for huggingface_hub.HfFileSystem.


def test_a_dataset_on_the_hub_is_read_through_hf_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llm: str
) -> None:
    hub = tmp_path / "hub"
    data = hub / "datasets" / "someone" / "reviews" / "data"
    data.mkdir(parents=True)
    for part in (0, 1):
        pq.write_table(rows_table(50, start=50 * part), data / f"train-0000{part}.parquet")

    class LocalHub(DirFileSystem):  # type: ignore[misc]
        """The Hub's files, from a local folder: hf://datasets/... -> hub/datasets/..."""

        protocol = "hf"

        def __init__(self, **options: Any) -> None:
            super().__init__(path=str(hub), fs=LocalFileSystem(), **options)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfFileSystem", LocalHub)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    folder = "hf://datasets/someone/reviews/data"
    assert [f.url for f in resolve_input(folder, "job.toml")] == [
        f"{folder}/train-00000.parquet",
        f"{folder}/train-00001.parquet",
    ]
    job = write_job(
        tmp_path,
        input_=f"{folder}/train-*.parquet",
        output=str(tmp_path / "o.parquet"),
        base_url=llm,
    )
    reset_server_stats(llm)
    code, said = invoke("run", job)
    assert code == 0, said
    assert pq.read_table(tmp_path / "o.parquet")["id"].to_pylist() == [f"r{i}" for i in range(100)]
    assert server_stats(llm)["requests_total"] == 100
    code, said = invoke("run", job, "--output", "hf://datasets/someone/reviews/out.parquet")
    assert code == 2
    assert "hf:// is read only here" in said
    assert_no_secret(tmp_path / "o.parquet", said)


def test_storage_errors_never_show_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert SECRET not in remote.scrub(f"signature for {SECRET} did not match")
