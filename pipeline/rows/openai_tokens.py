"""OpenAI token counts with ``tiktoken``, from encoding files found on this machine only.

``tiktoken.get_encoding("o200k_base")`` downloads the encoding's ``.tiktoken`` file from
OpenAI's servers on first use (and ``requests.get`` there has no timeout). This module never
calls it, and so never touches the network: it reads the file from, in order,

1. the ``bpe-openai`` package (``pip install 'pipeline[openai-tokens]'``), whose wheels ship
   ``o200k_base`` and ``cl100k_base`` as ``.tiktoken.gz`` (found without importing it), then
2. tiktoken's own cache (``$TIKTOKEN_CACHE_DIR``, ``$DATA_GYM_CACHE_DIR``, or
   ``<tmp>/data-gym-cache``), where tiktoken keeps what it downloaded on a machine that can,

checks it against the SHA-256 that tiktoken itself pins for the encoding (a file that does
not match is not used), and builds the :class:`tiktoken.Encoding` with tiktoken's own split
pattern and special tokens for it (copied below; ``tests/test_prices.py`` checks them against
tiktoken's constructor). Loading ``o200k_base`` takes about 0.4 s, once per process.

When neither has the file, or tiktoken is not installed, :func:`encoding` is None and the
caller falls back to the heuristic, labelled as such.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tiktoken import Encoding

ENDOFTEXT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
ENDOFPROMPT = "<|endofprompt|>"


@dataclass(frozen=True, slots=True)
class _Spec:
    url: str
    """Where tiktoken downloads it from (its cache file is named by this URL's SHA-1)."""
    sha256: str
    pat_str: str
    special_tokens: dict[str, int]


_O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

SPECS = {
    "o200k_base": _Spec(
        url="https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str=_O200K_PATTERN,
        special_tokens={ENDOFTEXT: 199999, ENDOFPROMPT: 200018},
    ),
    "cl100k_base": _Spec(
        url="https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=_CL100K_PATTERN,
        special_tokens={
            ENDOFTEXT: 100257,
            FIM_PREFIX: 100258,
            FIM_MIDDLE: 100259,
            FIM_SUFFIX: 100260,
            ENDOFPROMPT: 100276,
        },
    ),
}
"""The encodings this module can build: what OpenAI's chat models since GPT-3.5 use."""

DATA_PACKAGE = "bpe_openai"
"""The installed package whose wheels ship the encoding files (``bpe-openai`` on PyPI)."""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def encoding_name(model: str) -> str | None:
    """The tiktoken encoding an OpenAI ``model`` uses (``openai/`` and other prefixes are
    dropped), when it is one this module can build; None otherwise or without tiktoken."""
    if not _installed("tiktoken"):
        return None
    from tiktoken.model import encoding_name_for_model

    name = model.rsplit("/", 1)[-1]
    try:
        found = encoding_name_for_model(name)
    except KeyError:
        return None
    return found if found in SPECS else None


def _package_file(name: str) -> Path | None:
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.tiktoken.gz"
    return path if path.is_file() else None


def _cache_file(name: str) -> Path | None:
    """Where tiktoken caches a download (see ``tiktoken.load.read_file_cached``)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        folder = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        folder = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        folder = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not folder:
        return None
    path = Path(folder) / hashlib.sha1(SPECS[name].url.encode()).hexdigest()
    return path if path.is_file() else None


def _read(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.suffix == ".gz" else data
    except (OSError, EOFError, gzip.BadGzipFile):
        return None


@dataclass(frozen=True, slots=True)
class Found:
    """An encoding file that matched tiktoken's pinned SHA-256."""

    data: bytes
    where: str
    """``bpe-openai package`` or ``tiktoken cache``."""


def find_file(name: str) -> Found | None:
    """``name``'s encoding file from the places in the module docstring (None: nowhere)."""
    places = (("bpe-openai package", _package_file(name)), ("tiktoken cache", _cache_file(name)))
    for where, path in places:
        if path is None:
            continue
        data = _read(path)
        if data is not None and hashlib.sha256(data).hexdigest() == SPECS[name].sha256:
            return Found(data, where)
    return None


def ranks(data: bytes) -> dict[bytes, int]:
    """The mergeable ranks of a ``.tiktoken`` file (as ``tiktoken.load.load_tiktoken_bpe``)."""
    found: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            found[base64.b64decode(token)] = int(rank)
    return found


@functools.cache
def encoding(name: str) -> Encoding | None:
    """The tiktoken encoding ``name``, built from a file on this machine (None: no file, or
    tiktoken is not installed). Never downloads."""
    if name not in SPECS or not _installed("tiktoken"):
        return None
    found = find_file(name)
    if found is None:
        return None
    import tiktoken

    spec = SPECS[name]
    return tiktoken.Encoding(
        name,
        pat_str=spec.pat_str,
        mergeable_ranks=ranks(found.data),
        special_tokens=spec.special_tokens,
    )


@functools.cache
def missing_reason(name: str) -> str | None:
    """Why ``encoding(name)`` is None, for a person (None: it is available)."""
    if not _installed("tiktoken"):
        return "tiktoken is not installed"
    if encoding(name) is not None:
        return None
    return (
        f"no offline copy of tiktoken's {name} encoding (install pipeline[openai-tokens], or "
        "fill tiktoken's cache once on a machine online)"
    )


def count_texts(name: str, texts: list[str]) -> list[int]:
    """Token counts of ``texts`` (as plain text: special tokens are not parsed).

    Each distinct text is encoded once (a job's system prompt and the roles repeat on every
    row), one after the other: tiktoken's ``encode_ordinary_batch`` hands each text to a
    thread pool, which here was 9 times slower than a plain loop (300,000 short texts: 6.4 s
    against 0.7 s on two cores).
    """
    found = encoding(name)
    if found is None:
        raise LookupError(f"the {name} encoding is not available offline")
    encode = found.encode_ordinary
    counts: dict[str, int] = {}
    for text in texts:
        if text not in counts:
            counts[text] = len(encode(text)) if text else 0
    return [counts[text] for text in texts]
