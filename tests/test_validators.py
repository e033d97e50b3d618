"""The reusable option validators and converters: what each accepts and what it says when it refuses."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import attrs
import numpy as np
import pytest

from mergescope.errors import ConfigError
from mergescope.options import structure_options
from mergescope.validators import (
    Check,
    as_float,
    boolean,
    distinct,
    finite,
    float_list,
    fraction,
    in_range,
    int_range,
    integer,
    list_of,
    non_empty_str,
    non_negative,
    non_negative_int,
    one_of,
    optional,
    positive,
    positive_int,
    probability,
    sums_to,
    table_of,
    unique,
)


def check(validator: Any, value: Any, name: str = "opt") -> None:
    """Run an attrs validator on ``value`` as the option ``name`` (validators read only its name)."""
    validator(None, SimpleNamespace(name=name), value)


def refused(validator: Any, value: Any, name: str = "opt") -> str:
    with pytest.raises(ValueError) as info:
        check(validator, value, name)
    return str(info.value)


# ------------------------------------------------------------------------ numbers


@pytest.mark.parametrize(
    ("validator", "good", "bad", "message"),
    [
        (finite, [0, -3, 2.5, np.float32(1)], [math.nan, math.inf, "1", True, None], "'opt' must be a finite number, got "),
        (positive, [1e-9, 3, 1e9], [0, -1, math.inf, math.nan, True], "'opt' must be a positive number, got "),
        (non_negative, [0, 0.0, 2], [-1e-9, math.inf, False], "'opt' must be a non-negative number, got "),
        (probability, [0, 0.5, 1], [-0.1, 1.01, math.nan], r"'opt' must be a number in [0, 1], got "),
        (fraction, [1e-6, 0.5, 1], [0, 0.0, 1.5], r"'opt' must be a number in (0, 1], got "),
        (in_range(0.5, 1), [0.5, 1], [0.49, 1.1], r"'opt' must be a number in [0.5, 1], got "),
        (in_range(0, 1, lo_open=True, hi_open=True), [0.5], [0, 1], r"'opt' must be a number in (0, 1), got "),
        (in_range(0, 1, hi_open=True), [0, 0.99], [1, -1], r"'opt' must be a number in [0, 1), got "),
        (in_range(2), [2, 3.5], [1.9], "'opt' must be a number >= 2, got "),
        (in_range(2, lo_open=True), [2.1], [2], "'opt' must be a number > 2, got "),
        (in_range(hi=3), [-100, 3], [3.1], "'opt' must be a number <= 3, got "),
        (in_range(hi=3, hi_open=True), [2.9], [3], "'opt' must be a number < 3, got "),
    ],
)
def test_number_ranges(validator, good, bad, message):
    for value in good:
        check(validator, value)
    for value in bad:
        assert refused(validator, value) == message + repr(value)


@pytest.mark.parametrize(
    ("validator", "good", "bad", "message"),
    [
        (integer, [0, -5, np.int64(3)], [1.0, True, "1", None], "'opt' must be an integer, got "),
        (positive_int, [1, 10], [0, -1, 1.5, True], "'opt' must be a positive integer, got "),
        (non_negative_int, [0, 7], [-1, 0.0, False], "'opt' must be a non-negative integer, got "),
        (int_range(2), [2, 9], [1, 2.0], "'opt' must be an integer >= 2, got "),
        (int_range(1, 8), [1, 8], [0, 9], "'opt' must be an integer in [1, 8], got "),
        (int_range(hi=-1), [-1], [0], "'opt' must be an integer <= -1, got "),
    ],
)
def test_integers(validator, good, bad, message):
    for value in good:
        check(validator, value)
    for value in bad:
        assert refused(validator, value) == message + repr(value)


# ------------------------------------------------------------------ other values


def test_boolean_accepts_only_bools():
    check(boolean, True)
    check(boolean, False)
    assert refused(boolean, 1, "flag") == "'flag' must be true or false, got 1"
    assert refused(boolean, "yes", "flag") == "'flag' must be true or false, got 'yes'"


def test_non_empty_str():
    check(non_empty_str, "x")
    assert refused(non_empty_str, "  ", "name") == "'name' must be a non-empty string, got '  '"
    assert refused(non_empty_str, 3, "name") == "'name' must be a non-empty string, got 3"


def test_one_of_lists_the_choices():
    variant = one_of("repair", "reset-bn")
    check(variant, "repair")
    assert refused(variant, "fix", "variant") == "'variant' must be one of 'repair', 'reset-bn', got 'fix'"
    assert refused(variant, ["repair"], "variant").startswith("'variant' must be one of")
    with pytest.raises(ValueError, match="at least one choice"):
        one_of()


def test_table_of():
    table = table_of("the metric's options")
    check(table, {})
    check(table, {"per_class": 5})
    assert refused(table, "fast", "metric_options") == (
        "'metric_options' must be a table of the metric's options, got 'fast'"
    )
    assert "got {1: 2}" in refused(table, {1: 2}, "metric_options")


def test_optional_accepts_none_and_says_so():
    per_class = optional(positive_int)
    check(per_class, None)
    check(per_class, 3)
    assert refused(per_class, 0, "per_class") == "'per_class' must be a positive integer or unset, got 0"
    assert refused(optional(one_of("a", "b")), "c", "part") == "'part' must be one of 'a', 'b' or unset, got 'c'"


def test_optional_of_several_validators_runs_them_in_order():
    photos = optional([list_of(non_empty_str, min_length=1), unique])
    check(photos, None)
    check(photos, ["camera"])
    assert refused(photos, [], "photos") == "'photos' must be a non-empty list of non-empty strings or unset, got []"
    assert refused(photos, ["a", "a"], "photos").startswith("'photos' must not repeat a value")


def test_check_is_a_validator_from_a_test_and_two_phrases():
    label = Check(integer.holds, "an integer label", "integer labels")
    check(label, 3)
    assert refused(label, "3", "classes") == "'classes' must be an integer label, got '3'"
    assert refused(list_of(label, min_length=1), [], "classes") == (
        "'classes' must be a non-empty list of integer labels, got []"
    )
    # A test that raises counts as a refusal, not as a crash.
    assert not Check(lambda v: v > 0, "x", "xs").holds("a")
    assert "positive integer" in repr(positive_int)


# ------------------------------------------------------------------------- lists


def test_list_of_names_the_first_bad_item_and_its_position():
    widths = list_of(positive_int, min_length=1)
    check(widths, [1, 2])
    check(widths, (3,))
    assert refused(widths, [512, 0, -1], "hidden") == (
        "'hidden' must be a non-empty list of positive integers, got 0 at position 1 of [512, 0, -1]"
    )
    assert refused(widths, [], "hidden") == "'hidden' must be a non-empty list of positive integers, got []"
    assert refused(widths, 5, "hidden") == "'hidden' must be a non-empty list of positive integers, got 5"
    assert refused(widths, "12", "hidden").endswith("got '12'")


def test_list_of_min_length_and_empty_lists():
    check(list_of(finite), [])
    weights = list_of(finite, min_length=2)
    assert refused(weights, [1.0], "weights") == "'weights' must be a list of at least 2 finite numbers, got [1.0]"
    assert refused(weights, [0.5, math.nan], "weights") == (
        "'weights' must be a list of at least 2 finite numbers, got nan at position 1 of [0.5, nan]"
    )


def test_unique_and_distinct_name_the_repeated_value():
    check(unique, [0.1, 0.2])
    check(unique, [])
    assert refused(unique, [0.5, 0.1, 0.5], "alphas") == (
        "'alphas' must not repeat a value, got [0.5, 0.1, 0.5] (0.5 twice)"
    )
    assert refused(distinct("label"), [1, 1], "classes") == "'classes' must not repeat a label, got [1, 1] (1 twice)"
    check(unique, "not a list")  # left to the type check before it
    check(unique, [[1], [2]])  # unhashable items


def test_sums_to_allows_float_rounding():
    weights = sums_to(1.0)
    check(weights, [0.1, 0.2, 0.7])
    check(weights, [1.0 + 5e-7])
    assert refused(weights, [0.5, 0.4], "weights") == "'weights' must sum to 1, got [0.5, 0.4] (sum 0.9)"
    assert "must sum to 2" in refused(sums_to(2.0), [1.0], "weights")
    assert "sum nan" in refused(weights, [math.nan], "weights")


# -------------------------------------------------------------------- converters


@attrs.define
class Options:
    """A component with the converters, to see them work through attrs and the pipeline converter."""

    name = "options"

    alpha: float = attrs.field(default=0.5, converter=as_float, validator=probability)
    alphas: list[float] | None = attrs.field(default=None, converter=float_list, validator=optional(list_of(finite)))


def test_as_float():
    assert Options(alpha=1).alpha == 1.0 and isinstance(Options(alpha=1).alpha, float)
    assert isinstance(Options(alpha=np.float32(0.25)).alpha, float)
    for bad in ("0.5", True, None, [0.5]):
        with pytest.raises(TypeError) as info:
            Options(alpha=bad)
        assert str(info.value) == f"'alpha' must be a number, got {bad!r}"


def test_float_list_has_one_semantic():
    assert Options(alphas=None).alphas is None
    assert Options(alphas=0.5).alphas == [0.5]  # a number is a one-item list
    converted = Options(alphas=(1, 0.5, 1)).alphas  # order and repeats kept: validators judge them
    assert converted == [1.0, 0.5, 1.0] and all(type(a) is float for a in converted)
    assert Options(alphas=[np.float64(0.25), np.int64(1)]).alphas == [0.25, 1.0]
    for bad in ("0.5", [0.5, "1"], [True], {"a": 1}, b"1"):
        with pytest.raises(TypeError) as info:
            Options(alphas=bad)
        assert str(info.value) == f"'alphas' must be a number or a list of numbers, got {bad!r}"
    with pytest.raises(ValueError, match=r"'alphas' must be a list of finite numbers or unset, got inf at position 0"):
        Options(alphas=[math.inf])


def test_messages_point_a_pipeline_error_at_the_key():
    assert structure_options(Options, {"alphas": [0, 1]}).alphas == [0.0, 1.0]
    with pytest.raises(ConfigError, match=r"key 'alpha'.*'alpha' must be a number in \[0, 1\], got 2.0") as info:
        structure_options(Options, {"alpha": 2})
    assert info.value.where == "key 'alpha'"
    with pytest.raises(ConfigError, match=r"key 'alphas'.*got nan at position 1"):
        structure_options(Options, {"alphas": [0.0, math.nan]})
