"""Keep secrets out of every message: the API key, and anything shaped like one."""

from __future__ import annotations

import re

# Provider keys are long runs of key characters, often with a prefix such as "sk-".
_KEY_LIKE = re.compile(r"\b(?:sk|pk|rk|key)[-_][A-Za-z0-9*._-]{6,}")
MASK = "[redacted]"


def redact(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` and key-shaped strings masked."""
    if secret:
        text = text.replace(secret, MASK)
    return _KEY_LIKE.sub(MASK, text)
