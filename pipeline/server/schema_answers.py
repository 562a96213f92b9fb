"""Answers that follow a JSON Schema, or break it on purpose (pure, seeded).

:func:`schema_instance` draws a random instance of a JSON Schema. It supports ``type`` (lists
too), ``enum``, ``const``, ``anyOf``/``oneOf`` (one branch), ``allOf`` (merged), local ``$ref``
(``#/...``, as pydantic writes ``$defs``), string lengths and a few ``format`` values, numeric
bounds (inclusive and exclusive, draft 4 and later) and ``multipleOf`` for integers, arrays
(``items``, ``minItems``/``maxItems``, ``uniqueItems``) and objects (all required properties,
each optional one with probability one half, ``minProperties``, maps via
``additionalProperties``). ``pattern`` is not honoured.

:func:`violating_text` makes an instance violate its schema, as real models do: a required
property missing, a value outside its enum, a value of the wrong type (a number written as a
string), a number out of range, or prose around the JSON. :func:`schema_answer` does the one or
the other: a fraction ``invalid_rate`` of its answers break the schema.
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pipeline.server.words import WORDS

# ---------------------------------------------------------------------------------------------
# Schema instances

_SOFT_DEPTH: Final = 6  # deeper than this, only what is required (keeps recursive $refs finite)
_HARD_DEPTH: Final = 40
_TYPES: Final = ("string", "integer", "number", "boolean", "object", "array", "null")
_FORMATS: Final = ("date-time", "date", "time", "email", "uri", "url", "uuid")


def _merge(schemas: Sequence[Any]) -> dict[str, Any]:
    """``allOf`` as one schema: properties and required lists united, other keys overridden."""
    merged: dict[str, Any] = {}
    for schema in schemas:
        if not isinstance(schema, Mapping):
            continue
        for key, value in schema.items():
            if key == "properties" and isinstance(value, Mapping):
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif key == "required" and isinstance(value, list):
                merged["required"] = [*merged.get("required", []), *value]
            else:
                merged[key] = value
    return merged


def _pointer(root: Any, ref: str) -> Any:
    """The part of ``root`` a local ``$ref`` (``#/a/b``) points to, or ``{}`` when unknown."""
    if not ref.startswith("#"):
        return {}
    node = root
    for raw in ref[1:].split("/")[1:] if ref != "#" else []:
        key = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return {}
    return node


def _types_of(schema: Mapping[str, Any]) -> list[str]:
    """The JSON types a schema allows: its ``type``, else what its keywords imply."""
    declared = schema.get("type")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list) and declared:
        return [t for t in declared if isinstance(t, str)]
    if "properties" in schema or "required" in schema or "additionalProperties" in schema:
        return ["object"]
    if "items" in schema or "minItems" in schema or "maxItems" in schema:
        return ["array"]
    if any(key in schema for key in ("minimum", "maximum", "exclusiveMinimum", "multipleOf")):
        return ["number"]
    return ["string"]


