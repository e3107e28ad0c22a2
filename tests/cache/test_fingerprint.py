"""cache/fingerprint.py's one wording of how two fingerprint descriptions differ, checked against its
specification: each differing leaf by dotted path, in path order; both values as JSON when together
they fit in SHOWN_CHARS characters, else the path alone; SHOWN_DIFFERENCES named, the rest counted.
The expected strings are written out by hand from that rule."""

from __future__ import annotations

import json

import pytest

from mner.cache.fingerprint import SHOWN_CHARS, SHOWN_DIFFERENCES, describe_fingerprint_difference


def test_equal_descriptions_have_no_difference():
    parts = {"topk": 20, "models": {"clip": {"sha256": "ab"}}}
    assert describe_fingerprint_difference(parts, json.loads(json.dumps(parts))) == ""


def test_a_nested_leaf_is_named_by_its_dotted_path_with_both_values_as_json():
    old = {"models": {"clip": {"sha256": "ab", "untrained": True}}, "topk": 20}
    new = {"models": {"clip": {"sha256": "cd", "untrained": True}}, "topk": 20}
    assert describe_fingerprint_difference(old, new) == 'models.clip.sha256 "ab" -> "cd"'


def test_a_key_on_one_side_only_is_null_on_the_other():
    assert describe_fingerprint_difference({"a": 1, "b": 2}, {"b": 2}) == "a 1 -> null"
    assert describe_fingerprint_difference({"b": 2}, {"a": [1], "b": 2}) == "a null -> [1]"


def test_a_dict_on_one_side_only_is_one_difference_at_its_path():
    old, new = {"topk": 20}, {"topk": 20, "versions": {"torch": "2.3.0"}}
    assert describe_fingerprint_difference(old, new) == 'versions null -> {"torch": "2.3.0"}'
    assert describe_fingerprint_difference({"m": {"x": 1}}, {"m": 3}) == 'm {"x": 1} -> 3'


def test_differences_are_listed_in_path_order():
    old = {"b": 1, "a": {"c": 1}, "a_": 1}
    new = {"b": 2, "a": {"c": 2}, "a_": 2}
    # "a.c" < "a_" < "b" as strings ("." sorts before "_").
    assert describe_fingerprint_difference(old, new) == "a.c 1 -> 2, a_ 1 -> 2, b 1 -> 2"


def test_values_are_shown_only_when_their_json_fits_the_limit_together():
    assert SHOWN_CHARS == 60
    # '"xx...x"' of 28 x is 30 characters: 30 + 30 = 60 fits, 30 + 31 does not.
    fits = describe_fingerprint_difference({"k": "x" * 28}, {"k": "y" * 28})
    assert fits == f'k "{"x" * 28}" -> "{"y" * 28}"'
    assert describe_fingerprint_difference({"k": "x" * 28}, {"k": "y" * 29}) == "k"


@pytest.mark.parametrize("count", [SHOWN_DIFFERENCES, SHOWN_DIFFERENCES + 1, SHOWN_DIFFERENCES + 5])
def test_the_first_differences_are_named_and_the_rest_counted(count):
    assert SHOWN_DIFFERENCES == 8
    old = {f"k{i:02d}": i for i in range(count)}
    new = {f"k{i:02d}": i + 1 for i in range(count)}
    named = ", ".join(f"k{i:02d} {i} -> {i + 1}" for i in range(8))
    more = count - 8
    assert describe_fingerprint_difference(old, new) == named + (f" (+{more} more)" if more else "")


def test_ignored_parts_are_left_out():
    old, new = {"keys_sha256": "a", "topk": 20}, {"keys_sha256": "b", "topk": 10}
    assert describe_fingerprint_difference(old, new, ignore=("keys_sha256",)) == "topk 20 -> 10"
