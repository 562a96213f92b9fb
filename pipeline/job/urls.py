"""Paths that are URLs (``s3://bucket/key``, ``hf://datasets/...``): recognised, renamed and
given a local state folder, without any I/O.

A job's ``[input] path`` and ``[output] path`` may name object storage or the Hugging Face Hub
(read and written by :mod:`pipeline.io.remote`). Such a path is kept exactly as written:
``pathlib`` would fold ``s3://b`` into ``s3:/b``, so URLs are handled as text here.
"""

from __future__ import annotations

import re
from pathlib import Path

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
"""A scheme of two or more characters, so that a Windows drive (``C://x``) is not a URL."""

REMOTE_STATE_ROOT = Path(".pipeline", "state")
"""Where the state folder of a job whose output is a URL goes, relative to the current folder:
the state needs appends and fsync, which object storage does not offer."""


def url_scheme(text: str) -> str | None:
    """The scheme of ``text``, lower-cased (``"s3"``), or None when it is not a URL."""
    found = _SCHEME.match(text)
    return None if found is None else found.group(1).lower()


def is_url(text: str) -> bool:
    """Whether ``text`` is a URL (anything with a ``scheme://``) rather than a local path."""
    return url_scheme(text) is not None


def url_with_name(url: str, name: str) -> str:
    """``url`` with its last part replaced: ``s3://b/out/x.parquet``, ``y`` ->
    ``s3://b/out/y``. A query string (``?...``) is not part of the name."""
    base, _, query = url.partition("?")
    head, _, _ = base.rstrip("/").rpartition("/")
    return f"{head}/{name}" + (f"?{query}" if query else "")


def url_name(url: str) -> str:
    """The last part of ``url``'s path: ``s3://b/out/x.parquet`` -> ``x.parquet``."""
    return url.split("?", 1)[0].rstrip("/").rpartition("/")[2]


def local_state_folder(job_name: str, output: str) -> Path:
    """The state folder of a job whose output is a URL: ``.pipeline/state/<job name>``
    (characters that cannot be in a folder name become ``_``; without a job name, the
    output's file name stands in)."""
    name = job_name or Path(url_name(output)).stem or "job"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "job"
    return REMOTE_STATE_ROOT / safe
