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
and holds a JSON object (:func:`pipeline.server.requests.schema_in_messages`). The instances are
drawn by :mod:`pipeline.server.schema_answers`, which tells which keywords it supports. Without
a schema the answer is a small ``{"label", "confidence", "tags"}`` object.

A fraction ``invalid_json_rate`` of schema answers (tool call arguments too) is made to violate
the schema, as real models do: a required property missing, a value outside its enum, a value of
the wrong type (a number written as a string), a number out of range, or prose around the JSON.
A request that asks for ``strict`` structured output (``response_format.json_schema.strict``,
or a tool's ``function.strict``) always gets a conforming answer, as OpenAI guarantees (an
answer cut by ``max_tokens`` is still cut).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.rows import tokens
from pipeline.server.schema_answers import schema_answer
from pipeline.server.words import STARTERS, WORDS

# ---------------------------------------------------------------------------------------------
# Reply text


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
    starters = [w.capitalize() for w in STARTERS]
    candidates = [
        *(f" {w}" for w in WORDS),
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
    words = tuple(f" {w}" for w in WORDS if f" {w}" in single)
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
# Replies


@dataclass(frozen=True, slots=True, kw_only=True)
class Tool:
    """The function a request makes the model call, with its parameters' JSON Schema."""

    name: str
    parameters: Mapping[str, Any]
    strict: bool = False
    """``function.strict``: the provider guarantees arguments that follow the schema."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatedToolCall:
    """One function call in an answer; ``arguments`` is JSON text (possibly cut or invalid)."""

    id: str
    name: str
    arguments: str

    def to_json(self) -> dict[str, Any]:
        """The call as an OpenAI ``tool_calls`` entry."""
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatedReply:
    """A generated answer and its exact token counts.

    ``content`` is None when the answer is a tool call: the arguments are then the answer
    tokens (``content_tokens``).
    """

    content: str | None
    reasoning: str | None
    content_tokens: int
    reasoning_tokens: int
    finish_reason: str
    tool_calls: tuple[SimulatedToolCall, ...] = ()

    @property
    def completion_tokens(self) -> int:
        return self.content_tokens + self.reasoning_tokens


class ReplyOptions(Protocol):
    """The server options a reply depends on (:class:`pipeline.server.options.ServerOptions`)."""

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
) -> tuple[SimulatedToolCall, int, bool]:
    rate = 0.0 if tool.strict else options.invalid_json_rate
    arguments = schema_answer(tool.parameters, rng, rate)
    text, count, cut = cut_to_budget(arguments, budget)
    call = SimulatedToolCall(id=f"call_{rng.getrandbits(96):024x}", name=tool.name, arguments=text)
    return call, count, cut


def make_reply(
    request: ReplyRequest, rng: random.Random, options: ReplyOptions, vocab: Vocabulary
) -> SimulatedReply:
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
            return SimulatedReply(
                content="",
                reasoning=reasoning,
                content_tokens=0,
                reasoning_tokens=reasoning_tokens,
                finish_reason="length",
            )
        budget -= reasoning_tokens
    if request.tool is not None:
        call, count, cut = _tool_call(request.tool, rng, options, budget)
        return SimulatedReply(
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
    return SimulatedReply(
        content=content,
        reasoning=reasoning,
        content_tokens=content_tokens,
        reasoning_tokens=reasoning_tokens,
        finish_reason="length" if cut else "stop",
    )


def fim_reply(
    max_tokens: int, rng: random.Random, options: ReplyOptions, vocab: Vocabulary
) -> SimulatedReply:
    """The text a FIM completion fills the hole with (non-thinking only, so no reasoning)."""
    text, count, cut = text_reply(rng, options, vocab, max_tokens)
    return SimulatedReply(
        content=text,
        reasoning=None,
        content_tokens=count,
        reasoning_tokens=0,
        finish_reason="length" if cut else "stop",
    )
