"""Reusable ``attrs`` validators and converters for component options.

A component's options are ``attrs`` fields (see :mod:`mergescope.options`). The checks
most options need are written once here, so every component rejects a bad value with
the same kind of message::

    @attrs.define
    class MyMerger:
        name: ClassVar[str] = "my-merger"

        alpha: float = attrs.field(default=0.5, converter=as_float, validator=probability)
        alphas: list[float] | None = attrs.field(
            default=None, converter=float_list, validator=optional([list_of(probability), unique])
        )
        variant: str = attrs.field(default="plain", validator=one_of("plain", "fancy"))

Messages
--------
Every validator raises :class:`ValueError` and every converter :class:`TypeError` with a
message that starts with the option's name in quotes, says what is accepted and shows the
value given::

    'alpha' must be a number in [0, 1], got 1.5
    'alphas' must be a list of numbers in [0, 1], got 1.5 at position 2 of [0.0, 0.5, 1.5]
    'variant' must be one of 'plain', 'fancy', got 'fanci'

:func:`mergescope.options.structure_options` finds the option's name there and points the
pipeline error at its key.

Numbers
-------
A *number* is an ``int`` or ``float`` (numpy scalars included), never a ``bool``:
``True`` is not accepted where a number belongs. The range validators
(:func:`in_range` and its presets) also refuse NaN and infinities. Integers
(:func:`int_range` and its presets) must be ``int`` values: ``2.0`` is not an integer
option.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

__all__ = [
    "Check",
    "in_range",
    "finite",
    "positive",
    "non_negative",
    "probability",
    "fraction",
    "int_range",
    "integer",
    "positive_int",
    "non_negative_int",
    "boolean",
    "non_empty_str",
    "one_of",
    "table_of",
    "optional",
    "list_of",
    "distinct",
    "unique",
    "sums_to",
    "as_float",
    "float_list",
]

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _fmt(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


@attrs.frozen(repr=False)
class Check:
    """An attrs validator made of a test and the words for what it accepts.

    Parameters
    ----------
    test
        ``value -> bool``; a ``TypeError`` or ``ValueError`` it raises counts as ``False``.
    singular
        What one accepted value is, after "must be": ``"a positive integer"``.
    plural
        The same for several values, after "a list of": ``"positive integers"``.

    Calling it as a validator raises ``ValueError("'<option>' must be <singular>, got
    <value>")`` when the test fails. :func:`optional` and :func:`list_of` build on the
    two phrases.
    """

    test: Callable[[Any], bool]
    singular: str
    plural: str

    def holds(self, value: Any) -> bool:
        """Whether ``value`` passes."""
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False

    def __call__(self, instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not self.holds(value):
            raise ValueError(f"'{attribute.name}' must be {self.singular}, got {value!r}")

    def __repr__(self) -> str:
        return f"<validator: {self.singular}>"


# ------------------------------------------------------------------------ numbers


def in_range(
    lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False
) -> Check:
    """A finite number between ``lo`` and ``hi``.

    Parameters
    ----------
    lo, hi
        The bounds; ``None`` leaves that side unbounded (but the number must be finite).
    lo_open, hi_open
        Exclude the bound itself.

    Returns
    -------
    Check
        Its message names the interval: ``'density' must be a number in (0, 1], got
        1.5``; one-sided ranges read ``a number > 2``, ``0`` as the only bound reads ``a
        positive number`` (``> 0``) or ``a non-negative number`` (``>= 0``), no bound
        reads ``a finite number``.
    """

    def test(value: Any) -> bool:
        if not _is_number(value) or not math.isfinite(value):
            return False
        if lo is not None and (value <= lo if lo_open else value < lo):
            return False
        return not (hi is not None and (value >= hi if hi_open else value > hi))

    if lo is not None and hi is not None:
        interval = f"{'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
        return Check(test, f"a number in {interval}", f"numbers in {interval}")
    if lo == 0:
        word = "positive" if lo_open else "non-negative"
        return Check(test, f"a {word} number", f"{word} numbers")
    if lo is not None:
        bound = f"{'>' if lo_open else '>='} {_fmt(lo)}"
        return Check(test, f"a number {bound}", f"numbers {bound}")
    if hi is not None:
        bound = f"{'<' if hi_open else '<='} {_fmt(hi)}"
        return Check(test, f"a number {bound}", f"numbers {bound}")
    return Check(test, "a finite number", "finite numbers")


finite = in_range()
"""A finite number (not NaN, not an infinity)."""

positive = in_range(0, lo_open=True)
"""A finite number ``> 0`` (a learning rate, a tolerance)."""

non_negative = in_range(0)
"""A finite number ``>= 0`` (a penalty, a regularisation)."""

probability = in_range(0, 1)
"""A number in ``[0, 1]`` (an interpolation coefficient, a share that may be 0)."""

fraction = in_range(0, 1, lo_open=True)
"""A number in ``(0, 1]``: a fraction of something that keeps at least part of it."""


def int_range(lo: int | None = None, hi: int | None = None) -> Check:
    """An ``int`` (not a ``bool``) with ``lo <= value <= hi``; ``None``: unbounded.

    Messages read ``an integer >= 2``, ``an integer in [1, 8]``, and for a lower bound of
    1 or 0 ``a positive integer`` or ``a non-negative integer``.
    """

    def test(value: Any) -> bool:
        return _is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi)

    if lo is not None and hi is not None:
        return Check(test, f"an integer in [{lo}, {hi}]", f"integers in [{lo}, {hi}]")
    if lo in (0, 1):
        word = "positive" if lo == 1 else "non-negative"
        return Check(test, f"a {word} integer", f"{word} integers")
    if lo is not None:
        return Check(test, f"an integer >= {lo}", f"integers >= {lo}")
    if hi is not None:
        return Check(test, f"an integer <= {hi}", f"integers <= {hi}")
    return Check(test, "an integer", "integers")


integer = int_range()
"""Any ``int`` (a seed)."""

positive_int = int_range(1)
"""An ``int`` ``>= 1`` (a size, a count of iterations)."""

non_negative_int = int_range(0)
"""An ``int`` ``>= 0`` (a count that may be zero)."""


# ------------------------------------------------------------------ other values

boolean = Check(lambda value: isinstance(value, bool), "true or false", "booleans")
"""A ``bool`` (``1`` and ``"yes"`` are not accepted)."""

non_empty_str = Check(
    lambda value: isinstance(value, str) and bool(value.strip()), "a non-empty string", "non-empty strings"
)
"""A string with something other than whitespace in it (a name, a path)."""


def one_of(*choices: Any) -> Check:
    """One of ``choices``: ``'variant' must be one of 'repair', 'reset-bn', got 'fix'``."""
    if not choices:
        raise ValueError("one_of() needs at least one choice")
    listed = ", ".join(repr(c) for c in choices)
    return Check(lambda value: value in choices, f"one of {listed}", f"values among {listed}")


def table_of(what: str) -> Check:
    """A table (``dict``) with string keys, e.g. the options of another component.

    ``what`` completes the message: ``table_of("the metric's options")`` reads
    ``'metric_options' must be a table of the metric's options, got 'fast'``.
    """
    return Check(
        lambda value: isinstance(value, dict) and all(isinstance(k, str) for k in value),
        f"a table of {what}",
        f"tables of {what}",
    )


def optional(validator: Validator | Sequence[Validator]) -> Validator:
    """Accept ``None`` (an unset option), else apply ``validator`` (or each of a list, in order).

    The messages of :class:`Check` and :func:`list_of` validators say that unset is
    accepted too: ``'per_class' must be a positive integer or unset, got 0``.
    """
    given: Sequence[Validator] = validator if isinstance(validator, (list, tuple)) else [validator]  # type: ignore[list-item]
    checks = [_or_unset(v) for v in given]
    if len(checks) == 1 and isinstance(checks[0], Check):
        return checks[0]

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        for one in checks:
            one(instance, attribute, value)

    return check


def _or_unset(validator: Validator) -> Validator:
    """``validator`` accepting ``None`` too, its message saying so (others unchanged)."""
    if isinstance(validator, Check):
        inner = validator
        return Check(
            lambda value: value is None or inner.holds(value),
            f"{inner.singular} or unset",
            f"{inner.plural} or unset",
        )
    if isinstance(validator, _ListOf):
        return attrs.evolve(validator, or_unset=True)
    return validator


# ------------------------------------------------------------------------- lists


@attrs.frozen(repr=False)
class _ListOf:
    item: Check
    min_length: int
    or_unset: bool = False

    def describe(self) -> str:
        if self.min_length == 1:
            text = f"a non-empty list of {self.item.plural}"
        elif self.min_length > 1:
            text = f"a list of at least {self.min_length} {self.item.plural}"
        else:
            text = f"a list of {self.item.plural}"
        return f"{text} or unset" if self.or_unset else text

    def __call__(self, instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None and self.or_unset:
            return
        what = f"'{attribute.name}' must be {self.describe()}"
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{what}, got {value!r}")
        if len(value) < self.min_length:
            raise ValueError(f"{what}, got {value!r}")
        for position, item in enumerate(value):
            if not self.item.holds(item):
                raise ValueError(f"{what}, got {item!r} at position {position} of {value!r}")

    def __repr__(self) -> str:
        return f"<validator: {self.describe()}>"


def list_of(item: Check, *, min_length: int = 0) -> Validator:
    """A list (or tuple) whose every item passes ``item``, with at least ``min_length`` items.

    Messages name the first bad item and its (0-based) position:
    ``'hidden' must be a non-empty list of positive integers, got 0 at position 1 of [512, 0]``.
    """
    return _ListOf(item, min_length)


def _first_repeat(values: Iterable[Any]) -> tuple[bool, Any]:
    seen: list[Any] = []
    for value in values:
        if value in seen:
            return True, value
        seen.append(value)
    return False, None


def distinct(noun: str = "value") -> Validator:
    """No item of the list appears twice: ``'classes' must not repeat a label, got [1, 1] (1 twice)``.

    ``noun`` names what the items are in the message. Use it after a type check such as
    :func:`list_of`; a value that is not a list or tuple is left to that check.
    """

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, (list, tuple)):
            return
        repeated, which = _first_repeat(value)
        if repeated:
            raise ValueError(f"'{attribute.name}' must not repeat a {noun}, got {value!r} ({which!r} twice)")

    return check


unique = distinct()
"""No value appears twice in the list (``[0.5, 0.5]`` is refused)."""


def sums_to(total: float = 1.0, *, tolerance: float = 1e-6) -> Validator:
    """The numbers of the list sum to ``total`` within ``tolerance`` (weights written in a
    pipeline file miss 1 by float rounding: ``0.1 + 0.2 + 0.7``).

    ``'weights' must sum to 1, got [0.5, 0.4] (sum 0.9)``. Use it after :func:`list_of`.
    """

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        got = math.fsum(value)
        if not abs(got - total) <= tolerance:
            raise ValueError(f"'{attribute.name}' must sum to {_fmt(total)}, got {value!r} (sum {got:g})")

    return check


# -------------------------------------------------------------------- converters


def _as_float(value: Any, field: attrs.Attribute) -> float:
    if not _is_number(value):
        raise TypeError(f"'{field.name}' must be a number, got {value!r}")
    return float(value)


as_float = attrs.Converter(_as_float, takes_field=True)
"""Converter: an ``int`` or ``float`` (numpy scalars included) becomes a ``float``.

Anything else, a ``bool`` or a numeric string included, is a ``TypeError`` naming the
option: ``'alpha' must be a number, got '0.5'``. Range checks are the validator's.
"""


def _float_list(value: Any, field: attrs.Attribute) -> list[float] | None:
    if value is None:
        return None
    if _is_number(value):
        return [float(value)]
    if isinstance(value, (list, tuple)) and all(_is_number(v) for v in value):
        return [float(v) for v in value]
    raise TypeError(f"'{field.name}' must be a number or a list of numbers, got {value!r}")


float_list = attrs.Converter(_float_list, takes_field=True)
"""Converter of list-of-number options: the one semantic every component uses.

- ``None`` stays ``None`` (an unset optional option);
- a number becomes a one-item list: ``0.5 -> [0.5]``;
- a list or tuple of numbers becomes a new ``list`` of ``float`` in the same order (no
  sorting, no removal of repeats: that is for validators such as :data:`unique`);
- anything else (a string, a ``bool``, a list holding one) is a ``TypeError`` naming the
  option: ``'alphas' must be a number or a list of numbers, got 'abc'``.

NaN and infinities pass through; validators such as ``list_of(finite)`` refuse them.
A pipeline file reaches the converter with a list only: its ``list[float]`` type is
enforced first.
"""
