"""Facts about models that decide what a request may ask for: context window, longest output.

Kept in a table, like prices: models change, and these numbers belong in data, not in code
paths. Model ids are matched without their provider prefix and case
(``deepseek/deepseek-v4-flash`` and ``deepseek-v4-flash`` are the same model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelFacts:
    context_window: int
    """Prompt plus output tokens, at most."""
    max_output: int
    """Output tokens (reasoning included) one answer may have, at most."""


MODEL_FACTS: Mapping[str, ModelFacts] = {
    # DeepSeek V4 Flash: a 1M-token context (1,048,576) and up to 384K (393,216) output tokens.
    "deepseek-v4-flash": ModelFacts(context_window=1_048_576, max_output=393_216),
}


def model_facts(model: str) -> ModelFacts | None:
    """What is known about ``model``; None for a model not in the table."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    return MODEL_FACTS.get(name)
