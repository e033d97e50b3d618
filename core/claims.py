"""Claims: what a paper says a run should show, checked against the run's results.

A pipeline may carry ``[[claims]]`` tables. Each names where the claim comes from (a paper
and its figure or table), the quantity that tests it (a variable of ``results.nc`` with a
selection and a reduction), the relation the quantity should satisfy and the state the
claim was last recorded in (``"holds"``, or ``"does not hold"`` with the reason)::

    [[claims]]
    name = "weight-matching-removes-the-barrier"
    source = "Ainsworth et al. 2023, Figure 2"
    says = "After weight matching, the loss barrier between two MNIST MLPs is near zero"
    value = "weight-matching/loss_barrier"
    expect = "<= 0.05"
    state = "holds"

``value`` is a node path of ``results.nc`` followed by a variable name. ``select`` picks
coordinates (``{ alpha = 0.5, layer = "relu2" }``; a coordinate that is not a dimension's
index, such as a unit's label, is matched by value), ``equals`` turns the values into
"equal to this" flags (so ``reduce = "mean"`` gives a share), and ``reduce`` (``mean``,
``median``, ``min``, ``max``, ``sum``, ``std``, ``count``) makes one number of what is left;
``scale`` multiplies that number (``scale = 0.5`` reads "half of it", for a claim such as
"the aligned barrier is at most half the naive one").

``expect`` is one relation: ``OP RHS``, ``OP RHS + N`` or ``OP RHS - N`` with ``OP`` one of
``<``, ``<=``, ``>``, ``>=``, or ``within N of RHS`` / ``within N% of RHS``. ``RHS`` is a
number or the name of a quantity in the claim's ``against`` table (another variable, read
the same way: ``against.random = { value = "...", reduce = "mean" }``). ``tolerance``
(absolute, default 0) is slack granted to the relation.

:func:`evaluate` turns claims and a results tree into :class:`Verdict` values;
:func:`verdicts_dataset` is the ``claims`` group of ``results.nc`` and
:func:`summary_lines` its block of ``summary.txt``.
"""

from __future__ import annotations

import math
import operator
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import xarray as xr

from .errors import ConfigError, closest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "CLAIMS_GROUP",
    "HOLDS",
    "DOES_NOT_HOLD",
    "Quantity",
    "Expectation",
    "Claim",
    "Verdict",
    "parse_claims",
    "check_steps",
    "claims_to_tables",
    "evaluate",
    "verdicts_dataset",
    "verdicts_from_dataset",
    "summary_lines",
    "attach_verdicts",
    "format_number",
    "claims_of_file",
    "run_verdicts",
    "markdown_table",
]

#: The group of ``results.nc`` that holds the verdicts (a step cannot take this name).
CLAIMS_GROUP = "claims"
HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
STATES = (HOLDS, DOES_NOT_HOLD)

_REDUCTIONS: dict[str, Callable[[xr.DataArray], xr.DataArray]] = {
    "mean": lambda da: da.mean(),
    "median": lambda da: da.median(),
    "min": lambda da: da.min(),
    "max": lambda da: da.max(),
    "sum": lambda da: da.sum(),
    "std": lambda da: da.std(),
    "count": lambda da: da.count(),
}
_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
_RELATION = re.compile(rf"^\s*(<=|>=|<|>)\s*({_NUMBER}|{_NAME})\s*(?:([-+])\s*({_NUMBER}))?\s*$")
_WITHIN = re.compile(rf"^\s*within\s+({_NUMBER})\s*(%?)\s+of\s+({_NUMBER}|{_NAME})\s*$")
_QUANTITY_KEYS = ("value", "select", "equals", "reduce", "scale")
_CLAIM_KEYS = ("name", "source", "says", *_QUANTITY_KEYS, "expect", "tolerance", "state", "why", "against")


