"""Inputs and outputs in object storage and on the Hugging Face Hub, through fsspec.

- ``s3://bucket/key``: the ``s3`` extra (s3fs); AWS_* variables and profiles, and
  AWS_ENDPOINT_URL for S3-compatible stores (MinIO & co.).
- ``gs://bucket/key``: the ``gcs`` extra (gcsfs); application-default credentials.
- ``az://container/key``: the ``az`` extra (adlfs); AZURE_STORAGE_* variables.
- ``hf://datasets/owner/name/...``: the ``hf`` extra (huggingface_hub's HfFileSystem);
  HF_TOKEN, or none for public data.

``abfs://``/``abfss://`` are Azure too, ``s3a://`` is S3 and ``gcs://`` Google Cloud Storage.
The Hub is read only. Credentials are never passed through this module's hands: each
filesystem finds them where its own tools do, and every message this module makes has the
values of secret-looking environment variables masked.

Reading: :func:`expand` lists the files a URL names (a file, a glob, a folder);
:func:`open_input` opens one for reading, in blocks of :data:`READ_BLOCK_BYTES`, so memory
stays bounded whatever the file's size.

Writing: :func:`check_output` is the pre-flight check (the extra, credentials, the bucket, and
on S3 the right to write the key, by starting and aborting a multipart upload: no object is
made). :func:`upload` puts a finished local file under its final name in one commit, a single
PUT or a completed multipart upload, so the object appears whole or not at all; a run killed
while uploading leaves no object under that name (only an unfinished multipart upload, which
the next upload of the same key aborts).

Every failure of the storage is a :class:`StorageError`, whose text says what went wrong and
what to do; callers wrap it in the error that names their job file key or file.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, cast

from pipeline.job.urls import is_url, url_name, url_scheme
from pipeline.provider.redact import MASK, redact

__all__ = [
    "StorageError",
    "check_output",
    "exists",
    "expand",
    "is_url",
    "open_input",
    "open_text",
    "upload",
    "url_name",
]

READ_BLOCK_BYTES = 8 * 2**20
"""Bytes fetched per read from object storage (and held per open file)."""
UPLOAD_PART_BYTES = 64 * 2**20
"""S3 multipart part size: outputs over twice this are uploaded in parts."""
_GLOB_CHARACTERS = "*?["


class StorageError(Exception):
    """Object storage or the Hub cannot do what was asked; ``str()`` says what and what to
    do, with no secret in it."""


@dataclass(frozen=True, slots=True)
class _Backend:
    extra: str
    module: str
    cls: str
    service: str
    writable: bool = True


_S3 = _Backend("s3", "s3fs", "S3FileSystem", "S3")
_GCS = _Backend("gcs", "gcsfs", "GCSFileSystem", "Google Cloud Storage")
_AZ = _Backend("az", "adlfs", "AzureBlobFileSystem", "Azure Blob Storage")
_HF = _Backend("hf", "huggingface_hub", "HfFileSystem", "the Hugging Face Hub", writable=False)
_BACKENDS = {
    "s3": _S3,
    "s3a": _S3,
    "gs": _GCS,
    "gcs": _GCS,
    "az": _AZ,
    "abfs": _AZ,
    "abfss": _AZ,
    "hf": _HF,
}


class _FileSystem(Protocol):
    """What this module uses of an fsspec filesystem."""

    def glob(self, path: str, detail: bool = ...) -> dict[str, dict[str, Any]]: ...
    def isdir(self, path: str) -> bool: ...
    def isfile(self, path: str) -> bool: ...
    def exists(self, path: str) -> bool: ...
    def ls(self, path: str, detail: bool = ...) -> list[Any]: ...
    def open(self, path: str, mode: str = ..., **kwargs: Any) -> IO[bytes]: ...
    def put_file(self, lpath: str, rpath: str, **kwargs: Any) -> None: ...


def _backend(url: str) -> _Backend:
    scheme = url_scheme(url) or ""
    found = _BACKENDS.get(scheme)
    if found is None:
        known = ", ".join(f"{s}://" for s in ("s3", "gs", "az", "hf"))
        raise StorageError(f"{scheme}:// is not a storage this tool reads ({known} are).")
    return found


_FILESYSTEMS: dict[tuple[str, str], _FileSystem] = {}
_KEPT = 8
_CREDENTIAL_PREFIXES = ("AWS_", "GOOGLE_", "GCS", "CLOUDSDK_", "AZURE_", "HF_", "HUGGING")


def _environment_digest() -> str:
    """A digest of the variables the filesystems read credentials from (kept in memory
    only), so that a filesystem made before they changed is not used after."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(os.environ):
        if name.startswith(_CREDENTIAL_PREFIXES):
            digest.update(f"{name}={os.environ[name]}\0".encode())
    return digest.hexdigest()


