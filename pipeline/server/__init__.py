"""The built-in OpenAI-compatible server: what tests and ``--local`` runs talk to. It imports
nothing of the engine.

Its modules, in the order a request meets them:

- :mod:`~pipeline.server.options`: :class:`ServerOptions`, how the server behaves.
- :mod:`~pipeline.server.process`: :class:`LocalServer`, the server in a child process.
- :mod:`~pipeline.server.command`: the command line (``pipeline serve``,
  ``python -m pipeline.server``).
- :mod:`~pipeline.server.serve`: the listening socket and uvicorn, until a signal.
- :mod:`~pipeline.server.app`: the ASGI app: endpoints and the order of checks.
- :mod:`~pipeline.server.asgi`: reading bodies and sending responses over bare ASGI.
- :mod:`~pipeline.server.requests`: pure: request bodies read and checked (OpenAI's 400s).
- :mod:`~pipeline.server.faults`: pure: the outcomes, the fault a request draws, fault_400.
- :mod:`~pipeline.server.ratelimit`: pure: OpenAI-style rpm/tpm buckets and their headers.
- :mod:`~pipeline.server.simulate`: pure: what the simulated model answers.
- :mod:`~pipeline.server.schema_answers`: pure: JSON Schema instances, and broken ones.
- :mod:`~pipeline.server.words`: the English words the answers are written with.
- :mod:`~pipeline.server.bodies`: pure: the JSON response bodies.
- :mod:`~pipeline.server.stats`: the counters behind ``/_stats``.
"""
