"""Pure: a job's structured output, from JSON Schema to prompt text, validation and columns.

A job may declare the shape of each answer as a JSON Schema whose top level is an object
with ``properties``. The schema does three things:

* it is told to the model (:meth:`OutputSchema.instruction`, a fixed text that the built-in
  test server parses, so its wording never changes);
* every answer is checked against it (:meth:`OutputSchema.check`), and an invalid answer gets
  one reason on one line that the model can act on (:meth:`OutputSchema.reask`);
* each top-level property becomes one typed output column (:meth:`OutputSchema.arrow_fields`,
  :meth:`OutputSchema.column_arrays`), so a user reads ``label`` as a Categorical and
  ``score`` as a float instead of parsing JSON text themselves.

Type mapping (JSON Schema → Arrow): string → string; string ``enum`` → dictionary<int32,
string> (polars: Categorical); integer → int64; number → float64 (integers become floats);
boolean → bool; array → list of the item type; object with properties → struct; ``[T,
"null"]`` or ``anyOf: [T, null]`` → T. Anything else (no type, mixed types, unions of
objects, ``additionalProperties`` maps, ``$ref``) → string holding the value's canonical
JSON text, so nothing a valid answer says is lost. Every field is nullable: a failed row has
no answer, and optional properties may be absent. A struct keeps only its declared
properties. An integer that does not fit 64 bits is refused by :meth:`OutputSchema.check`
(and becomes null in :meth:`OutputSchema.column_arrays`, which never raises).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.errors import JobFileError

INSTRUCTION_HEAD = (
    "Answer with one JSON object, and nothing else, that conforms to this JSON Schema:\n```json\n"
)
INSTRUCTION_TAIL = "\n```"
REASK_TEMPLATE = (
    "Your answer was not valid: {error}. "
    "Answer again with only the JSON object, conforming to the schema."
)
SHOWN_VALUE_CHARS = 80
"""How much of an offending value an error message repeats."""
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_FENCE = re.compile(r"\A```[ \t]*(?:json|JSON)?[ \t]*\r?\n(.*?)\r?\n?[ \t]*```\Z", re.DOTALL)
_DECODER = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why an answer does not conform: one line, fit to show the model and a person."""

    reason: str


class _OutOfRange(Exception):
    """A number that no column type can hold; carries the JSON path for the message."""

    def __init__(self, path: str, value: Any) -> None:
        super().__init__(path)
        self.path = path
        self.value = value


def _canonical(value: Any) -> str:
    """Canonical JSON text, as kept in an untyped column (valid UTF-8 whatever the input)."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return _utf8(text)


def _utf8(text: str) -> str:
    """``text`` made encodable: JSON may carry lone surrogates, which Arrow refuses."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


# ---------------------------------------------------------------------------------------------
# Column nodes: one per (sub)schema, each knows its Arrow type and how to convert a value.


@dataclass(frozen=True, slots=True)
class _Node:
    """How one (sub)schema becomes Arrow: its type and a value converter."""

    type: pa.DataType
    convert: Callable[[Any, str], Any]
    """``convert(value, json_path)``: a Python value Arrow accepts for :attr:`type`."""
    enum: tuple[str, ...] = ()
    """For an enum column: its values in schema order (the fixed dictionary)."""


def _as_string(value: Any, path: str) -> Any:
    if value is None:
        return None
    return _utf8(value) if isinstance(value, str) else _canonical(value)


def _as_json(value: Any, path: str) -> Any:
    return None if value is None else _canonical(value)


