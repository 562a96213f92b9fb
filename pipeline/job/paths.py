"""Paths in a job file are relative to the job file's folder.

``[input] path``, ``[output] path``, ``[output] state_dir`` (and ``[output] schema``, read by
:mod:`pipeline.rows.schema`) are read relative to the folder that holds the job file, so a
job runs the same from any current folder; ``~`` is expanded and absolute paths are kept.
Command-line flags (``--input``, ``--output``) stay relative to the current folder. A URL
(``s3://``, ``gs://``, ``az://``, ``hf://``: anything with a scheme) is kept as written.

Job files written before this rule named paths relative to the current folder. So that they
keep working, a path that finds nothing beside the job file but does from the current
folder is read from there, with a :class:`~pipeline.job.spec.Notice` saying how to write it:
an input that exists only that way, and an output whose state folder (the finished rows)
exists only that way, so that no row is sent again.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.job.spec import Notice
from pipeline.job.urls import is_url

_GLOB_CHARACTERS = "*?["


@dataclass(frozen=True, slots=True, kw_only=True)
class JobPaths:
    """A job file's paths, resolved, and what a person should be told about them."""

    input: str
    output: str
    state_dir: str | None
    notices: tuple[Notice, ...] = ()


def beside_job(raw: str, folder: Path) -> str:
    """``raw`` (a path or glob from a job file) read relative to ``folder``: ``~`` expanded,
    an absolute path unchanged, a relative one joined to ``folder`` and normalised; a URL
    unchanged."""
    if is_url(raw):
        return raw
    expanded = os.path.expanduser(raw)
    if os.path.isabs(expanded):
        return expanded
    return os.path.normpath(os.path.join(folder, expanded))


def resolve_paths(
    source: Path, *, input_path: str, output_path: str, state_dir: str | None
) -> JobPaths:
    """The job file's paths, relative to its folder, or the old way (see the module)."""
    folder = source.parent
    notices: list[Notice] = []
    input_ = beside_job(input_path, folder)
    legacy_input = os.path.expanduser(input_path)
    if is_url(input_path):
        legacy_input = input_path
    if _differ(input_, legacy_input) and not _finds(input_) and _finds(legacy_input):
        notices.append(
            _notice(
                source,
                "[input] path",
                f"{input_path!r} is not found relative to the job file's folder "
                f"({input_!r}) but is relative to the current folder, so it is read from there.",
                _suggest(legacy_input, folder),
            )
        )
        input_ = legacy_input

    output = beside_job(output_path, folder)
    state = None if state_dir is None else beside_job(state_dir, folder)
    if is_url(output_path):  # nothing to find the old way: its state is not beside it
        return JobPaths(input=input_, output=output, state_dir=state, notices=tuple(notices))
    legacy_output = os.path.expanduser(output_path)
    legacy_state = None if state_dir is None else os.path.expanduser(state_dir)
    here, there = _state_folder(output, state), _state_folder(legacy_output, legacy_state)
    if _differ(here, there):
        # The state decides: it holds the finished rows, and the output is made from it.
        old_state = not os.path.isdir(here) and os.path.isdir(there)
        old_output = old_state
    else:  # the same state folder either way (an absolute state_dir): the output decides
        old_state = False
        old_output = not os.path.exists(output) and os.path.isfile(legacy_output)
    if old_output and _differ(output, legacy_output):
        problem = (
            f"the job's state (its finished rows) is in {there!r}, relative to the current "
            f"folder, not in {here!r}, relative to the job file's folder, so the output stays "
            f"where it was ({legacy_output!r}) and no row is sent again."
            if old_state
            else f"{output_path!r} exists relative to the current folder and not relative to "
            f"the job file's folder ({output!r}), so the output stays where it was."
        )
        notices.append(_notice(source, "[output] path", problem, _suggest(legacy_output, folder)))
        output = legacy_output
    if old_state and legacy_state is not None and _differ(state, legacy_state):
        problem = (
            f"the job's state (its finished rows) is in {legacy_state!r}, relative to the "
            f"current folder, not in {state!r}, relative to the job file's folder, so it is "
            "used from there and no row is sent again."
        )
        notices.append(
            _notice(source, "[output] state_dir", problem, _suggest(legacy_state, folder))
        )
        state = legacy_state
    return JobPaths(input=input_, output=output, state_dir=state, notices=tuple(notices))


def _state_folder(output: str, state_dir: str | None) -> str:
    """Where the state is kept: as :attr:`pipeline.job.spec.JobSpec.state_path` says."""
    if state_dir is not None:
        return state_dir
    out = Path(output)
    return str(out.with_name(out.name + ".state"))


def _differ(a: str | None, b: str | None) -> bool:
    """Whether two paths name different places (relative ones from the current folder)."""
    if a is None or b is None:
        return a != b
    return os.path.abspath(a) != os.path.abspath(b)


def _finds(pattern: str) -> bool:
    """Whether ``pattern`` (a file, folder or glob) names anything that exists."""
    if any(ch in pattern for ch in _GLOB_CHARACTERS):
        return bool(glob.glob(pattern, recursive=True))
    return os.path.exists(pattern)


def _suggest(legacy: str, folder: Path) -> str:
    """How to write ``legacy`` (relative to the current folder) relative to ``folder``."""
    try:
        relative = os.path.relpath(os.path.abspath(legacy), os.path.abspath(folder))
    except ValueError:  # another drive (Windows): only an absolute path will do
        relative = os.path.abspath(legacy)
    return json.dumps(relative)


def _notice(source: Path, key: str, problem: str, suggestion: str) -> Notice:
    name = key.rsplit(" ", 1)[-1]
    fix = (
        "Paths in a job file are relative to the job file's folder: write "
        f"{name} = {suggestion} (or an absolute path) so that the job finds it from any "
        "folder."
    )
    return Notice(key=key, message=f"{source}: {key}: {problem} {fix}")
