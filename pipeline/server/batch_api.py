"""The built-in server's Batch API (``/v1/batches``), as OpenAI's, processed in the background.

``POST /v1/batches`` (``input_file_id``, ``endpoint``, ``completion_window: "24h"``, optional
``metadata``), ``GET /v1/batches`` (newest first, ``limit``/``after``),
``GET /v1/batches/{id}`` and ``POST /v1/batches/{id}/cancel``. A batch goes
``validating`` -> ``in_progress`` -> ``finalizing`` -> ``completed`` (or ``failed``,
``expired``, ``cancelling`` -> ``cancelled``), waiting ``batch_delay_s`` before validating and
again before finalizing. Its lines are answered as ``POST`` requests to its endpoint would be
(same replies, same checks: an unknown model is a 404 line, an invalid body or
``reject_substring`` a 400 line), without the rate limits and random faults of the online
path. Answers with status 200 go to the output file, every other line to the error file, one
JSON line each in OpenAI's shape (``id``, ``custom_id``, ``response: {status_code,
request_id, body}``, ``error``).

Test knobs (:class:`~pipeline.server.options.ServerOptions`): ``batch_error_rate`` of the
lines (chosen by a hash of their ``custom_id`` and ``seed``) get a 500 ``server_error`` line;
``batch_expire_after`` lines answered, a batch expires and its other lines are in the error
file with ``code: "batch_expired"``; a file over ``batch_max_requests`` lines or
``batch_max_bytes`` bytes, a line that is not a JSON request object, a duplicate
``custom_id`` or a line for another endpoint fail the batch at validation (``errors``). With
``batch_api`` off, every ``/v1/batches`` and ``/v1/files`` route answers 404.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline.server.bodies import error_body
from pipeline.server.files import FileStore, bad_request, json_line, not_found, page
from pipeline.server.options import ServerOptions

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
Answer = Callable[[str, bytes], tuple[int, bytes]]
"""Answers one request body sent to an endpoint: (HTTP status, JSON body)."""
EXPIRED = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
LINES_PER_STEP = 200
"""Lines answered before the event loop gets a turn."""
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(slots=True)
class Batch:
    id: str
    input_file_id: str
    endpoint: str
    metadata: dict[str, Any] | None
    created_at: int
    status: str = "validating"
    times: dict[str, int | None] = field(default_factory=dict)
    counts: dict[str, int] = field(
        default_factory=lambda: {"total": 0, "completed": 0, "failed": 0}
    )
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    cancel: bool = False

    def to_dict(self) -> dict[str, Any]:
        names = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling")
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + 86_400,
            **{f"{name}_at": self.times.get(name) for name in names},
            "cancelled_at": self.times.get("cancelled"),
            "request_counts": dict(self.counts),
            "metadata": self.metadata,
        }

    def move(self, status: str) -> None:
        self.status = status
        self.times[status] = int(time.time())


class BatchService:
    """The batches of one server process, processed by background tasks."""

    def __init__(self, options: ServerOptions, files: FileStore, answer: Answer) -> None:
        self.options = options
        self.files = files
        self.answer = answer
        self.batches: dict[str, Batch] = {}
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        self._tasks: set[asyncio.Task[None]] = set()

    async def create(self, request: Request) -> Response:
        try:
            payload = json.loads(await request.body())
        except ValueError:
            return bad_request("The body is not JSON.")
        if not isinstance(payload, dict):
            return bad_request("The body must be a JSON object.")
        file_id = payload.get("input_file_id")
        if not isinstance(file_id, str) or file_id not in self.files.files:
            return bad_request(f"No such file: {file_id!r}.", "input_file_id")
        endpoint = payload.get("endpoint")
        if endpoint not in ENDPOINTS:
            return bad_request(f"Unsupported endpoint {endpoint!r}.", "endpoint")
        if payload.get("completion_window") != "24h":
            return bad_request("completion_window must be '24h'.", "completion_window")
        metadata = payload.get("metadata")
        batch = Batch(
            id=f"batch_{self._prefix}{next(self._ids):08d}",
            input_file_id=file_id,
            endpoint=endpoint,
            metadata=metadata if isinstance(metadata, dict) else None,
            created_at=int(time.time()),
        )
        self.batches[batch.id] = batch
        self.files.counts["batches_created"] += 1
        task = asyncio.get_running_loop().create_task(self._process(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return JSONResponse(batch.to_dict())

    async def listing(self, request: Request) -> Response:
        items = [batch.to_dict() for batch in reversed(self.batches.values())]
        return JSONResponse(page(items, request))

    async def retrieve(self, request: Request) -> Response:
        ident = request.path_params["batch_id"]
        batch = self.batches.get(ident)
        return not_found("batch", ident) if batch is None else JSONResponse(batch.to_dict())

    async def cancel(self, request: Request) -> Response:
        ident = request.path_params["batch_id"]
        batch = self.batches.get(ident)
        if batch is None:
            return not_found("batch", ident)
        if batch.status in TERMINAL:
            body = error_body(
                f"Cannot cancel a batch with status '{batch.status}'.", "invalid_request_error"
            )
            return Response(body, 409, media_type="application/json")
        self.files.counts["batches_cancelled"] += 1
        batch.cancel = True
        batch.move("cancelling")
        return JSONResponse(batch.to_dict())

    # -- processing ----------------------------------------------------------------------

    async def _process(self, batch: Batch) -> None:
        await asyncio.sleep(self.options.batch_delay_s)
        lines = self._validate(batch)
        if lines is None:
            batch.move("failed")
            return
        if batch.cancel:
            batch.move("cancelled")
            return
        batch.move("in_progress")
        batch.counts["total"] = len(lines)
        output: list[bytes] = []
        errors: list[bytes] = []
        for number, request in enumerate(lines):
            if number % LINES_PER_STEP == 0:
                await asyncio.sleep(0)
            limit = self.options.batch_expire_after
            if batch.cancel or (limit and number >= limit):
                errors.extend(self._unanswered(lines[number:], batch.cancel))
                break
            line, ok = self._line(batch, request)
            (output if ok else errors).append(line)
            batch.counts["completed" if ok else "failed"] += 1
            self.files.counts["batch_requests"] += 1
        if not batch.cancel:
            await asyncio.sleep(self.options.batch_delay_s)
        if batch.status == "in_progress":
            batch.move("finalizing")
        if output:
            batch.output_file_id = self.files.add(
                f"{batch.id}_output.jsonl", "batch_output", b"".join(output)
            ).id
        if errors:
            batch.error_file_id = self.files.add(
                f"{batch.id}_error.jsonl", "batch_output", b"".join(errors)
            ).id
        if batch.cancel:
            batch.move("cancelled")
        elif self.options.batch_expire_after and len(lines) > self.options.batch_expire_after:
            batch.move("expired")
        else:
            batch.move("completed")

    def _unanswered(self, rest: list[dict[str, Any]], cancelled: bool) -> list[bytes]:
        error = (
            {"code": "batch_cancelled", "message": "This request was cancelled."}
            if cancelled
            else EXPIRED
        )
        return [
            json_line(
                {
                    "id": _line_id(str(request["custom_id"])),
                    "custom_id": request["custom_id"],
                    "response": None,
                    "error": error,
                }
            )
            for request in rest
        ]

    def _validate(self, batch: Batch) -> list[dict[str, Any]] | None:
        """The input file's requests, or None after recording why the batch fails."""
        data = self.files.files[batch.input_file_id].data
        options = self.options

        def fail(code: str, message: str, line: int | None = None) -> None:
            batch.errors = [{"code": code, "message": message, "param": None, "line": line}]

        if len(data) > options.batch_max_bytes:
            fail("file_too_large", f"The file is over {options.batch_max_bytes} bytes.")
            return None
        requests: list[dict[str, Any]] = []
        seen: set[str] = set()
        for number, raw in enumerate(data.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                request = json.loads(raw)
            except ValueError:
                fail("invalid_json_line", "This line is not valid JSON.", number)
                return None
            if not isinstance(request, dict) or not all(
                key in request for key in ("custom_id", "method", "url", "body")
            ):
                fail("missing_required_parameter", "custom_id, method, url, body needed.", number)
                return None
            if request["url"] != batch.endpoint:
                fail("mismatched_endpoint", f"The url is not {batch.endpoint}.", number)
                return None
            if request["custom_id"] in seen:
                fail("duplicate_custom_id", "The custom_id is used twice.", number)
                return None
            seen.add(request["custom_id"])
            requests.append(request)
        if len(requests) > options.batch_max_requests:
            fail("too_many_requests", f"The file has over {options.batch_max_requests} requests.")
            return None
        if not requests:
            fail("empty_file", "The file has no requests.")
            return None
        return requests

    def _line(self, batch: Batch, request: dict[str, Any]) -> tuple[bytes, bool]:
        """One request answered as a line of the output (True) or error file (False)."""
        custom_id = str(request["custom_id"])
        if _drawn(custom_id, self.options.seed, self.options.batch_error_rate):
            status = 500
            body = json.loads(
                error_body("The server had an error processing this request.", "server_error")
            )
        else:
            raw = json.dumps(request["body"]).encode()
            status, answer = self.answer(batch.endpoint, raw)
            body = json.loads(answer)
        response = {"status_code": status, "request_id": _line_id(custom_id, "req"), "body": body}
        line = {"id": _line_id(custom_id), "custom_id": custom_id, "response": response}
        return json_line({**line, "error": None}), status == 200


def _line_id(custom_id: str, kind: str = "batch_req") -> str:
    return f"{kind}_{hashlib.blake2b(custom_id.encode(), digest_size=12).hexdigest()}"


def _drawn(custom_id: str, seed: int, rate: float) -> bool:
    """Whether the line ``custom_id`` is among ``rate`` of them (by a hash, so the same
    line is chosen in every run)."""
    if rate <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}\0{custom_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate
