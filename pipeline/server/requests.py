"""The built-in server's reading of request bodies (pure): what a chat-completions or
completions body asks for (including a JSON Schema written into the prompt), checked as OpenAI
checks it, with OpenAI's wording in the 400 it gives otherwise; and what the server derives
from a request (its reply's seed, its prompt's tokens). :mod:`pipeline.server.app` serves them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pipeline.rows import tokens
from pipeline.server.simulate import Tool

DEFAULT_MAX_TOKENS: Final = 256


class InvalidRequest(Exception):
    """A request the server answers with 400 ``invalid_request_error``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatRequest:
    """The parts of a chat-completions body the server acts on.

    ``schema`` is the JSON Schema the answer should follow (JSON mode only) and ``tool`` the
    function the answer calls, when the body has ``tools`` and ``tool_choice`` is not "none".
    """

    body: Mapping[str, Any]
    model: str
    messages: Sequence[Mapping[str, Any]]
    max_tokens: int
    thinking: bool
    reasoning_effort: str
    json_mode: bool
    schema: Mapping[str, Any] | None = None
    strict: bool = False
    """``response_format.json_schema.strict``: the answer always follows ``schema``."""
    tool: Tool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CompletionRequest:
    """The parts of a (FIM) completions body the server acts on; never in thinking mode."""

    body: Mapping[str, Any]
    model: str
    prompt: str
    suffix: str | None
    max_tokens: int


AnyRequest = ChatRequest | CompletionRequest


def _json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or the 400 OpenAI gives for anything else."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly.)"
        ) from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def _checked_model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("Missing required parameter: 'model'.", "model")
    return model


def _checked_max_tokens(body: Mapping[str, Any]) -> int:
    """``max_tokens`` (or ``max_completion_tokens``); streaming is refused here too."""
    if body.get("stream") is True:
        raise InvalidRequest("streaming is not supported by the built-in server", "stream")
    max_tokens = DEFAULT_MAX_TOKENS
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(
                f"Invalid '{name}': expected an integer of at least 1, got {value!r}.", name
            )
        max_tokens = value
    return max_tokens


def _checked_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("Missing required parameter: 'messages'.", "messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("Invalid 'messages': expected a non-empty array.", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"Invalid 'messages[{index}]': expected an object with a 'role'.",
                f"messages[{index}]",
            )
    return messages


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Validate a request body; raises :class:`InvalidRequest` with OpenAI's wording."""
    body = _json_object(raw)
    model = _checked_model(body)
    messages = _checked_messages(body)
    max_tokens = _checked_max_tokens(body)
    json_mode, schema, strict = _response_format(body.get("response_format"), messages)
    explicit = "thinking" in body or "reasoning_effort" in body
    thinking = tokens.thinking_enabled(body) and (explicit or tokens.is_deepseek_model(model))
    return ChatRequest(
        body=body,
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        thinking=thinking,
        reasoning_effort=str(body.get("reasoning_effort") or "high"),
        json_mode=json_mode,
        schema=schema,
        strict=strict,
        tool=_chosen_tool(body.get("tools"), body.get("tool_choice")),
    )


JSON_WORD_MESSAGE: Final = (
    "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
    "'json_object'."
)


def _response_format(
    response_format: Any, messages: Sequence[Mapping[str, Any]]
) -> tuple[bool, Mapping[str, Any] | None, bool]:
    """``(json_mode, schema, strict)`` of a body's ``response_format``.

    ``json_object`` (DeepSeek's only kind) takes its schema from the prompt and, as OpenAI
    does, needs the word "json" somewhere in the messages; ``json_schema`` carries it, and
    with ``strict: true`` its answers always follow it.
    """
    if not isinstance(response_format, dict):
        return False, None, False
    kind = response_format.get("type")
    if kind == "json_object":
        if not any("json" in text.lower() for text in message_texts(messages)):
            raise InvalidRequest(JSON_WORD_MESSAGE, "messages")
        return True, schema_in_messages(messages), False
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequest(
                "Missing required parameter: 'response_format.json_schema'.",
                "response_format.json_schema",
            )
        schema = spec.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise InvalidRequest(
                "Invalid 'response_format.json_schema.schema': expected an object.",
                "response_format.json_schema.schema",
            )
        return True, schema, schema is not None and spec.get("strict") is True
    return False, None, False


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


