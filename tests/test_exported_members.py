"""The public API is exactly what ``pipeline.__all__`` lists, sorted."""

from __future__ import annotations

import pipeline


def test_all_is_sorted_and_complete() -> None:
    assert pipeline.__all__ == sorted(pipeline.__all__)
    for name in pipeline.__all__:
        assert hasattr(pipeline, name), name


def test_public_members_are_all_listed() -> None:
    public = {
        name
        for name, value in vars(pipeline).items()
        if not name.startswith("_")
        and not isinstance(value, type(pipeline))
        and name != "annotations"
    }
    assert public <= set(pipeline.__all__)
