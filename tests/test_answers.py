"""The verdict on an answer (pipeline.rows.verdict): pure, no network."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.results import Reply, ToolCall
from pipeline.rows.schema import OutputSchema
from pipeline.rows.verdict import AnswerRules, AskAgain, Fail, Keep, judge

SCHEMA = OutputSchema.load(
    {
        "type": "object",
        "required": ["label"],
        "properties": {"label": {"type": "string", "enum": ["yes", "no"]}},
    },
    source=Path("job.toml"),
    key="[output] schema",
)
BODY = json.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "Is it? Answer in JSON."}]}
).encode()


def reply(content: str | None, finish: str = "stop", calls: tuple[ToolCall, ...] = ()) -> Reply:
    return Reply(content=content, reasoning=None, finish_reason=finish, model="m", tool_calls=calls)


def test_a_cut_off_answer_fails_as_truncated_whatever_it_says() -> None:
    rules = AnswerRules(schema=SCHEMA, max_tokens=64, thinking=True)
    verdict = judge(
        reply('{"label": "yes"}', "length"), body=BODY, reasks=0, output_tokens=64, rules=rules
    )
    assert isinstance(verdict, Fail)
    assert verdict.error.startswith("truncated: the answer reached max_tokens (64) with thinking")


def test_without_a_schema_any_whole_answer_is_kept() -> None:
    assert (
        judge(reply("anything"), body=BODY, reasks=0, output_tokens=1, rules=AnswerRules())
        == Keep()
    )


def test_a_valid_answer_is_kept_parsed() -> None:
    verdict = judge(
        reply('```json\n{"label": "no"}\n```'),
        body=BODY,
        reasks=1,
        output_tokens=9,
        rules=AnswerRules(schema=SCHEMA),
    )
    assert verdict == Keep({"label": "no"})


def test_an_invalid_answer_is_asked_again_with_the_error_then_fails() -> None:
    rules = AnswerRules(schema=SCHEMA, max_reasks=1)
    bad = reply('{"label": "maybe"}')
    verdict = judge(bad, body=BODY, reasks=0, output_tokens=7, rules=rules)
    assert isinstance(verdict, AskAgain)
    messages = json.loads(verdict.body)["messages"]
    assert messages[1] == {"role": "assistant", "content": '{"label": "maybe"}'}
    assert messages[2]["role"] == "user"
    assert "'maybe' is not one of ['yes', 'no']" in messages[2]["content"]
    assert verdict.added_tokens > 7  # the answer sent back, plus the error message
    final = judge(bad, body=verdict.body, reasks=1, output_tokens=7, rules=rules)
    assert isinstance(final, Fail)
    assert final.error.startswith("invalid answer after 1 re-ask(s): $.label: 'maybe'")
    off = judge(
        bad, body=BODY, reasks=0, output_tokens=7, rules=AnswerRules(schema=SCHEMA, max_reasks=0)
    )
    assert isinstance(off, Fail)
    assert "(re-asks are off)" in off.error


def test_a_function_calls_arguments_can_be_the_answer() -> None:
    rules = AnswerRules(schema=SCHEMA, schema_from_tool="record")
    good = ToolCall(id="c1", name="record", arguments='{"label": "yes"}')
    assert judge(
        reply(None, "tool_calls", (good,)), body=BODY, reasks=0, output_tokens=5, rules=rules
    ) == Keep({"label": "yes"})
    wrong = ToolCall(id="c2", name="record", arguments='{"label": 3}')
    verdict = judge(
        reply(None, "tool_calls", (wrong,)), body=BODY, reasks=0, output_tokens=5, rules=rules
    )
    assert isinstance(verdict, AskAgain)
    messages = json.loads(verdict.body)["messages"]
    assert messages[1]["tool_calls"][0]["function"] == {
        "name": "record",
        "arguments": '{"label": 3}',
    }
    assert messages[2]["role"] == "tool"
    assert messages[2]["tool_call_id"] == "c2"
    none = judge(reply("I will not call it"), body=BODY, reasks=2, output_tokens=5, rules=rules)
    assert isinstance(none, Fail)
    assert "the answer did not call record()" in none.error