@attrs.frozen
class Quantity:
    """One number read from a results tree.

    Parameters
    ----------
    value
        ``"<node path>/<variable>"`` in the results tree (``"wm-merge/accuracy"``,
        ``"kendall-tau/relu2/score"``).
    select
        Coordinate name -> value or list of values. Index coordinates are selected with
        ``sel`` (floats to within 1e-9); other coordinates by matching their values.
    equals
        When given, each value becomes ``value == equals`` before reducing.
    reduce
        How what is left becomes one number; needed unless one value is left.
    scale
        A factor the number is multiplied by (``0.5``: half of it).
    """

    value: str
    select: Mapping[str, Any] = attrs.field(factory=dict)
    equals: Any = None
    reduce: str | None = None
    scale: float = 1.0

    def read(self, results: xr.DataTree) -> float:
        """The quantity's number in ``results``; a ``ConfigError`` names what is missing."""
        node_path, _, variable = self.value.rpartition("/")
        try:
            node = results[node_path] if node_path else results
        except KeyError:
            groups = sorted(str(n.path).lstrip("/") for n in results.subtree if n.path != "/")
            hint = closest(node_path, groups)
            raise ConfigError(
                f"results have no group {node_path!r}" + (f"; did you mean {hint!r}?" if hint else "")
            ) from None
        if not isinstance(node, xr.DataTree) or variable not in node.ds:
            held = sorted(map(str, node.ds.data_vars)) if isinstance(node, xr.DataTree) else []
            raise ConfigError(f"group {node_path!r} has no variable {variable!r}; it holds {', '.join(held) or 'none'}")
        da = _select(node.ds[variable].copy(), self.select, self.value)
        if self.equals is not None:
            da = da == self.equals
        if self.reduce is not None:
            da = _REDUCTIONS[self.reduce](da.astype(float) if da.dtype == bool else da)
        if da.size != 1:
            raise ConfigError(
                f"{self.value!r} leaves {da.size} values with dims {tuple(map(str, da.dims))} after 'select'; "
                f"select one or give 'reduce' ({', '.join(_REDUCTIONS)})"
            )
        return float(da.values.reshape(-1)[0]) * self.scale


def _select(da: xr.DataArray, select: Mapping[str, Any], what: str) -> xr.DataArray:
    for key, wanted in select.items():
        if key not in da.coords:
            raise ConfigError(
                f"{what!r} has no coordinate {key!r} to select on; it has {', '.join(map(str, da.coords)) or 'none'}"
            )
        coord = da.coords[key]
        several = isinstance(wanted, list)
        values = wanted if several else [wanted]
        if coord.ndim != 1:
            raise ConfigError(f"{what!r}: coordinate {key!r} is not one-dimensional, so it cannot be selected on")
        dim = coord.dims[0]
        held = coord.values
        if np.issubdtype(held.dtype, np.number):
            found = [np.flatnonzero(np.isclose(held.astype(float), float(v), rtol=0, atol=1e-9)) for v in values]
        else:
            found = [np.flatnonzero(held.astype(str) == str(v)) for v in values]
        missing = [v for v, f in zip(values, found) if f.size == 0]
        if missing:
            shown = ", ".join(map(str, held[:12])) + (", ..." if held.size > 12 else "")
            raise ConfigError(f"{what!r}: {key} = {missing[0]!r} is not among its values ({shown})")
        positions = np.concatenate(found)
        da = da.isel({dim: positions if several or positions.size > 1 else int(positions[0])})
    return da


@attrs.frozen
class Expectation:
    """A parsed ``expect``: ``op`` compares the measured value with ``against`` (+ ``offset``).

    ``op`` is ``<``, ``<=``, ``>``, ``>=`` or ``within``; for ``within``, ``margin`` is the
    allowed distance, relative to ``|against|`` when ``relative``.
    """

    op: str
    against: float | str
    offset: float = 0.0
    margin: float = 0.0
    relative: bool = False

    @classmethod
    def parse(cls, text: str) -> Expectation:
        """Parse ``"<= 0.05"``, ``"> random + 0.02"``, ``"within 5% of 0.673"``; a ``ConfigError`` otherwise."""
        if m := _RELATION.match(text):
            op, rhs, sign, offset = m.groups()
            value = float(offset or 0.0) * (-1 if sign == "-" else 1)
            return cls(op, _number_or_name(rhs), offset=value)
        if m := _WITHIN.match(text):
            margin, percent, rhs = m.groups()
            return cls("within", _number_or_name(rhs), margin=float(margin), relative=bool(percent))
        raise ConfigError(
            f"cannot read expect = {text!r}; write 'OP X' (OP one of <, <=, >, >=; X a number or a name in "
            "'against', optionally '+ N' or '- N') or 'within N of X' / 'within N% of X'"
        )

    def names(self) -> list[str]:
        """The ``against`` quantities the relation reads."""
        return [self.against] if isinstance(self.against, str) else []

    def bound(self, against: float) -> float:
        """The number the measured value is compared with."""
        return against + self.offset

    def test(self, measured: float, against: float, tolerance: float) -> bool:
        """Whether ``measured`` satisfies the relation, with ``tolerance`` of slack."""
        if math.isnan(measured) or math.isnan(against):
            return False
        if self.op == "within":
            allowed = self.margin * abs(against) / 100 if self.relative else self.margin
            # 1e-12 absorbs the rounding of the subtraction (2.1 - 2.0 > 0.1 in binary).
            return abs(measured - against) <= allowed + tolerance + 1e-12
        bound = self.bound(against)
        slack = tolerance if self.op in ("<", "<=") else -tolerance
        return _COMPARISONS[self.op](measured, bound + slack)