_FUNCTION_NAME: Final = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _checked_tools(tools: Any) -> list[Tool]:
    """The functions of a body's ``tools``, or the 400 OpenAI gives for a malformed entry."""
    if not isinstance(tools, list):
        raise InvalidRequest("Invalid type for 'tools': expected an array.", "tools")
    if not tools:
        raise InvalidRequest(
            "Invalid 'tools': empty array. Expected an array with minimum length 1, but got an "
            "empty array instead.",
            "tools",
        )
    checked: list[Tool] = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"Invalid type for '{where}': expected an object.", where)
        if tool.get("type") != "function":
            raise InvalidRequest(
                f"Invalid value: {tool.get('type')!r}. Supported values are: 'function'.",
                f"{where}.type",
            )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidRequest(f"Missing required parameter: '{where}.function'.", where)
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise InvalidRequest(
                f"Invalid '{where}.function.name': expected a string that matches the pattern "
                "'^[a-zA-Z0-9_-]{1,64}$'.",
                f"{where}.function.name",
            )
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidRequest(
                f"Invalid type for '{where}.function.parameters': expected an object.",
                f"{where}.function.parameters",
            )
        checked.append(
            Tool(name=name, parameters=parameters, strict=function.get("strict") is True)
        )
    return checked


def _chosen_tool(tools: Any, choice: Any) -> Tool | None:
    """The function the answer calls: the named one, else the first ("auto", "required")."""
    if tools is None:
        if choice is not None:
            raise InvalidRequest(
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
                "are specified.",
                "tool_choice",
            )
        return None
    functions = _checked_tools(tools)
    if choice is None or choice in ("auto", "required"):
        return functions[0]
    if choice == "none":
        return None
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or name is None:
        raise InvalidRequest(
            "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}.',
            "tool_choice",
        )
    for tool in functions:
        if tool.name == name:
            return tool
    raise InvalidRequest(
        f"Invalid value for 'tool_choice': no function named {name!r} in 'tools'.", "tool_choice"
    )


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """Validate a (FIM) completions body: ``model`` and a string ``prompt``; ``suffix`` too."""
    body = _json_object(raw)
    model = _checked_model(body)
    max_tokens = _checked_max_tokens(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest("Missing required parameter: 'prompt'.", "prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest("Invalid type for 'prompt': expected a string.", "prompt")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise InvalidRequest("Invalid type for 'suffix': expected a string.", "suffix")
    return CompletionRequest(
        body=body, model=model, prompt=prompt, suffix=suffix, max_tokens=max_tokens
    )


def message_texts(messages: Sequence[Mapping[str, Any]]) -> Generator[str, None, None]:
    """The text of each message's content (a string or a list of text parts)."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    yield str(part.get("text", ""))


def request_texts(request: AnyRequest) -> Iterable[str]:
    """The prompt text of a request, where ``reject_substring`` looks."""
    if isinstance(request, ChatRequest):
        return message_texts(request.messages)
    return (request.prompt, request.suffix or "")


def reply_seed(request: AnyRequest, seed: int) -> int:
    """The seed of a request's reply: a hash of its model, prompt and the server's seed.

    The prompt is the messages of a chat request (a re-asked request, with more messages,
    draws anew) or the prompt and suffix of a completion.
    """
    if isinstance(request, ChatRequest):
        prompt: Any = request.messages
    else:
        prompt = {"prompt": request.prompt, "suffix": request.suffix}
    text = json.dumps([seed, request.model, prompt], sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------
# Prompt measurement and the prefix cache (pure)


def prompt_token_ids(request: AnyRequest) -> tuple[int, list[int] | None]:
    """``(prompt_tokens, token ids)``: ids only for DeepSeek models, which are counted exactly.

    The layout is :func:`pipeline.rows.tokens.deepseek_layout` (chat with tools, or FIM), so the
    count equals :func:`pipeline.rows.tokens.count_prompt_tokens`; other models get its estimate.
    """
    if not tokens.is_deepseek_model(request.model):
        return tokens.count_prompt_tokens([request.body])[0], None
    text = tokens.deepseek_layout(request.body)
    ids = tokens.deepseek_tokenizer().encode(text, add_special_tokens=False).ids
    return len(ids), ids
