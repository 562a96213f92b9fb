"""The built-in OpenAI-compatible server: what tests and ``--local`` runs talk to. It
imports nothing of the engine."""
