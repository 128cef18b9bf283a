"""Conditions are data, evaluated by this small evaluator: no ``eval``, no I/O.

A condition is one of::

    {path: trigger.properties.cart_value, op: gte, value: 100}
    {all: [cond, ...]}   {any: [cond, ...]}   {not: cond}

Paths start at a root the journey can see: ``trigger`` (the event that started the
instance), ``event`` (the event being matched, in filters and ``wait_for``) and
``profile`` (traits, consent, timezone). Workflows import this module, so it stays
deterministic and standard-library only.

One rule says when two values are the same (:func:`same_value`), for ``eq``, ``ne``, ``in``,
``not_in``, ``contains`` on a list, and every ``match_trigger`` (exit rules, ``wait_for``
outcomes, the goal):

- a number and a string spelling that number in decimal are the same value: ``555``,
  ``555.0``, ``"555"`` and ``"555.0"`` all equal ``555`` (shops send ids as numbers, most
  Segment sources as strings). The spelling is strict: digits with an optional sign,
  fraction and exponent; no spaces, no ``_``, no ``nan`` or ``inf``.
- two strings compare exactly, case and spaces included: ``"555"`` and ``"555.0"`` are
  different ids, as ``"0123"`` and ``"123"`` are.
- booleans are not numbers and not text: ``true`` equals only ``true``, never ``1``, ``"1"``
  nor ``"true"`` (text has too many spellings of yes to guess one).
- ``null`` equals only ``null``; a missing path equals nothing (``eq`` and ``in`` are false,
  ``ne`` and ``not_in`` true).
- lists and objects are the same when their items are, by this rule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Operator = Literal[
    "eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "exists", "not_exists", "contains"
]
ROOTS = ("trigger", "event", "profile")
_MISSING = object()
# A number as text: what JSON would write, plus a leading "+" or a bare fraction (".5").
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
SameValue = Callable[[Any, Any], bool]


def same_value(left: Any, right: Any) -> bool:
    """Whether two values are the same for matching (the rule in the module docstring)."""
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, int | float) or isinstance(right, int | float):
        left_number, right_number = _number(left), _number(right)
        if left_number is not None and right_number is not None:
            return left_number == right_number
        return False
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(same_value, left, right))
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(same_value(left[k], right[k]) for k in left)
    return type(left) is type(right) and bool(left == right)


def exact_equal(left: Any, right: Any) -> bool:
    """Python's ``==``: the rule before :func:`same_value`, kept for journeys started under
    it (a running instance keeps the rule it started with)."""
    return bool(left == right)


def key_text(value: str | int | float) -> str:
    """An instance key as text: a number as :func:`same_value` sees it (555 and 555.0 are
    the same cart, "555"), a string as it is."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _number(value: Any) -> Decimal | None:
    """The number a value is, for :func:`same_value`; None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        # The shortest text of the float, so that 0.1 and "0.1" agree.
        return Decimal(repr(value)) if math.isfinite(value) else None
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        return Decimal(value)
    return None


class Condition(BaseModel):
    """A comparison on one path, or ``all``/``any``/``not`` of other conditions."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    path: str | None = Field(None, examples=["trigger.properties.cart_value"])
    op: Operator | None = None
    value: Any = None
    all_: list[Condition] | None = Field(None, alias="all")
    any_: list[Condition] | None = Field(None, alias="any")
    not_: Condition | None = Field(None, alias="not")

    @model_validator(mode="after")
    def _one_form(self) -> Condition:
        forms = [
            name
            for name, present in (
                ("path", self.path is not None),
                ("all", self.all_ is not None),
                ("any", self.any_ is not None),
                ("not", self.not_ is not None),
            )
            if present
        ]
        if len(forms) != 1:
            raise ValueError(
                "a condition needs exactly one of 'path' (with 'op' and 'value'), 'all', "
                f"'any' or 'not'; got {forms or 'none'}"
            )
        if self.path is not None:
            if self.op is None:
                raise ValueError(
                    f"condition on '{self.path}' needs 'op': one of eq, ne, gt, gte, lt, "
                    "lte, in, not_in, exists, not_exists, contains"
                )
            root = self.path.split(".", 1)[0]
            if root not in ROOTS:
                raise ValueError(
                    f"path '{self.path}' must start with one of {', '.join(ROOTS)} "
                    "(e.g. 'trigger.properties.cart_value')"
                )
            if self.op in ("in", "not_in") and not isinstance(self.value, list):
                raise ValueError(f"op '{self.op}' needs a list as 'value', e.g. [a, b]")
        return self

    def paths(self) -> list[str]:
        """Every path this condition reads."""
        if self.path is not None:
            return [self.path]
        children = [*(self.all_ or []), *(self.any_ or [])]
        if self.not_ is not None:
            children.append(self.not_)
        return [p for child in children for p in child.paths()]

    def evaluate(self, context: Mapping[str, Any], same: SameValue = same_value) -> bool:
        """Whether the condition holds; ``same`` decides equality (workflows pass the rule
        their instance started with)."""
        if self.all_ is not None:
            return all(child.evaluate(context, same) for child in self.all_)
        if self.any_ is not None:
            return any(child.evaluate(context, same) for child in self.any_)
        if self.not_ is not None:
            return not self.not_.evaluate(context, same)
        assert self.path is not None and self.op is not None
        return _compare(lookup(context, self.path), self.op, self.value, same)


def lookup(context: Mapping[str, Any], path: str) -> Any:
    """Follow a dotted path through nested mappings; missing parts give ``_MISSING``."""
    current: Any = context
    for part in path.split("."):
        if isinstance(current, Mapping) and part in current:
            current = current[part]
        else:
            return _MISSING
    return current


def _compare(actual: Any, op: Operator, expected: Any, same: SameValue = same_value) -> bool:
    if op == "exists":
        return actual is not _MISSING and actual is not None
    if op == "not_exists":
        return actual is _MISSING or actual is None
    if actual is _MISSING:
        # A missing value only satisfies "not equal" and "not in".
        return op in ("ne", "not_in")
    try:
        if op == "eq":
            return same(actual, expected)
        if op == "ne":
            return not same(actual, expected)
        if op == "in":
            return any(same(actual, item) for item in expected)
        if op == "not_in":
            return not any(same(actual, item) for item in expected)
        if op == "contains":
            if isinstance(actual, list):
                return any(same(item, expected) for item in actual)
            return expected in actual
        left, right = _comparable(actual, expected)
        if op == "gt":
            return bool(left > right)
        if op == "gte":
            return bool(left >= right)
        if op == "lt":
            return bool(left < right)
        if op == "lte":
            return bool(left <= right)
    except TypeError:
        return False
    return False


def _comparable(actual: Any, expected: Any) -> tuple[Any, Any]:
    """Numbers sent as strings ("300.00") still compare as numbers."""
    if isinstance(expected, int | float) and isinstance(actual, str):
        try:
            return float(actual), expected
        except ValueError:
            return actual, expected
    return actual, expected