def _filesystem(url: str) -> tuple[_FileSystem, str]:
    """The filesystem for ``url`` and the path it knows the object by (no scheme)."""
    backend = _backend(url)
    try:
        module = importlib.import_module(backend.module)
    except ImportError:
        raise StorageError(
            f"{url_scheme(url)}:// URLs need the {backend.extra!r} extra, which is not "
            f"installed: pip install 'pipeline[{backend.extra}]'."
        ) from None
    cls = getattr(module, backend.cls)
    options: dict[str, Any] = dict(cls._get_kwargs_from_urls(url))
    # A filesystem is not used across a fork (its event loop thread is not there).
    where = f"{backend.module}.{backend.cls}:{sorted(options.items())}:{os.getpid()}"
    key = (where, _environment_digest())
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        try:
            fs = cast("_FileSystem", cls(skip_instance_cache=True, **options))
        except ValueError:  # adlfs, without an account or credentials
            raise _no_credentials(url, backend) from None
        except Exception as exc:  # each library raises its own: translated here, once
            raise _translate(exc, url, backend) from None
        while len(_FILESYSTEMS) >= _KEPT:
            del _FILESYSTEMS[next(iter(_FILESYSTEMS))]
        _FILESYSTEMS[key] = fs
    return fs, str(cls._strip_protocol(url))


def _url(original: str, path: str) -> str:
    """The URL of ``path`` (as a listing of ``original`` gives it), in ``original``'s scheme
    and account (``abfs://container@account.../``)."""
    scheme, rest = original.split("://", 1)
    netloc = rest.split("/", 1)[0]
    head, _, tail = path.lstrip("/").partition("/")
    if "@" in netloc and netloc.split("@", 1)[0] == head:
        head = netloc
    return f"{scheme}://{head}" + (f"/{tail}" if tail else "")


def expand(url: str) -> tuple[str, list[str]]:
    """What ``url`` names: ``("glob", files)``, ``("folder", files in it)``, ``("file",
    [url])`` or ``("missing", [])``; file URLs sorted by name."""
    fs, path = _filesystem(url)
    backend = _backend(url)
    try:
        if any(ch in path for ch in _GLOB_CHARACTERS):
            found = fs.glob(path, detail=True)
            names = [name for name, info in found.items() if info.get("type") != "directory"]
            return "glob", sorted(_url(url, p) for p in names)
        if fs.isdir(path):
            entries = fs.ls(path.rstrip("/"), detail=True)
            names = [e["name"] for e in entries if e.get("type") == "file"]
            return "folder", sorted(_url(url, p) for p in names)
        if fs.isfile(path):
            return "file", [url]
        _check_bucket(fs, path, url, backend)
    except Exception as exc:
        raise _translate(exc, url, backend) from None
    return "missing", []


def exists(url: str) -> bool:
    """Whether ``url`` names a file."""
    fs, path = _filesystem(url)
    try:
        return fs.isfile(path)
    except Exception as exc:
        raise _translate(exc, url, _backend(url)) from None


def open_input(url: str) -> IO[bytes]:
    """``url`` open for reading (close it when done), as a seekable binary file fetched in
    blocks of :data:`READ_BLOCK_BYTES`."""
    fs, path = _filesystem(url)
    try:
        return fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead")
    except Exception as exc:
        raise _translate(exc, url, _backend(url)) from None


def open_text(url: str, *, gzipped: bool) -> IO[str]:
    """``url`` open as UTF-8 text (through gzip when ``gzipped``; a byte-order mark at the
    start skipped); closing it closes the file in storage too."""
    handle = open_input(url)
    stream = gzip.GzipFile(fileobj=handle, mode="rb") if gzipped else handle
    return _Text(stream, source=handle)


class _Text(io.TextIOWrapper):
    def __init__(self, stream: IO[bytes] | gzip.GzipFile, *, source: IO[bytes]) -> None:
        super().__init__(stream, encoding="utf-8-sig")
        self._source = source

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._source.close()


def check_output(url: str) -> None:
    """Fail now, before anything is sent, when the output ``url`` cannot be written: an
    extra not installed, no credentials, no such bucket, no right to write (S3), or a URL
    that names a folder. Nothing is left behind."""
    backend = _backend(url)
    if not backend.writable:
        raise StorageError(
            f"{url_scheme(url)}:// is read only here: write the output to s3://, gs://, az:// "
            "or a local path (and upload it to the Hub with `huggingface-cli upload`)."
        )
    if url.split("?", 1)[0].endswith("/"):
        raise StorageError(f"{url} is a folder; the output is one Parquet file.")
    fs, path = _filesystem(url)
    if backend is _GCS and getattr(getattr(fs, "credentials", None), "method", "") == "anon":
        raise _no_credentials(url, backend)  # gcsfs falls back to anonymous: it cannot write
    try:
        if backend is _S3:
            _probe_s3(fs, path)
        else:
            _check_bucket(fs, path, url, backend)
        if fs.isdir(path):
            raise StorageError(f"{url} is a folder; the output is one Parquet file.")
    except StorageError:
        raise
    except Exception as exc:
        raise _translate(exc, url, backend, writing=True) from None


