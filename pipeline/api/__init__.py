"""The Python API's calls: run or estimate a job given as a path, TOML text or a dict, on rows
from a file or from a DataFrame, in a script, a notebook or async code.

- :mod:`pipeline.api.jobs`: the job a call works on (its forms, defaults and overrides).
- :mod:`pipeline.api.run`: :func:`~pipeline.api.run.run_job`,
  :func:`~pipeline.api.run.arun_job`, :func:`~pipeline.api.run.run_job_report`.
- :mod:`pipeline.api.estimate`: :func:`~pipeline.api.estimate.estimate_job`.
- :mod:`pipeline.api.endpoint`: what the command line shares with them (the API key check,
  the embedded built-in server of ``--local``, the event loop's options).

This package sits above the engine and the estimate and below the command line, which uses
:mod:`pipeline.api.endpoint` and nothing imports back.
"""
