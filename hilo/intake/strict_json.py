"""The JSON Hilo accepts, on every route: only what the databases' JSON functions read back.

Python's ``json`` reads ``NaN``, ``Infinity`` and ``-Infinity``, and reads ``1e400`` as
infinity; neither SQLite's nor PostgreSQL's JSON functions can read those back once stored.
:func:`loads` refuses them, naming where each was found, so the caller can say which field
to fix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from hilo.errors import InvalidInput

__all__ = ["JSONPath", "NotStorableJSON", "loads"]

JSONPath = tuple[str | int, ...]


class NotStorableJSON(InvalidInput):
    """Valid to Python's ``json``, but not JSON a database can read back."""

    def __init__(self, path: JSONPath, message: str) -> None:
        super().__init__(f"{'.'.join(str(part) for part in path) or 'body'}: {message}")
        self.path = path
        self.message = message


class _Refused:
    """Stands where a refused value was read, so that its path can be found after parsing."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def loads(text: str | bytes, *, parse_float: Callable[[str], float] = float) -> Any:
    """``json.loads`` that raises :class:`NotStorableJSON` for the values above.

    ``parse_float`` reads each decimal number first (to count them, say); syntax errors are
    ``json.JSONDecodeError`` as usual.
    """
    refused = False

    def constant(name: str) -> _Refused:
        nonlocal refused
        refused = True
        return _Refused(f"{name} is not valid JSON; send a number or null")

    def number(literal: str) -> float | _Refused:
        nonlocal refused
        value = parse_float(literal)
        if math.isfinite(value):
            return value
        refused = True
        return _Refused(f"the number {literal[:30]} is out of range for a double")

    value = json.loads(text, parse_constant=constant, parse_float=number)
    if refused:
        path, marker = _first_refused(value)
        raise NotStorableJSON(path, marker.message)
    return value


def _first_refused(value: Any) -> tuple[JSONPath, _Refused]:
    """The path of the first refused value, in document order, found without recursion."""
    stack: list[tuple[Any, JSONPath]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _Refused):
            return path, node
        if isinstance(node, dict):
            children = [(child, (*path, key)) for key, child in node.items()]
        elif isinstance(node, list):
            children = [(child, (*path, index)) for index, child in enumerate(node)]
        else:
            continue
        stack.extend(reversed(children))
    raise AssertionError("a value was refused but is not in the document")