def _probe_s3(fs: _FileSystem, path: str) -> None:
    """Start and abort a multipart upload of ``path``: proves the bucket exists and the
    credentials may write the key, and leaves no object."""
    bucket, _, key = path.partition("/")
    call = cast("Any", fs).call_s3
    started = call("create_multipart_upload", Bucket=bucket, Key=key)
    call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=started["UploadId"])


def _check_bucket(fs: _FileSystem, path: str, url: str, backend: _Backend) -> None:
    bucket = path.split("/", 1)[0]
    if backend is not _HF and not fs.exists(bucket):
        raise StorageError(_no_bucket(bucket, backend))


def upload(local: Path, url: str) -> None:
    """Put the finished file ``local`` at ``url`` in one commit (see the module docstring)."""
    fs, path = _filesystem(url)
    backend = _backend(url)
    options: dict[str, Any] = {}
    if backend is _S3:
        options["chunksize"] = UPLOAD_PART_BYTES
        _abort_unfinished_s3(fs, path)
    try:
        fs.put_file(str(local), path, **options)
    except Exception as exc:
        raise _translate(exc, url, backend, writing=True) from None


def _abort_unfinished_s3(fs: _FileSystem, path: str) -> None:
    """Abort the multipart uploads of exactly ``path`` that a killed run left unfinished
    (invisible, but billed as storage until aborted); best effort."""
    bucket, _, key = path.partition("/")
    call = cast("Any", fs).call_s3
    with contextlib.suppress(Exception):
        pending = call("list_multipart_uploads", Bucket=bucket, Prefix=key)
        for upload_ in pending.get("Uploads", []):
            if upload_.get("Key") == key:
                call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_["UploadId"])


# ---------------------------------------------------------------------------------------------
# Errors: what each library raises, said for a person, with no secret in it.

_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CONNECTION_STRING|SAS|CREDENTIAL")


def scrub(text: str) -> str:
    """``text`` with the values of secret-looking environment variables (and key-shaped
    strings) masked."""
    for name, value in os.environ.items():
        if len(value) >= 8 and _SECRET_NAME.search(name.upper()):
            text = text.replace(value, MASK)
    return redact(text, None)


def _no_bucket(bucket: str, backend: _Backend) -> str:
    what = "container" if backend is _AZ else "bucket"
    return (
        f"the {what} {bucket!r} does not exist on {backend.service} (or these credentials "
        "cannot see it); check the name" + (" and AWS_ENDPOINT_URL." if backend is _S3 else ".")
    )


def _credentials_fix(backend: _Backend) -> str:
    if backend is _S3:
        return (
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and "
            "AWS_ENDPOINT_URL for an S3-compatible store"
        )
    if backend is _GCS:
        return "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
    if backend is _AZ:
        return "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or a SAS token)"
    return "set HF_TOKEN to a token that can read the repository"


def _no_credentials(url: str, backend: _Backend) -> StorageError:
    return StorageError(
        f"cannot use {url}: no {backend.service} credentials were found; "
        f"{_credentials_fix(backend)}."
    )


def _translate(
    exc: BaseException, url: str, backend: _Backend, *, writing: bool = False
) -> StorageError:
    """The :class:`StorageError` for ``exc``, raised by ``backend``'s library on ``url``."""
    if isinstance(exc, StorageError):
        return exc
    name = type(exc).__name__
    text = scrub(str(exc))
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
        return _no_credentials(url, backend)
    if name == "ProfileNotFound":
        return StorageError(f"{text}; set AWS_PROFILE to a profile in ~/.aws/config.")
    if isinstance(exc, FileNotFoundError):
        if "bucket" in text.lower() or "container" in text.lower():
            path = url.split("://", 1)[1]
            return StorageError(_no_bucket(path.split("/", 1)[0].split("@", 1)[0], backend))
        return StorageError(f"no such file or folder: {url}.")
    if isinstance(exc, PermissionError) or name == "ClientAuthenticationError":
        verb = "write" if writing else "read"
        return StorageError(
            f"{backend.service} refused to let these credentials {verb} {url} ({text}); "
            f"check the credentials and their permissions: {_credentials_fix(backend)}."
        )
    return StorageError(f"{backend.service} failed on {url} ({name}: {text}).")