def _as_int(value: Any, path: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float):
        if not value.is_integer():
            return None
        value = int(value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise _OutOfRange(path, value)
    return value


def _as_float(value: Any, path: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        raise _OutOfRange(path, value) from None
    if math.isinf(number):
        raise _OutOfRange(path, value)
    return number


def _as_bool(value: Any, path: str) -> Any:
    return value if isinstance(value, bool) else None


_STRING = _Node(pa.string(), _as_string)
_JSON = _Node(pa.string(), _as_json)
_INT = _Node(pa.int64(), _as_int)
_FLOAT = _Node(pa.float64(), _as_float)
_BOOL = _Node(pa.bool_(), _as_bool)
_ENUM_TYPE = pa.dictionary(pa.int32(), pa.string())


def _enum_node(values: tuple[str, ...]) -> _Node:
    allowed = frozenset(values)

    def convert(value: Any, path: str) -> Any:
        return value if isinstance(value, str) and value in allowed else None

    return _Node(_ENUM_TYPE, convert, values)


def _list_node(item: _Node) -> _Node:
    def convert(value: Any, path: str) -> Any:
        if not isinstance(value, list):
            return None
        return [item.convert(v, f"{path}[{i}]") for i, v in enumerate(value)]

    return _Node(pa.list_(item.type), convert)


def _struct_node(children: Mapping[str, _Node]) -> _Node:
    names = tuple(children)

    def convert(value: Any, path: str) -> Any:
        if not isinstance(value, Mapping):
            return None
        return {name: children[name].convert(value.get(name), f"{path}.{name}") for name in names}

    fields = [pa.field(name, node.type, nullable=True) for name, node in children.items()]
    return _Node(pa.struct(fields), convert)


def _string_enum(schema: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The enum's values when they are all strings (a null among them is allowed)."""
    values = schema.get("enum")
    if not isinstance(values, list):
        return None
    strings = [v for v in values if v is not None]
    if not strings or not all(isinstance(v, str) for v in strings):
        return None
    return tuple(dict.fromkeys(strings))


def _without_null(options: Any) -> Any:
    """The one non-null branch of ``anyOf``/``oneOf: [T, {"type": "null"}]``, else None."""
    if not isinstance(options, list) or len(options) != 2:
        return None
    rest = [o for o in options if not (isinstance(o, Mapping) and o.get("type") == "null")]
    return rest[0] if len(rest) == 1 else None


def _node(schema: Any) -> _Node:
    """The column node for ``schema`` (see the module docstring for the mapping)."""
    if not isinstance(schema, Mapping):
        return _JSON
    if "type" not in schema:
        for union in ("anyOf", "oneOf"):
            branch = _without_null(schema.get(union))
            if branch is not None:
                return _node(branch)
        enum = _string_enum(schema)
        return _JSON if enum is None else _enum_node(enum)
    kind: Any = schema["type"]
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        if len(kinds) != 1:
            return _JSON
        kind = kinds[0]
    return _typed_node(kind, schema)


def _typed_node(kind: Any, schema: Mapping[str, Any]) -> _Node:
    if kind == "string":
        enum = _string_enum(schema)
        return _STRING if enum is None else _enum_node(enum)
    simple = {"integer": _INT, "number": _FLOAT, "boolean": _BOOL}
    if isinstance(kind, str) and kind in simple:
        return simple[kind]
    if kind == "array":
        items = schema.get("items")
        return _list_node(_node(items) if isinstance(items, Mapping) else _JSON)
    if kind == "object":
        properties = schema.get("properties")
        if isinstance(properties, Mapping) and properties:
            return _struct_node({str(name): _node(sub) for name, sub in properties.items()})
    return _JSON


# ---------------------------------------------------------------------------------------------
# Messages


def _shorten(text: str, limit: int = SHOWN_VALUE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _validation_reason(error: Any) -> str:
    """``$.path: message``, with a long offending value cut to :data:`SHOWN_VALUE_CHARS`."""
    message = str(error.message)
    shown = repr(error.instance)
    if len(shown) > SHOWN_VALUE_CHARS and shown in message:
        message = message.replace(shown, _shorten(shown))
    return f"{error.json_path}: {_one_line(_shorten(message, 4 * SHOWN_VALUE_CHARS))}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unfenced(text: str) -> str:
    stripped = text.strip()
    match = _FENCE.match(stripped)
    return match.group(1).strip() if match else stripped


def _parse_object(text: str) -> dict[str, Any] | Invalid:
    """The one JSON object ``text`` holds, or why it is not exactly one object."""
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    try:
        value, end = decoder.raw_decode(text)
    except (ValueError, RecursionError) as exc:
        return _not_json(text, exc)
    if text[end:].strip():
        return Invalid(
            "the answer has text after the JSON object; answer with the JSON object alone"
        )
    if not isinstance(value, dict):
        return Invalid(f"the answer is a JSON {type(value).__name__}, not a JSON object")
    return value


def _not_json(text: str, exc: Exception) -> Invalid:
    start = text.find("{")
    if start > 0:
        try:
            value, _ = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict):
            return Invalid(
                "the answer has prose around the JSON object; answer with the JSON object alone"
            )
    detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
    return Invalid(f"the answer is not valid JSON ({_one_line(_shorten(detail))})")


# ---------------------------------------------------------------------------------------------
# Loading


def _check_schema(schema: Any, *, source: Path, key: str) -> dict[str, Any]:
    """``schema`` as a plain dict, once it is a valid JSON Schema for one object."""
    if not isinstance(schema, Mapping):
        raise JobFileError(
            source,
            key,
            f"the output schema must be a JSON object, not {type(schema).__name__}.",
            'Write a table like {type = "object", properties = {...}} or a path to a .json file.',
        )
    plain: dict[str, Any] = json.loads(json.dumps(schema, default=str))
    # Imported here: only jobs with a schema pay its ~35 ms of start-up.
    from jsonschema import Draft202012Validator, SchemaError  # type: ignore[import-untyped,unused-ignore]

    try:
        Draft202012Validator.check_schema(plain)
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.path) or "top level"
        raise JobFileError(
            source,
            key,
            f"is not a valid JSON Schema ({where}: {_one_line(_shorten(str(exc.message), 200))}).",
            "Fix the schema; see https://json-schema.org/understanding-json-schema/.",
        ) from None
    properties = plain.get("properties")
    if plain.get("type") != "object" or not isinstance(properties, dict) or not properties:
        raise JobFileError(
            source,
            key,
            'the output schema\'s top level must be {"type": "object", "properties": {...}} '
            "with at least one property.",
            "Each top-level property becomes one output column.",
        )
    return plain


def _read_schema_file(value: str, *, source: Path, key: str) -> Any:
    path = source.parent / Path(value).expanduser()  # an absolute path stays as it is
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobFileError(
            source,
            key,
            f"cannot read the schema file {str(path)!r} ({exc}).",
            "Paths are relative to the job file's folder.",
        ) from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        detail = str(exc)
        raise JobFileError(
            source,
            key,
            f"the schema file {str(path)!r} is not valid JSON ({_one_line(detail)}).",
            "Fix the file.",
        ) from None


# ---------------------------------------------------------------------------------------------
# The public object


@dataclass(frozen=True, slots=True)
class OutputSchema:
    """A job's output schema: a JSON Schema whose top level is an object with properties."""

    schema: Mapping[str, Any]
    _validator: Any = field(init=False, repr=False, compare=False)
    _nodes: Mapping[str, _Node] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Built once: a validator and the column converters are reused for every answer.
        properties = self.schema.get("properties")
        names = properties if isinstance(properties, Mapping) else {}
        nodes = {str(name): _node(sub) for name, sub in names.items()}
        from jsonschema import Draft202012Validator

        object.__setattr__(self, "_validator", Draft202012Validator(self.schema))
        object.__setattr__(self, "_nodes", nodes)

    @classmethod
    def load(cls, value: Mapping[str, Any] | str, *, source: Path, key: str) -> OutputSchema:
        """The schema given inline (a TOML table) or as a path relative to the job file."""
        raw = _read_schema_file(value, source=source, key=key) if isinstance(value, str) else value
        return cls(_check_schema(raw, source=source, key=key))

    @classmethod
    def from_tool(
        cls, tools: Sequence[Mapping[str, Any]], name: str, *, source: Path, key: str
    ) -> OutputSchema:
        """The ``parameters`` schema of function ``name`` in an OpenAI ``tools`` list."""
        seen: list[str] = []
        for tool in tools:
            function = tool.get("function") if isinstance(tool, Mapping) else None
            if not isinstance(function, Mapping):
                continue
            seen.append(str(function.get("name")))
            if function.get("name") != name:
                continue
            parameters = function.get("parameters")
            if parameters is None:
                raise JobFileError(
                    source,
                    key,
                    f"the tool {name!r} has no `parameters` schema.",
                    "Give the function a parameters object schema.",
                )
            return cls(_check_schema(parameters, source=source, key=key))
        known = ", ".join(repr(n) for n in seen) or "none"
        raise JobFileError(
            source,
            key,
            f"no function named {name!r} among the tools (functions: {known}).",
            "Name one of the tools' functions.",
        )

    @property
    def columns(self) -> tuple[str, ...]:
        """The top-level property names, in schema order: one output column each."""
        return tuple(self._nodes)

    def arrow_fields(self) -> list[pa.Field]:
        """One typed, nullable field per top-level property."""
        return [pa.field(name, node.type, nullable=True) for name, node in self._nodes.items()]

    def instruction(self) -> str:
        """The prompt text telling the model the schema (the test server parses it)."""
        text = json.dumps(self.schema, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        return INSTRUCTION_HEAD + text + INSTRUCTION_TAIL

    def check(self, text: str | None) -> dict[str, Any] | Invalid:
        """The answer parsed, when it is one JSON object valid against the schema.

        Never raises: every problem becomes an :class:`Invalid` with one line of reason.
        """
        if not isinstance(text, str) or not text.strip() or text.strip().lower() in _EMPTY:
            return Invalid("the answer is empty")
        parsed = _parse_object(_unfenced(text))
        if isinstance(parsed, Invalid):
            return parsed
        from jsonschema.exceptions import best_match  # type: ignore[import-untyped,unused-ignore]

        try:
            error = best_match(self._validator.iter_errors(parsed))
        except RecursionError:
            return Invalid("the answer is nested too deeply")
        if error is not None:
            return Invalid(_validation_reason(error))
        for name, node in self._nodes.items():
            try:
                node.convert(parsed.get(name), f"$.{name}")
            except _OutOfRange as exc:
                shown = _shorten(str(exc.value))
                return Invalid(f"{exc.path}: {shown} does not fit a 64-bit number column")
        return parsed

    def reask(self, answer_error: str) -> str:
        """The user message asking the model to answer again, after ``answer_error``."""
        return REASK_TEMPLATE.format(error=answer_error)

    def column_arrays(self, instances: Sequence[Mapping[str, Any] | None]) -> list[pa.Array]:
        """One array per :meth:`arrow_fields`; a None instance gives nulls. Never raises."""
        return [
            _column(node, name, instances)
            for name, node in self._nodes.items()  # same order as arrow_fields
        ]


_EMPTY = frozenset({"", "null", "none", '""', "''"})


def _convert_or_null(node: _Node, value: Any, path: str) -> Any:
    try:
        return node.convert(value, path)
    except _OutOfRange:
        return None


def _column(node: _Node, name: str, instances: Sequence[Mapping[str, Any] | None]) -> pa.Array:
    path = f"$.{name}"
    values = [
        None
        if not isinstance(instance, Mapping)
        else _convert_or_null(node, instance.get(name), path)
        for instance in instances
    ]
    if node.enum:
        # A fixed dictionary (the enum in schema order) keeps codes equal across batches.
        index = {value: code for code, value in enumerate(node.enum)}
        codes = pa.array([None if v is None else index[v] for v in values], type=pa.int32())
        return pa.DictionaryArray.from_arrays(codes, pa.array(node.enum, type=pa.string()))
    return pa.array(values, type=node.type)
