from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.rows.templating import (
    RenderFailure,
    RequestTemplate,
    encode_body,
    messages_from_column,
    placeholders,
    render_prompt,
    request_key,
)


def template(**kwargs: object) -> RequestTemplate:
    base: dict[str, object] = {
        "model": "m",
        "system": None,
        "prompt": "Review: {text}",
        "messages_column": None,
        "params": {"max_tokens": 8},
    }
    base.update(kwargs)
    return RequestTemplate(**base)  # type: ignore[arg-type]


def test_placeholders_in_order_without_duplicates() -> None:
    assert placeholders("{a} and {b} then {a} {{literal}}") == ("a", "b")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{}", "empty placeholder"),
        ("{a.b}", "plain column name"),
        ("{a[0]}", "plain column name"),
        ("{a:>10}", "format spec"),
        ("{a!r}", "format spec"),
        ("{a", "malformed template"),
    ],
)
def test_malformed_placeholders_are_rejected(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        placeholders(text)


def test_render_fills_values_and_keeps_literal_braces() -> None:
    assert render_prompt("{{x}} {a}: {b}", ("a", "b"), {"a": "A", "b": 2}) == "{x} A: 2"


def test_integral_floats_render_without_a_trailing_zero() -> None:
    assert render_prompt("{n}", ("n",), {"n": 3.0}) == "3"


def test_null_value_is_a_failure_not_the_word_none() -> None:
    result = render_prompt("{a}", ("a",), {"a": None})
    assert result == RenderFailure("column 'a' is null in this row")


def test_empty_rendered_prompt_is_a_failure() -> None:
    assert isinstance(render_prompt("{a}", ("a",), {"a": "   "}), RenderFailure)


def test_body_has_system_then_user_and_params() -> None:
    body = template(system="Be brief.").body({"text": "great"})
    assert body == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Review: great"},
        ],
        "max_tokens": 8,
    }


def test_messages_column_accepts_lists_and_json_strings() -> None:
    messages = [{"role": "user", "content": "hi"}]
    t = template(prompt=None, messages_column="messages")
    assert t.body({"messages": messages}) == {"model": "m", "messages": messages, "max_tokens": 8}
    assert t.body({"messages": json.dumps(messages)}) == t.body({"messages": messages})


@pytest.mark.parametrize(
    "value",
    [None, [], "not json", [{"role": "wizard", "content": "x"}], [{"role": "user"}], ["x"]],
)
def test_bad_messages_become_failures(value: object) -> None:
    assert isinstance(messages_from_column(value, "messages"), RenderFailure)


def test_request_key_follows_what_is_sent() -> None:
    body = encode_body({"model": "m", "messages": []})
    key = request_key("http://x/v1/chat/completions", body, "1")
    assert key == request_key("http://x/v1/chat/completions", body, "1")
    assert key != request_key("http://y/v1/chat/completions", body, "1")
    assert key != request_key("http://x/v1/chat/completions", body, "2")
    other = encode_body({"model": "m", "messages": [], "temperature": 0})
    assert key != request_key("http://x/v1/chat/completions", other, "1")


def test_encoded_body_is_canonical() -> None:
    assert encode_body({"b": 1, "a": "é"}) == encode_body({"a": "é", "b": 1})
    assert encode_body({"a": "é"}) == '{"a":"é"}'.encode()


@given(st.text(alphabet=st.characters(blacklist_characters="{}"), max_size=50))
def test_text_without_braces_renders_to_itself(text: str) -> None:
    if text.strip():
        assert render_prompt(text, (), {}) == text