def _number_or_name(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


@attrs.frozen
class Claim:
    """One claim of a pipeline: where it comes from, what measures it, what it expects.

    Parameters
    ----------
    name
        Unique within the pipeline.
    source
        Where the claim is made: paper, figure or table.
    says
        The claim in words.
    quantity
        What measures it (see :class:`Quantity`).
    expect
        The relation, as written (parsed into :attr:`expectation`).
    state
        The state last recorded: ``"holds"`` or ``"does not hold"``.
    why
        Why it does not hold (required with that state).
    tolerance
        Absolute slack granted to the relation.
    against
        Named quantities ``expect`` may compare with.
    """

    name: str
    source: str
    says: str
    quantity: Quantity
    expect: str
    state: str = HOLDS
    why: str | None = None
    tolerance: float = 0.0
    against: Mapping[str, Quantity] = attrs.field(factory=dict)

    @property
    def expectation(self) -> Expectation:
        return Expectation.parse(self.expect)

    def to_table(self) -> dict[str, Any]:
        """The claim as its TOML table (keys at their defaults left out)."""
        table: dict[str, Any] = {"name": self.name, "source": self.source, "says": self.says}
        table.update(_quantity_table(self.quantity))
        table["expect"] = self.expect
        if self.tolerance:
            table["tolerance"] = self.tolerance
        table["state"] = self.state
        if self.why is not None:
            table["why"] = self.why
        if self.against:
            table["against"] = {k: _quantity_table(q) for k, q in self.against.items()}
        return table


def _quantity_table(quantity: Quantity) -> dict[str, Any]:
    table: dict[str, Any] = {"value": quantity.value}
    if quantity.select:
        table["select"] = dict(quantity.select)
    if quantity.equals is not None:
        table["equals"] = quantity.equals
    if quantity.reduce is not None:
        table["reduce"] = quantity.reduce
    if quantity.scale != 1.0:
        table["scale"] = quantity.scale
    return table


def claims_to_tables(claims: Iterable[Claim]) -> list[dict[str, Any]]:
    """The ``[[claims]]`` tables of ``claims``."""
    return [c.to_table() for c in claims]


# ----------------------------------------------------------------------------- parsing


def parse_claims(tables: Any, source: str = "<pipeline>", steps: Sequence[str] | None = None) -> list[Claim]:
    """Read ``[[claims]]`` tables; every error names the claim and the key.

    Parameters
    ----------
    tables
        The parsed ``claims`` array of tables.
    source
        The pipeline's name in messages.
    steps
        The pipeline's step names: when given, a ``value`` must start with one of them
        (or ``tasks/``), so a misspelt step is caught before the run.
    """
    if not isinstance(tables, list):
        raise ConfigError("'claims' must be an array of tables ([[claims]])", where=source)
    claims: list[Claim] = []
    for i, table in enumerate(tables):
        where = f"{source}, [[claims]] #{i + 1}"
        if not isinstance(table, dict):
            raise ConfigError(f"expected a table, got {type(table).__name__}", where=where)
        if isinstance(table.get("name"), str):
            where = f"{where} ({table['name']!r})"
        claims.append(_claim(table, where, steps))
    seen: set[str] = set()
    for claim in claims:
        if claim.name in seen:
            raise ConfigError(f"two claims are named {claim.name!r}; names must be unique", where=source)
        seen.add(claim.name)
    return claims


def _claim(table: Mapping[str, Any], where: str, steps: Sequence[str] | None) -> Claim:
    _known_keys(table, _CLAIM_KEYS, where)
    for key in ("name", "source", "says", "value", "expect"):
        if not isinstance(table.get(key), str) or not table[key].strip():
            raise ConfigError(f"'{key}' is required and must be a non-empty string", where=where)
    state = table.get("state", HOLDS)
    if state not in STATES:
        raise ConfigError(f"'state' must be {' or '.join(map(repr, STATES))}, got {state!r}", where=where)
    why = table.get("why")
    if state == DOES_NOT_HOLD and not (isinstance(why, str) and why.strip()):
        raise ConfigError("a claim recorded as 'does not hold' needs 'why': the reason its page gives", where=where)
    tolerance = table.get("tolerance", 0.0)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ConfigError(f"'tolerance' must be a number >= 0, got {tolerance!r}", where=where)
    try:
        expectation = Expectation.parse(table["expect"])
    except ConfigError as exc:
        raise exc.located(f"{where}, key 'expect'") from exc
    against_table = table.get("against", {})
    if not isinstance(against_table, dict):
        raise ConfigError("'against' must be a table of named quantities", where=where)
    against = {str(k): _quantity(q, f"{where}, against.{k}", steps, _QUANTITY_KEYS) for k, q in against_table.items()}
    for name in expectation.names():
        if name not in against:
            raise ConfigError(
                f"expect = {table['expect']!r} compares with {name!r}, which 'against' does not define"
                + (f" (it defines {', '.join(against)})" if against else ""),
                where=where,
            )
    return Claim(
        name=table["name"],
        source=table["source"],
        says=table["says"],
        quantity=_quantity(table, where, steps, _CLAIM_KEYS),
        expect=table["expect"],
        state=state,
        why=why,
        tolerance=float(tolerance),
        against=against,
    )


def _quantity(table: Any, where: str, steps: Sequence[str] | None, accepted: Sequence[str]) -> Quantity:
    if not isinstance(table, dict):
        raise ConfigError("expected a table with 'value' (and 'select', 'equals', 'reduce', 'scale')", where=where)
    _known_keys(table, accepted, where)
    value = table.get("value")
    if not isinstance(value, str) or "/" not in value.strip("/"):
        raise ConfigError(f"'value' must be '<group path>/<variable>' in results.nc, got {value!r}", where=where)
    if steps is not None:
        _check_step(value, steps, where)
    select = table.get("select", {})
    if not isinstance(select, dict):
        raise ConfigError("'select' must be a table: coordinate = value (or list of values)", where=where)
    reduce = table.get("reduce")
    if reduce is not None and reduce not in _REDUCTIONS:
        raise ConfigError(f"'reduce' must be one of {', '.join(_REDUCTIONS)}, got {reduce!r}", where=where)
    scale = table.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ConfigError(f"'scale' must be a finite number, got {scale!r}", where=where)
    return Quantity(
        value=value.strip("/"), select=dict(select), equals=table.get("equals"), reduce=reduce, scale=float(scale)
    )


def _check_step(value: str, steps: Sequence[str], where: str) -> None:
    first = value.strip("/").split("/", 1)[0]
    known = [*steps, "tasks"]
    if first not in known:
        hint = closest(first, known)
        raise ConfigError(
            f"'value' = {value!r} starts with {first!r}, which is not a step of the pipeline"
            + (f"; did you mean {hint!r}?" if hint else f"; steps: {', '.join(steps)}"),
            where=where,
        )


def check_steps(claims: Sequence[Claim], steps: Sequence[str], source: str = "<pipeline>") -> None:
    """Refuse a claim whose quantity reads a step the pipeline does not have (a ``ConfigError``)."""
    for i, claim in enumerate(claims):
        where = f"{source}, [[claims]] #{i + 1} ({claim.name!r})"
        _check_step(claim.quantity.value, steps, where)
        for name, quantity in claim.against.items():
            _check_step(quantity.value, steps, f"{where}, against.{name}")


def _known_keys(table: Mapping[str, Any], accepted: Sequence[str], where: str) -> None:
    for key in table:
        if key not in accepted:
            hint = closest(key, accepted)
            raise ConfigError(
                f"unknown key {key!r}."
                + (f" Did you mean {hint!r}?" if hint else "")
                + f" Accepted: {', '.join(accepted)}.",
                where=where,
            )


# ----------------------------------------------------------------------------- evaluation


@attrs.frozen
class Verdict:
    """A claim evaluated on a run.

    ``measured`` is the claim's quantity, ``bound`` what it was compared with (the
    ``against`` value plus the offset, or the centre of ``within``); both are NaN and
    ``problem`` says why when the results could not be read.
    """

    claim: Claim
    measured: float
    bound: float
    holds: bool
    problem: str | None = None

    @property
    def state(self) -> str:
        return HOLDS if self.holds else DOES_NOT_HOLD

    @property
    def as_recorded(self) -> bool:
        """Whether the run agrees with the state recorded in the pipeline."""
        return self.problem is None and self.state == self.claim.state


def evaluate(claims: Iterable[Claim], results: xr.DataTree) -> list[Verdict]:
    """Every claim against ``results``; a claim whose quantity cannot be read gets a ``problem``."""
    verdicts = []
    for claim in claims:
        expectation = claim.expectation
        try:
            measured = claim.quantity.read(results)
            against = expectation.against
            reference = claim.against[against].read(results) if isinstance(against, str) else against
        except ConfigError as exc:
            verdicts.append(Verdict(claim, math.nan, math.nan, False, problem=str(exc)))
            continue
        bound = reference if expectation.op == "within" else expectation.bound(reference)
        verdicts.append(Verdict(claim, measured, bound, expectation.test(measured, reference, claim.tolerance)))
    return verdicts


def verdicts_dataset(verdicts: Sequence[Verdict]) -> xr.Dataset:
    """The ``claims`` group of ``results.nc``: one row per claim along ``claim``."""
    names = [v.claim.name for v in verdicts]

    def column(values: list[Any], dtype: Any = None) -> tuple[str, np.ndarray]:
        return ("claim", np.asarray(values, dtype=dtype))

    ds = xr.Dataset(
        {
            "measured": column([v.measured for v in verdicts], float),
            "bound": column([v.bound for v in verdicts], float),
            "holds": column([v.holds for v in verdicts], bool),
            "recorded_holds": column([v.claim.state == HOLDS for v in verdicts], bool),
            "expect": column([v.claim.expect for v in verdicts], str),
            "value": column([v.claim.quantity.value for v in verdicts], str),
            "source": column([v.claim.source for v in verdicts], str),
            "says": column([v.claim.says for v in verdicts], str),
            "why": column([v.claim.why or "" for v in verdicts], str),
            "problem": column([v.problem or "" for v in verdicts], str),
        },
        coords={"claim": np.asarray(names, dtype=str)},
    )
    ds.attrs["description"] = "claims of the pipeline evaluated on this run (holds: the relation is satisfied)"
    return ds


def verdicts_from_dataset(ds: xr.Dataset) -> list[dict[str, Any]]:
    """The rows of a ``claims`` group as plain dicts (``name``, ``measured``, ``state``, ...)."""
    rows = []
    for i, name in enumerate(ds["claim"].values):
        holds = bool(ds["holds"].values[i])
        rows.append(
            {
                "name": str(name),
                "source": str(ds["source"].values[i]),
                "says": str(ds["says"].values[i]),
                "expect": str(ds["expect"].values[i]),
                "measured": float(ds["measured"].values[i]),
                "bound": float(ds["bound"].values[i]),
                "state": HOLDS if holds else DOES_NOT_HOLD,
                "recorded": HOLDS if bool(ds["recorded_holds"].values[i]) else DOES_NOT_HOLD,
                "why": str(ds["why"].values[i]),
                "problem": str(ds["problem"].values[i]),
            }
        )
    return rows


def format_number(value: float) -> str:
    """A measured value as pages and summaries show it: four significant digits."""
    if math.isnan(value):
        return "n/a"
    if value == 0:
        return "0"
    return f"{value:.4g}"


def summary_lines(verdicts: Sequence[Verdict]) -> list[str]:
    """The claims block of ``summary.txt``: a count, then one line per claim."""
    if not verdicts:
        return []
    agree = sum(v.as_recorded for v in verdicts)
    lines = [f"claims: {sum(v.holds for v in verdicts)} of {len(verdicts)} hold; {agree} as recorded"]
    for v in verdicts:
        if v.problem:
            lines.append(f"  {v.claim.name}: cannot be evaluated: {v.problem}")
            continue
        recorded = "" if v.as_recorded else f" (recorded: {v.claim.state})"
        named = v.claim.expectation.names()
        bound = f" (= {format_number(v.bound)})" if named else ""
        lines.append(
            f"  {v.claim.name}: {v.state}{recorded}: measured {format_number(v.measured)}, "
            f"expected {v.claim.expect}{bound} [{v.claim.source}]"
        )
    return lines


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A page's side-by-side table of claims, from rows as :func:`verdicts_from_dataset` gives."""
    lines = [
        "| claim | source | the paper | expected | measured | state |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        state = row["state"]
        if state == DOES_NOT_HOLD and row.get("why"):
            state = f"{state}: {row['why']}"
        expected = row["expect"]
        if Expectation.parse(expected).names() and not math.isnan(row.get("bound", math.nan)):
            expected += f" (= {format_number(row['bound'])})"  # what the compared quantity came to
        cells = [row["name"], row["source"], row["says"], expected, format_number(row["measured"]), state]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def attach_verdicts(results: xr.DataTree, claims: Sequence[Claim]) -> tuple[xr.DataTree, list[str]]:
    """``results`` with its ``claims`` group, and the summary lines; unchanged without claims."""
    verdicts = evaluate(claims, results)
    if not verdicts:
        return results, []
    results = results.copy()
    results[CLAIMS_GROUP] = xr.DataTree(verdicts_dataset(verdicts))
    return results, summary_lines(verdicts)


# ----------------------------------------------------------------------------- pipeline files and runs


def claims_of_file(path: str | Path) -> list[Claim]:
    """The claims of a pipeline file, read without building its components (no checkpoint is opened)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the pipeline: {exc}", where=str(path)) from exc
    steps = raw.get("steps", [])
    uses = [s.get("use") for s in steps if isinstance(s, dict) and s.get("name") is None]
    names = [
        s.get("name") or (s.get("use") if uses.count(s.get("use")) == 1 else f"{s.get('use')}-{i + 1}")
        for i, s in enumerate(steps)
        if isinstance(s, dict)
    ]
    return parse_claims(raw.get("claims", []), str(path), steps=[str(n) for n in names])


def run_verdicts(run_dir: str | Path) -> list[dict[str, Any]] | None:
    """The claims group of a run directory's ``results.nc`` as rows; None when there is no such run."""
    results = Path(run_dir) / "results.nc"
    if not results.is_file():
        return None
    with xr.open_datatree(results) as tree:
        if CLAIMS_GROUP not in tree.children:
            return []
        return verdicts_from_dataset(tree[CLAIMS_GROUP].to_dataset(inherit=False).load())