class _Instances:
    """Draws instances of one schema (the root that local ``$ref`` pointers resolve against)."""

    def __init__(self, root: Any, rng: random.Random) -> None:
        self.root = root
        self.rng = rng

    def resolve(self, schema: Any) -> Any:
        """``schema`` with ``$ref`` followed and ``allOf`` merged (a few levels at most)."""
        for _ in range(16):
            if not isinstance(schema, Mapping):
                return schema
            if isinstance(schema.get("$ref"), str):
                rest = {k: v for k, v in schema.items() if k != "$ref"}
                schema = _merge([_pointer(self.root, schema["$ref"]), rest])
            elif isinstance(schema.get("allOf"), list):
                rest = {k: v for k, v in schema.items() if k != "allOf"}
                schema = _merge([*schema["allOf"], rest])
            else:
                return schema
        return schema

    def value(self, schema: Any, depth: int = 0) -> Any:
        """A random instance of ``schema``."""
        schema = self.resolve(schema)
        rng = self.rng
        if schema is False or depth > _HARD_DEPTH:
            return None
        if not isinstance(schema, Mapping):  # true or junk: anything goes
            return rng.choice(WORDS)
        if "const" in schema:
            return copy.deepcopy(schema["const"])
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return copy.deepcopy(rng.choice(schema["enum"]))
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                rest = {k: v for k, v in schema.items() if k != key}
                return self.value(_merge([rest, self._branch(branches, depth)]), depth)
        kinds = _types_of(schema)
        kind = "null" if depth >= _SOFT_DEPTH and "null" in kinds else rng.choice(kinds)
        return self._of_type(kind, schema, depth)

    def _branch(self, branches: list[Any], depth: int) -> Any:
        if depth >= _SOFT_DEPTH:
            for branch in branches:
                if isinstance(branch, Mapping) and branch.get("type") == "null":
                    return branch
        return self.rng.choice(branches)

    def _of_type(self, kind: str, schema: Mapping[str, Any], depth: int) -> Any:
        if kind == "string":
            return self.string(schema)
        if kind == "integer":
            return self.integer(schema)
        if kind == "number":
            return self.number(schema)
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "array":
            return self.array(schema, depth)
        if kind == "object":
            return self.object(schema, depth)
        return None

    def string(self, schema: Mapping[str, Any]) -> str:
        """A few words, or a value of the ``format``, within minLength..maxLength."""
        rng = self.rng
        fmt = schema.get("format")
        if fmt in _FORMATS:
            return _formatted(str(fmt), rng)
        low = _int_or(schema.get("minLength"), 0)
        high = schema.get("maxLength")
        text = " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))
        while len(text) < low:
            text += " " + rng.choice(WORDS)
        if isinstance(high, int) and not isinstance(high, bool) and len(text) > high:
            text = text[: max(high, 0)]
            if text.endswith(" "):
                text = text[:-1] + "s"
        return text

    def integer(self, schema: Mapping[str, Any]) -> int:
        """An integer within the bounds, a multiple of ``multipleOf`` when one fits."""
        low, high = _integer_bounds(schema)
        step = schema.get("multipleOf")
        if isinstance(step, int) and not isinstance(step, bool) and step > 0:
            first, last = -(-low // step), high // step
            if first <= last:
                return self.rng.randint(first, last) * step
        return self.rng.randint(low, high) if low <= high else low

    def number(self, schema: Mapping[str, Any]) -> float:
        """A number within the bounds, with two decimals when rounding keeps it inside."""
        low, low_open, high, high_open = _number_bounds(schema)
        value = self.rng.uniform(low, high)
        for candidate in (round(value, 2), value, (low + high) / 2):
            if _inside(candidate, low, low_open, high, high_open):
                return candidate
        return low

    def array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        """Items within minItems..maxItems; distinct when ``uniqueItems`` asks for it."""
        rng = self.rng
        low = _int_or(schema.get("minItems"), 0)
        high = _int_or(schema.get("maxItems"), low + 3)
        upper = max(low, min(high, low + 3))
        count = low if depth >= _SOFT_DEPTH else rng.randint(max(low, min(1, upper)), upper)
        items = schema.get("items", {})
        if isinstance(items, list):  # draft 4 tuple form: one schema per position
            return [self.value(item, depth + 1) for item in items]
        if not schema.get("uniqueItems"):
            return [self.value(items, depth + 1) for _ in range(count)]
        resolved = self.resolve(items)
        if isinstance(resolved, Mapping) and isinstance(resolved.get("enum"), list):
            pool = resolved["enum"]
            return copy.deepcopy(rng.sample(pool, min(count, len(pool))))
        return self._distinct(items, count, depth)

    def _distinct(self, items: Any, count: int, depth: int) -> list[Any]:
        values: list[Any] = []
        seen: set[str] = set()
        for _ in range(count * 10):
            if len(values) == count:
                break
            value = self.value(items, depth + 1)
            key = json.dumps(value, sort_keys=True)
            if key not in seen:
                seen.add(key)
                values.append(value)
        return values

    def object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        """Every required property, each optional one with probability one half."""
        rng = self.rng
        properties = schema.get("properties")
        properties = properties if isinstance(properties, Mapping) else {}
        required = [r for r in schema.get("required") or [] if isinstance(r, str)]
        result: dict[str, Any] = {}
        optional: list[str] = []
        for name, sub in properties.items():
            if name in required or (depth < _SOFT_DEPTH and rng.random() < 0.5):
                result[name] = self.value(sub, depth + 1)
            else:
                optional.append(name)
        extra = schema.get("additionalProperties")
        extra_schema = extra if isinstance(extra, Mapping) else {}
        for name in required:
            if name not in result:
                result[name] = self.value(extra_schema, depth + 1)
        wanted = _int_or(schema.get("minProperties"), 0)
        while len(result) < wanted and optional:
            name = optional.pop(0)
            result[name] = self.value(properties[name], depth + 1)
        if isinstance(extra, Mapping) and not properties and depth < _SOFT_DEPTH:
            wanted = max(wanted, rng.randint(1, 2))  # a map: a few entries
        while extra is not False and len(result) < wanted:
            key = f"{rng.choice(WORDS)}_{len(result)}"
            result[key] = self.value(extra_schema, depth + 1)
        return result


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _number_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _number_bounds(schema: Mapping[str, Any]) -> tuple[float, bool, float, bool]:
    """``(low, low exclusive, high, high exclusive)``; draft 4's boolean form understood."""
    low = _number_or_none(schema.get("minimum"))
    high = _number_or_none(schema.get("maximum"))
    low_open = high_open = False
    below, above = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if below is True or above is True:  # draft 4: a flag on minimum / maximum
        low_open, high_open = below is True, above is True
    bound = _number_or_none(below)
    if bound is not None and (low is None or bound >= low):
        low, low_open = bound, True
    bound = _number_or_none(above)
    if bound is not None and (high is None or bound <= high):
        high, high_open = bound, True
    if low is None and high is None:
        low, high = 0.0, 100.0
    elif low is None:
        low = high - 100.0 if high is not None else 0.0
    if high is None:
        high = low + 100.0
    return low, low_open, high, high_open


def _inside(value: float, low: float, low_open: bool, high: float, high_open: bool) -> bool:
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return above and below


def _integer_bounds(schema: Mapping[str, Any]) -> tuple[int, int]:
    """The inclusive integer range of a schema's numeric bounds."""
    low, low_open, high, high_open = _number_bounds(schema)
    first = math.floor(low) + 1 if low_open else math.ceil(low)
    last = math.ceil(high) - 1 if high_open else math.floor(high)
    return first, last


def _formatted(fmt: str, rng: random.Random) -> str:
    """A plausible value of a string ``format``."""
    year, month, day = rng.randint(2015, 2030), rng.randint(1, 12), rng.randint(1, 28)
    hour, minute, second = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)
    date = f"{year:04d}-{month:02d}-{day:02d}"
    clock = f"{hour:02d}:{minute:02d}:{second:02d}Z"
    if fmt == "date":
        return date
    if fmt == "time":
        return clock
    if fmt == "date-time":
        return f"{date}T{clock}"
    if fmt == "email":
        return f"{rng.choice(WORDS)}@example.com"
    if fmt == "uuid":
        text = f"{rng.getrandbits(128):032x}"
        return f"{text[:8]}-{text[8:12]}-4{text[13:16]}-a{text[17:20]}-{text[20:]}"
    return f"https://example.com/{rng.choice(WORDS)}"


