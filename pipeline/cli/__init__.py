"""The command line: ``pipeline run``, ``status``, ``export``, ``estimate``, ``serve``."""

from pipeline.cli.commands import main

__all__ = ["main"]
