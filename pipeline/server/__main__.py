"""``python -m pipeline.server``: the same command as ``pipeline serve``."""

from pipeline.server.command import serve_command

serve_command()