def schema_instance(schema: Mapping[str, Any], rng: random.Random) -> Any:
    """A random instance of the JSON Schema ``schema`` (local ``$ref`` resolve against it)."""
    return _Instances(schema, rng).value(schema)


# ---------------------------------------------------------------------------------------------
# Schema violations

_PROSE_BEFORE: Final = (
    "Sure! Here is the JSON: ",
    "Here is the requested JSON object:\n",
    "Certainly. ",
)
_PROSE_AFTER: Final = ("", "\nLet me know if you need anything else.", " I hope this helps.")
VIOLATIONS: Final = ("missing", "enum", "type", "range", "prose")


@dataclass(frozen=True, slots=True)
class _Site:
    """A place in an instance where one kind of violation can be made."""

    kind: str
    parent: dict[str, Any] | list[Any]
    key: Any  # str for an object, int for an array
    schema: Mapping[str, Any]


def _allowed_types(schema: Mapping[str, Any]) -> set[str] | None:
    declared = schema.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list) and declared:
        return {t for t in declared if isinstance(t, str)}
    return None


def _sites(
    gen: _Instances, parent: dict[str, Any] | list[Any], key: Any, schema: Any
) -> Iterator[_Site]:
    """Every violation the value ``parent[key]`` (an instance of ``schema``) can be given.

    Branching schemas (``anyOf``/``oneOf``) are skipped: a change there might still match
    another branch, and a violation must be certain.
    """
    schema = gen.resolve(schema)
    if not isinstance(schema, Mapping) or "anyOf" in schema or "oneOf" in schema:
        return
    value = parent[key]
    if isinstance(schema.get("enum"), list):
        yield _Site("enum", parent, key, schema)
    types = _allowed_types(schema)
    if types is not None and _wrong_types(types):
        yield _Site("type", parent, key, schema)
    if types is not None and types <= {"integer", "number"} and _range_breakers(schema):
        yield _Site("range", parent, key, schema)
    if isinstance(value, dict):
        required = schema.get("required") or []
        for name in required:
            if name in value:
                yield _Site("missing", value, name, schema)
        properties = schema.get("properties") or {}
        for name, sub in properties.items():
            if name in value:
                yield from _sites(gen, value, name, sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index in range(len(value)):
            yield from _sites(gen, value, index, schema["items"])


def _wrong_types(types: set[str]) -> list[str]:
    """The JSON types a value could take to break ``types`` (string first: the common slip)."""
    return [
        kind
        for kind, allowed_by in (
            ("string", {"string"}),
            ("integer", {"integer", "number"}),
            ("boolean", {"boolean"}),
            ("null", {"null"}),
            ("array", {"array"}),
        )
        if not types & allowed_by
    ]


def _wrong_type(value: Any, types: set[str], rng: random.Random) -> Any:
    """A value of a type that ``types`` does not allow: a number written as a string, say."""
    kind = _wrong_types(types)[0]
    if kind == "string":
        return str(value) if isinstance(value, int | float) else rng.choice(WORDS)
    if kind == "integer":
        return rng.randint(1, 99)
    if kind == "boolean":
        return True
    return None if kind == "null" else [rng.choice(WORDS)]


def _range_breakers(schema: Mapping[str, Any]) -> list[float]:
    """Numbers just outside a schema's bounds (below a minimum, at an exclusive bound...)."""
    values: list[float] = []
    for key, shift in (("minimum", -1), ("maximum", 1)):
        bound = _number_or_none(schema.get(key))
        if bound is not None:
            values.append(bound + shift)
    for key, base in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = schema.get(key)
        bound = _number_or_none(schema.get(base) if flag is True else flag)
        if bound is not None:
            values.append(bound)
    return values


def _out_of_range(schema: Mapping[str, Any], rng: random.Random) -> float:
    value = rng.choice(_range_breakers(schema))
    return int(value) if value == int(value) else value


def _outside_enum(enum: list[Any], rng: random.Random) -> Any:
    value = rng.choice(("other", "unknown", "unsure", "n/a"))
    while value in enum:
        value += "_"
    return value


def _apply(site: _Site, rng: random.Random) -> None:
    parent, key = site.parent, site.key
    if site.kind == "missing":
        assert isinstance(parent, dict)
        del parent[key]
    elif site.kind == "enum":
        parent[key] = _outside_enum(site.schema["enum"], rng)
    elif site.kind == "type":
        parent[key] = _wrong_type(parent[key], _allowed_types(site.schema) or set(), rng)
    else:
        parent[key] = _out_of_range(site.schema, rng)


def violating_text(schema: Mapping[str, Any], instance: Any, rng: random.Random) -> str:
    """JSON text that breaks ``schema``: ``instance`` with one violation drawn at random.

    The kind is drawn first among those this instance allows (prose is always possible), then
    the place, so rare kinds are not drowned by common ones.
    """
    gen = _Instances(schema, rng)
    holder = [copy.deepcopy(instance)]
    root_is_container = isinstance(instance, dict | list)
    sites = [  # a whole answer of the wrong type is not a slip models make
        site
        for site in _sites(gen, holder, 0, schema)
        if not (root_is_container and site.parent is holder)
    ]
    kinds = sorted({site.kind for site in sites} | {"prose"}, key=VIOLATIONS.index)
    kind = rng.choice(kinds)
    if kind == "prose":
        text = json.dumps(instance, ensure_ascii=False)
        return rng.choice(_PROSE_BEFORE) + text + rng.choice(_PROSE_AFTER)
    _apply(rng.choice([site for site in sites if site.kind == kind]), rng)
    return json.dumps(holder[0], ensure_ascii=False)


def schema_answer(schema: Mapping[str, Any], rng: random.Random, invalid_rate: float) -> str:
    """JSON text of an instance of ``schema``; with probability ``invalid_rate`` a broken one."""
    instance = schema_instance(schema, rng)
    if rng.random() < invalid_rate:
        return violating_text(schema, instance, rng)
    return json.dumps(instance, ensure_ascii=False)
