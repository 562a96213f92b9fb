"""The keys of a job file's ``[request]`` table: known ones only, no credentials, and the body
parameters they make.

Checked on the TOML document before its shapes are (so that no message ever repeats a
secret): a key that looks like a credential is refused wherever it is, an unknown key of
``[request]`` is refused with the known key it most likely meant, and a provider-specific key
goes in ``[request.extra_body]``, whose keys are sent as they are. The keys themselves are in
:mod:`pipeline.job.params`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import JobFileError
from pipeline.job.params import (
    OWN_KEYS,
    REQUEST_PARAMS,
    SECRET_FIX,
    SET_BY_PIPELINE,
    closest_key,
    is_secret_name,
    is_secret_value,
)

EXTRA_BODY_FIX = (
    "To pass a provider-specific key on purpose, put it in a [request.extra_body] table."
)


def check_secrets(source: Path, document: Mapping[str, Any]) -> None:
    """No credential in the job file: no key named like one (at the top level, at the top of
    any table, anywhere in ``[request.extra_body]``) and no value of ``[request]`` shaped like
    one (an input file may well be named ``sk-...``). The value is never repeated."""
    for key, value in document.items():
        where = str(key) if not isinstance(value, Mapping) else f"[{key}]"
        if is_secret_name(str(key)):
            raise _named_like_a_secret(source, where)
        if not isinstance(value, Mapping):
            continue
        for name, inner in value.items():
            if is_secret_name(str(name)):
                raise _named_like_a_secret(source, f"{where} {name}")
            if key == "request" and name == "extra_body" and isinstance(inner, Mapping):
                for path in _secret_names(inner, "extra_body"):
                    raise _named_like_a_secret(source, f"[request] {path}")
    for path in _secret_values(document.get("request"), ("request",)):
        if path == "[request] api_key_env":
            raise JobFileError(
                source,
                path,
                "holds what looks like an API key itself; it names the environment variable "
                "that holds the key.",
                'Write api_key_env = "NAME_OF_VARIABLE" and export the key '
                "(export NAME_OF_VARIABLE=...).",
            )
        raise JobFileError(
            source,
            path,
            'holds a value that looks like a credential (it starts with "sk-" or "Bearer "); '
            "a job file must not hold one.",
            SECRET_FIX,
        )


def _named_like_a_secret(source: Path, key: str) -> JobFileError:
    return JobFileError(
        source,
        key,
        "looks like a credential, and a job file must not hold one: job files are shared, "
        "and [request] keys are sent in every request body.",
        SECRET_FIX,
    )


def _secret_names(table: Mapping[str, Any], prefix: str) -> Iterator[str]:
    """Dotted paths of keys named like a credential, at any depth of ``table`` (except the
    property names of a JSON Schema, which are data)."""
    for name, value in table.items():
        path = f"{prefix}.{name}"
        if is_secret_name(str(name)):
            yield path
        if isinstance(value, Mapping) and name != "properties":
            yield from _secret_names(value, path)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, Mapping):
                    yield from _secret_names(item, path)


def _secret_values(value: Any, path: tuple[str, ...]) -> Iterator[str]:
    """The keys (``[request] extra_body.auth``) of string values shaped like a secret."""
    if is_secret_value(value):
        yield _key_name(path)
    elif isinstance(value, Mapping):
        for name, inner in value.items():
            yield from _secret_values(inner, (*path, str(name)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _secret_values(item, (*path[:-1], f"{path[-1]}[{index}]"))


def _key_name(path: tuple[str, ...]) -> str:
    """``("request", "extra_body", "auth")`` -> ``"[request] extra_body.auth"``."""
    if len(path) == 1:
        return path[0]
    return f"[{path[0]}] " + ".".join(path[1:])


def check_request_keys(source: Path, request: Mapping[str, Any]) -> None:
    """Every key of ``[request]`` is pipeline's own or a known request parameter."""
    for key in request:
        if key in OWN_KEYS:
            continue
        if key in SET_BY_PIPELINE:
            raise _set_by_pipeline(source, f"[request] {key}", key)
        if key in REQUEST_PARAMS:
            continue
        close = closest_key(key)
        problem = (
            f"unknown key; did you mean `{close}`?"
            if close is not None
            else "unknown key: neither a setting of pipeline nor an OpenAI or DeepSeek request "
            "parameter."
        )
        raise JobFileError(source, f"[request] {key}", problem, EXTRA_BODY_FIX)


def _set_by_pipeline(source: Path, where: str, key: str) -> JobFileError:
    if key.startswith("stream"):
        problem = "cannot be used: pipeline reads each response whole, never streamed."
        return JobFileError(source, where, problem, SET_BY_PIPELINE[key])
    return JobFileError(
        source,
        where,
        "is set by pipeline itself and cannot be passed through.",
        SET_BY_PIPELINE[key],
    )


def check_endpoint(source: Path, endpoint: str, params: Mapping[str, Any]) -> None:
    """Every known parameter the job sets is one that its endpoint takes."""
    for key in params:
        takes = REQUEST_PARAMS.get(key)
        if takes is None or endpoint in takes:
            continue
        other = " and ".join(f'"{name}"' for name in sorted(takes))
        raise JobFileError(
            source,
            f"[request] {key}",
            f'is a parameter of endpoint = {other}, and this job sends to "{endpoint}".',
            "Remove it (or, if your provider takes it there, put it in [request.extra_body]).",
        )


def body_params(
    source: Path, known: Mapping[str, Any], extra_body: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The parameters sent with every request: the known ones, then ``extra_body``'s keys as
    they are (a key in both is a mistake)."""
    params = dict(known)
    for key, value in (extra_body or {}).items():
        where = f"[request] extra_body.{key}"
        if key in SET_BY_PIPELINE:
            raise _set_by_pipeline(source, where, key)
        if key in params:
            raise JobFileError(
                source,
                where,
                f"is also set as [request] {key}.",
                "Set it in one place: [request] for the parameters pipeline knows.",
            )
        params[key] = value
    for key, value in params.items():
        if not _finite(value):
            where = f"[request] {key}" if key in known else f"[request] extra_body.{key}"
            raise JobFileError(source, where, "must be a finite number (JSON has no inf or nan).")
    return params


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(_finite(inner) for inner in value.values())
    if isinstance(value, list):
        return all(_finite(inner) for inner in value)
    return True
