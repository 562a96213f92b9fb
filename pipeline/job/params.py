"""Pure: the keys a job file's ``[request]`` table may hold, in one frozen table.

``[request]`` mixes pipeline's own settings (where to send, what to send) with parameters
that go into every request body. Only parameters known here are accepted, so a typo
(``temprature``) is an error instead of a key sent silently; a provider-specific key goes in
``[request.extra_body]`` on purpose. The parameters are OpenAI's chat-completions and
completions (FIM) request parameters and DeepSeek's extras, each with the endpoints that take
it (see https://platform.openai.com/docs/api-reference/chat/create and
https://api-docs.deepseek.com/api/create-chat-completion).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

CHAT: Final = "chat/completions"
COMPLETIONS: Final = "completions"
_BOTH = frozenset({CHAT, COMPLETIONS})
_CHAT = frozenset({CHAT})
_FIM = frozenset({COMPLETIONS})

OWN_KEYS: Final = frozenset(
    {
        "base_url",
        "api_key_env",
        "model",
        "endpoint",
        "system",
        "prompt",
        "suffix",
        "messages_column",
        "order",
        "mode",
        "extra_body",
    }
)
"""Keys of ``[request]`` that pipeline itself interprets (``prompt`` and ``suffix`` are
templates; what is sent is rendered from them)."""

REQUEST_PARAMS: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        # OpenAI: both chat completions and completions.
        "frequency_penalty": _BOTH,
        "logit_bias": _BOTH,
        "logprobs": _BOTH,  # chat: a boolean; completions: an integer
        "max_tokens": _BOTH,
        "n": _BOTH,
        "presence_penalty": _BOTH,
        "seed": _BOTH,
        "stop": _BOTH,
        "stream_options": _BOTH,
        "temperature": _BOTH,
        "top_p": _BOTH,
        "user": _BOTH,
        # OpenAI: chat completions only.
        "audio": _CHAT,
        "function_call": _CHAT,  # deprecated for tool_choice, still accepted
        "functions": _CHAT,  # deprecated for tools, still accepted
        "max_completion_tokens": _CHAT,
        "metadata": _CHAT,
        "modalities": _CHAT,
        "parallel_tool_calls": _CHAT,
        "prediction": _CHAT,
        "prompt_cache_key": _CHAT,
        "prompt_cache_retention": _CHAT,
        "reasoning_effort": _CHAT,  # OpenAI's, and DeepSeek's with thinking on
        "response_format": _CHAT,
        "safety_identifier": _CHAT,
        "service_tier": _CHAT,
        "store": _CHAT,
        "tool_choice": _CHAT,
        "tools": _CHAT,
        "top_logprobs": _CHAT,
        "verbosity": _CHAT,
        "web_search_options": _CHAT,
        # OpenAI: completions (FIM) only; `suffix` is one of pipeline's own keys.
        "best_of": _FIM,
        "echo": _FIM,
        # DeepSeek. Its FIM endpoint is non-thinking; `thinking = "disabled"` is harmless there.
        "thinking": _BOTH,
    }
)
"""Request-body parameters by name, with the endpoints that take each."""

SET_BY_PIPELINE: Final[Mapping[str, str]] = MappingProxyType(
    {
        "messages": "Use `prompt`/`system` or `messages_column` instead.",
        "model": "Use `model` in [request] instead.",
        "prompt": "Use `prompt` in [request] instead.",
        "suffix": "Use `suffix` in [request] instead.",
        "stream": "Remove it.",
        "stream_options": "Remove it.",
    }
)
"""Body keys that pipeline writes itself (or that need streaming, which it never asks for):
no table may set them, and the fix for each."""

SECRET_NAMES: Final = frozenset(
    {
        "api_key",
        "apikey",
        "api-key",
        "x-api-key",
        "authorization",
        "token",
        "access_token",
        "secret",
        "client_secret",
        "password",
    }
)
"""Key names that hold credentials (compared case-insensitively)."""

SECRET_PREFIXES: Final = ("sk-", "bearer ")
"""How string values that hold an API key or an Authorization header start (compared
case-insensitively)."""

SECRET_FIX: Final = 'Use api_key_env = "NAME_OF_VARIABLE" and export the key.'


def known_keys() -> tuple[str, ...]:
    """Every key ``[request]`` accepts, sorted (the candidates for "did you mean")."""
    return tuple(sorted(OWN_KEYS | REQUEST_PARAMS.keys()))


def closest_key(key: str) -> str | None:
    """The known key ``key`` was most likely meant to be, if one is close enough."""
    wanted = key.strip().lower().replace("-", "_")
    longer = [known for known in known_keys() if len(wanted) >= 3 and known.startswith(wanted)]
    if len(longer) == 1:
        return longer[0]  # `temp` -> `temperature`, `reasoning` -> `reasoning_effort`
    matches = difflib.get_close_matches(wanted, known_keys(), n=1, cutoff=0.75)
    return matches[0] if matches else None


def is_secret_name(key: str) -> bool:
    return key.strip().lower() in SECRET_NAMES


def is_secret_value(value: object) -> bool:
    """An API key (``sk-...``) or an Authorization header's value (``Bearer ...``)."""
    return isinstance(value, str) and value.lstrip().lower().startswith(SECRET_PREFIXES)
