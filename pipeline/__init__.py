"""pipeline: batch-processing engine for large offline LLM workloads."""

from __future__ import annotations

__version__ = "0.1.0"
