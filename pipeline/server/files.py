"""The built-in server's ``/v1/files``: the files the Batch API reads and writes, in memory.

``POST /v1/files`` (multipart: ``file`` and ``purpose``, as OpenAI's and the ``openai``
package's uploads), ``GET /v1/files`` (newest first; ``purpose``, ``limit``, ``after``),
``GET /v1/files/{id}``, ``GET /v1/files/{id}/content`` and ``DELETE /v1/files/{id}``. File
objects have OpenAI's shape (``id``, ``object: "file"``, ``bytes``, ``created_at``,
``filename``, ``purpose``, ``status``). Files live as long as the process.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline.server.bodies import error_body

PURPOSES = frozenset({"batch", "batch_output", "fine-tune", "assistants", "user_data", "evals"})


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


def not_found(what: str, ident: str) -> Response:
    body = error_body(f"No such {what}: '{ident}'", "invalid_request_error", code="not_found")
    return Response(body, 404, media_type="application/json")


def bad_request(message: str, param: str | None = None) -> Response:
    body = error_body(message, "invalid_request_error", param=param)
    return Response(body, 400, media_type="application/json")


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a ``multipart/form-data`` body: name -> (filename, bytes)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, tuple[str | None, bytes]] = {}
    if not message.is_multipart():
        return fields
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        fields[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


class FileStore:
    """Files by id, with the counters ``/_stats`` shows."""

    def __init__(self) -> None:
        self.files: dict[str, StoredFile] = {}
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        self.counts: Counter[str] = Counter()

    def add(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        ident = f"file-{self._prefix}{next(self._ids):08d}"
        stored = StoredFile(
            id=ident, filename=filename, purpose=purpose, data=data, created_at=int(time.time())
        )
        self.files[ident] = stored
        return stored

    async def upload(self, request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            return bad_request("Upload a file as multipart/form-data with `file` and `purpose`.")
        fields = parse_multipart(content_type, await request.body())
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
        if purpose not in PURPOSES:
            return bad_request(f"Invalid purpose {purpose!r}.", "purpose")
        if "file" not in fields:
            return bad_request("Missing file.", "file")
        filename, data = fields["file"]
        stored = self.add(filename or "upload.jsonl", purpose, data)
        self.counts["files_uploaded"] += 1
        return JSONResponse(stored.to_dict())

    async def listing(self, request: Request) -> Response:
        purpose = request.query_params.get("purpose")
        chosen = [f for f in reversed(self.files.values()) if purpose in (None, f.purpose)]
        return JSONResponse(page([f.to_dict() for f in chosen], request))

    async def retrieve(self, request: Request) -> Response:
        ident = request.path_params["file_id"]
        found = self.files.get(ident)
        return not_found("file", ident) if found is None else JSONResponse(found.to_dict())

    async def content(self, request: Request) -> Response:
        ident = request.path_params["file_id"]
        found = self.files.get(ident)
        if found is None:
            return not_found("file", ident)
        self.counts["file_downloads"] += 1
        return Response(found.data, 200, media_type="application/octet-stream")

    async def delete(self, request: Request) -> Response:
        ident = request.path_params["file_id"]
        if self.files.pop(ident, None) is None:
            return not_found("file", ident)
        self.counts["files_deleted"] += 1
        return JSONResponse({"id": ident, "object": "file", "deleted": True})


def page(items: list[dict[str, Any]], request: Request) -> dict[str, Any]:
    """One page of a list, OpenAI's cursor way: ``limit`` (1-100, default 20) items after
    the one whose id is ``after``."""
    try:
        limit = max(1, min(100, int(request.query_params.get("limit", "20"))))
    except ValueError:
        limit = 20
    after = request.query_params.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    chosen = items[:limit]
    return {
        "object": "list",
        "data": chosen,
        "first_id": chosen[0]["id"] if chosen else None,
        "last_id": chosen[-1]["id"] if chosen else None,
        "has_more": len(items) > limit,
    }


def json_line(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"
