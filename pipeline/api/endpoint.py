"""What a run needs besides the job, shared by the command line and the Python API: the API
key, the embedded built-in server of ``--local`` (``local=True``) and the event loop's options.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pipeline.errors import JobFileError
from pipeline.job.spec import JobSpec, Overrides, apply_overrides
from pipeline.money.pricing import provider_of

LOCAL_PRICE_URL = "http://127.0.0.1/v1"
"""What an estimate of the ``--local`` side (without ``--sample``) prices against: on loopback
the model id alone picks the price, exactly as a ``--local`` run's embedded server does."""


def api_key_for(job: JobSpec, *, local_flag: str = "--local") -> str | None:
    """The API key from the environment; required unless the endpoint is on this machine.
    ``local_flag`` is how the caller asks for the built-in server instead (``--local`` on the
    command line, ``local=True`` in Python), named in the error."""
    if job.request.local or job.request.api_key_env is None:
        return None
    key = job.api_key()
    if key:
        return key
    if provider_of(job.request.base_url) == "local":
        return None
    variable = job.request.api_key_env
    raise JobFileError(
        job.source,
        "[request] api_key_env",
        f"the environment variable {variable} is not set.",
        f"Export your key (export {variable}=...) or add {local_flag} to run against the "
        "built-in server.",
    )


def loop_options() -> dict[str, Any]:
    """uvloop when it is installed (Linux, macOS): it halves the event loop's cost per request."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


@contextlib.contextmanager
def endpoint(job: JobSpec) -> Iterator[JobSpec]:
    """The job, pointed at an embedded local server for the run's duration when it is the
    ``--local`` side (:func:`pipeline.job.spec.local_side`). The server serves the models the
    job names besides its own, so a typo in a model name still gets ``model_not_found``."""
    if not job.request.local:
        yield job
        return
    from pipeline.io.openai_batch import job_models
    from pipeline.server.options import ServerOptions
    from pipeline.server.process import LocalServer

    with LocalServer(ServerOptions(served_models=job_models(job))) as base_url:
        yield apply_overrides(job, Overrides(base_url=base_url))
