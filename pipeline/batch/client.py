"""The provider's Batch API over HTTP: files (upload, find, content) and batches (create,
find, retrieve, cancel). Transient failures (connection errors, 429, 5xx) are tried again
with backoff; a 401/403 is an :class:`~pipeline.errors.AuthError`; anything else a
:class:`~pipeline.errors.ProviderError` naming the call. The API key is sent as a bearer
token and never appears in a message."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import anyio
import httpx

from pipeline.errors import AuthError, ProviderError
from pipeline.provider.redact import redact
from pipeline.provider.wire import error_message

ATTEMPTS = 5
FIRST_WAIT_S = 0.5


class NotFound(Exception):
    """The provider does not know this object (404)."""


class BatchClient:
    """One connection pool to one endpoint's Batch API."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._base = base_url.rstrip("/")
        self._key = api_key
        self._http = httpx.AsyncClient(timeout=300, headers=headers, transport=transport)

    async def __aenter__(self) -> BatchClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        url = f"{self._base}/{path}"
        wait = FIRST_WAIT_S
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = await self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                if attempt == ATTEMPTS:
                    detail = redact(str(exc) or type(exc).__name__, self._key)
                    raise ProviderError(f"{what}: cannot reach {url} ({detail}).") from None
            else:
                status = response.status_code
                if status < 400:
                    return response
                if status == 404:
                    raise NotFound(what)
                reason = redact(
                    error_message(
                        status, response.content, response.headers.get("content-type", "")
                    ),
                    self._key,
                )
                if status in (401, 403):
                    raise AuthError(f"{what}: the provider refused the API key ({reason}).")
                if (status != 429 and status < 500) or attempt == ATTEMPTS:
                    raise ProviderError(f"{what} at {url}: {reason}")
            await anyio.sleep(wait)
            wait *= 2
        raise AssertionError("unreachable")

    async def has_batch_api(self) -> bool:
        """Whether the endpoint answers ``GET /batches`` (False on 404)."""
        try:
            await self._call("GET", "batches", "listing batches", params={"limit": 1})
        except NotFound:
            return False
        return True

    async def upload(self, name: str, data: bytes) -> str:
        """Upload a batch input file; its file id."""
        files = {"file": (name, data, "application/jsonl")}
        response = await self._call(
            "POST", "files", f"uploading {name}", files=files, data={"purpose": "batch"}
        )
        return str(response.json()["id"])

    async def _pages(self, path: str, what: str, **params: Any) -> AsyncIterator[dict[str, Any]]:
        after: str | None = None
        while True:
            query = {"limit": 100, **params, **({"after": after} if after else {})}
            page = (await self._call("GET", path, what, params=query)).json()
            items = page.get("data") or []
            for item in items:
                yield item
            if not page.get("has_more") or not items:
                return
            after = items[-1]["id"]

    async def find_file(self, name: str) -> str | None:
        """The id of an uploaded batch file named ``name``, if the provider has one."""
        async for item in self._pages("files", "listing files", purpose="batch"):
            if item.get("filename") == name:
                return str(item["id"])
        return None

    async def create(self, file_id: str, endpoint: str, window: str, local_id: str) -> str:
        """Create a batch of an uploaded file; its batch id."""
        payload = {
            "input_file_id": file_id,
            "endpoint": endpoint,
            "completion_window": window,
            "metadata": {"pipeline_batch": local_id},
        }
        response = await self._call("POST", "batches", "creating a batch", json=payload)
        return str(response.json()["id"])

    async def find_batch(self, local_id: str, file_id: str) -> str | None:
        """The id of a batch made for ``local_id`` (by its metadata, or its input file)."""
        async for item in self._pages("batches", "listing batches"):
            metadata = item.get("metadata") or {}
            if metadata.get("pipeline_batch") == local_id or item.get("input_file_id") == file_id:
                return str(item["id"])
        return None

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        response = await self._call("GET", f"batches/{batch_id}", f"reading batch {batch_id}")
        found: dict[str, Any] = response.json()
        return found

    async def content(self, file_id: str) -> bytes:
        response = await self._call(
            "GET", f"files/{file_id}/content", f"downloading file {file_id}"
        )
        return response.content

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        response = await self._call(
            "POST", f"batches/{batch_id}/cancel", f"cancelling batch {batch_id}"
        )
        found: dict[str, Any] = response.json()
        return found


def lines_of(data: bytes) -> list[dict[str, Any]]:
    """The JSON objects of a batch output or error file (blank or broken lines skipped)."""
    found = []
    for raw in data.splitlines():
        try:
            value = json.loads(raw)
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found
