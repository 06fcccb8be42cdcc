"""RFC 7386 JSON merge patch."""

from __future__ import annotations

from typing import Any

import pytest

from rustic.state import merge_patch

# RFC 7386, Appendix A: (original, patch, result)
RFC_7386_EXAMPLES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("original", "patch", "expected"), RFC_7386_EXAMPLES)
def test_merge_patch_gives_the_rfc_7386_appendix_result(
    original: Any, patch: Any, expected: Any
) -> None:
    assert merge_patch(original, patch) == expected


def test_merge_patch_mutates_neither_the_target_nor_the_patch() -> None:
    target = {"a": {"b": [1, 2]}, "keep": {"x": 1}, "drop": 1}
    patch = {"a": {"c": {"d": [3]}}, "drop": None}

    merge_patch(target, patch)

    assert target == {"a": {"b": [1, 2]}, "keep": {"x": 1}, "drop": 1}
    assert patch == {"a": {"c": {"d": [3]}}, "drop": None}


def test_merge_patch_result_shares_no_containers_with_its_inputs() -> None:
    target = {"keep": {"x": [1]}}
    patch = {"new": {"y": [2]}}

    result = merge_patch(target, patch)
    result["keep"]["x"].append(99)
    result["new"]["y"].append(99)

    assert target == {"keep": {"x": [1]}}
    assert patch == {"new": {"y": [2]}}
