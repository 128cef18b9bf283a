"""Conditions are data, evaluated by this small evaluator: no ``eval``, no I/O.

A condition is one of::

    {path: trigger.properties.cart_value, op: gte, value: 100}
    {all: [cond, ...]}   {any: [cond, ...]}   {not: cond}

Paths start at a root the journey can see: ``trigger`` (the event that started the
instance), ``event`` (the event being matched, in filters and ``wait_for``) and
``profile`` (traits, consent, timezone). Workflows import this module, so it stays
deterministic and standard-library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Operator = Literal[
    "eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "exists", "not_exists", "contains"
]
ROOTS = ("trigger", "event", "profile")
_MISSING = object()


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

    def evaluate(self, context: Mapping[str, Any]) -> bool:
        if self.all_ is not None:
            return all(child.evaluate(context) for child in self.all_)
        if self.any_ is not None:
            return any(child.evaluate(context) for child in self.any_)
        if self.not_ is not None:
            return not self.not_.evaluate(context)
        assert self.path is not None and self.op is not None
        return _compare(lookup(context, self.path), self.op, self.value)


def lookup(context: Mapping[str, Any], path: str) -> Any:
    """Follow a dotted path through nested mappings; missing parts give ``_MISSING``."""
    current: Any = context
    for part in path.split("."):
        if isinstance(current, Mapping) and part in current:
            current = current[part]
        else:
            return _MISSING
    return current


def _compare(actual: Any, op: Operator, expected: Any) -> bool:
    if op == "exists":
        return actual is not _MISSING and actual is not None
    if op == "not_exists":
        return actual is _MISSING or actual is None
    if actual is _MISSING:
        # A missing value only satisfies "not equal" and "not in".
        return op in ("ne", "not_in")
    try:
        if op == "eq":
            return bool(actual == expected)
        if op == "ne":
            return bool(actual != expected)
        if op == "in":
            return actual in expected
        if op == "not_in":
            return actual not in expected
        if op == "contains":
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
