"""Pure: an input row and the job's request settings in, one request body out.

A prompt template uses ``{column}`` placeholders; ``{{`` and ``}}`` stand for literal braces.
Rendering never raises for a bad row: it returns a :class:`RenderFailure` with the reason,
which becomes a failed output row.

The request key identifies what is actually sent: a hash of the endpoint URL, the exact body
bytes and the row id. Editing the template or a parameter changes the key of the affected
rows; the API key is never part of it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_FORMATTER = string.Formatter()


def placeholders(template: str) -> tuple[str, ...]:
    """The column names a template refers to, in order of first use.

    Raises ``ValueError`` with a readable reason for a malformed template.
    """
    names: list[str] = []
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        message = f"malformed template ({exc}); write {{{{ and }}}} for literal braces"
        raise ValueError(message) from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name:
            raise ValueError("empty placeholder {}; name a column, like {text}")
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}...}} may not carry a format spec")
        if any(ch in name for ch in ".[]"):
            raise ValueError(f"placeholder {{{name}}} must be a plain column name")
        if name not in names:
            names.append(name)
    return tuple(names)


@functools.lru_cache(maxsize=64)
def _placeholders_of(template: str) -> tuple[str, ...]:
    return placeholders(template)


@dataclass(frozen=True, slots=True)
class RenderFailure:
    """Why a row could not be turned into a request."""

    reason: str


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 2**53 else repr(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def render_prompt(
    template: str, names: Sequence[str], row: Mapping[str, Any], *, empty_ok: bool = False
) -> str | RenderFailure:
    """Fill ``template`` from ``row``; a null or missing value is a failure, not ``"None"``."""
    values: dict[str, str] = {}
    for name in names:
        value = row.get(name)
        if value is None:
            return RenderFailure(f"column {name!r} is null in this row")
        values[name] = _text(value)
    text = template.format_map(values)
    if not empty_ok and not text.strip():
        return RenderFailure("the rendered prompt is empty")
    return text


_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


def messages_from_column(value: Any, column: str) -> list[dict[str, Any]] | RenderFailure:
    """Validate a ready-made chat ``messages`` value taken from an input column."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return RenderFailure(f"column {column!r} is not a JSON list of chat messages")
    if value is None:
        return RenderFailure(f"column {column!r} is null in this row")
    if not isinstance(value, list) or not value:
        return RenderFailure(f"column {column!r} must be a non-empty list of chat messages")
    messages: list[dict[str, Any]] = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping):
            return RenderFailure(f"column {column!r}: message {index} is not an object")
        role = message.get("role")
        if role not in _ROLES:
            return RenderFailure(f"column {column!r}: message {index} has role {role!r}")
        cleaned = {k: v for k, v in message.items() if v is not None}
        content = cleaned.get("content")
        if role != "assistant" and (content is None or content == ""):
            return RenderFailure(f"column {column!r}: message {index} has empty content")
        messages.append(cleaned)
    return messages


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestTemplate:
    """Everything needed to turn a row into a request body; built once per job."""

    model: str
    system: str | None
    prompt: str | None
    messages_column: str | None
    params: Mapping[str, Any]
    suffix: str | None = None
    """FIM: the template of the text after the hole (the completions endpoint)."""
    completions: bool = False
    """Bodies for the completions endpoint (``prompt``/``suffix``) instead of chat."""
    instruction: str | None = None
    """Text appended to the system prompt (the output schema's description)."""

    @property
    def columns(self) -> tuple[str, ...]:
        """The input columns that requests read."""
        if self.messages_column is not None:
            return (self.messages_column,)
        names = _placeholders_of(self.prompt or "") + _placeholders_of(self.suffix or "")
        return tuple(dict.fromkeys(names))

    @property
    def system_text(self) -> str | None:
        """The system prompt as sent: the job's, then the instruction."""
        if self.instruction is None:
            return self.system
        if self.system is None:
            return self.instruction
        return f"{self.system}\n\n{self.instruction}"

    def messages(self, row: Mapping[str, Any]) -> list[dict[str, Any]] | RenderFailure:
        system = self.system_text
        if self.messages_column is not None:
            rendered = messages_from_column(row.get(self.messages_column), self.messages_column)
            if isinstance(rendered, RenderFailure) or system is None:
                return rendered
            first = rendered[0]
            if first.get("role") != "system":
                return [{"role": "system", "content": system}, *rendered]
            if self.instruction is None:
                return rendered
            content = f"{first.get('content') or ''}\n\n{self.instruction}"
            return [{**first, "content": content}, *rendered[1:]]
        prompt = render_prompt(self.prompt or "", _placeholders_of(self.prompt or ""), row)
        if isinstance(prompt, RenderFailure):
            return prompt
        head = [] if system is None else [{"role": "system", "content": system}]
        return [*head, {"role": "user", "content": prompt}]

    def body(self, row: Mapping[str, Any]) -> dict[str, Any] | RenderFailure:
        """The JSON request body for ``row``."""
        if self.completions:
            return self._completion_body(row)
        messages = self.messages(row)
        if isinstance(messages, RenderFailure):
            return messages
        return {"model": self.model, "messages": messages, **self.params}

    def _completion_body(self, row: Mapping[str, Any]) -> dict[str, Any] | RenderFailure:
        prompt = render_prompt(self.prompt or "", _placeholders_of(self.prompt or ""), row)
        if isinstance(prompt, RenderFailure):
            return prompt
        body: dict[str, Any] = {"model": self.model, "prompt": prompt}
        if self.suffix is not None:
            suffix = render_prompt(self.suffix, _placeholders_of(self.suffix), row, empty_ok=True)
            if isinstance(suffix, RenderFailure):
                return suffix
            body["suffix"] = suffix
        return {**body, **self.params}


# One encoder for every body: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def encode_body(body: Mapping[str, Any]) -> bytes:
    """Canonical JSON bytes of a body: what is sent, and what the key hashes."""
    return _ENCODER.encode(body).encode()


@functools.lru_cache(maxsize=16)
def _keyed_by(url: str) -> Any:
    digest = hashlib.blake2b(digest_size=16)
    part = url.encode()
    digest.update(len(part).to_bytes(8, "little"))
    digest.update(part)
    return digest


def request_key(url: str, body: bytes, row_id: str) -> str:
    """A stable identity for one row's request: hash(endpoint URL, body bytes, row id)."""
    digest = _keyed_by(url).copy()
    for part in (body, row_id.encode()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return str(digest.hexdigest())
