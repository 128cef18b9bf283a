"""Human durations as journey authors write them: ``30m``, ``4h``, ``1d12h``, ``2w``."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, WithJsonSchema

_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"^(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
DURATION_PATTERN = r"^(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?$"


def parse_duration(text: str) -> timedelta:
    """Parse ``1d4h30m``; raise ValueError saying what a duration looks like."""
    cleaned = text.strip().replace(" ", "")
    match = _DURATION.match(cleaned)
    if not cleaned or not match or not any(match.groups()):
        raise ValueError(
            f"'{text}' is not a duration; write a number and a unit (w, d, h, m, s), "
            "e.g. '45m', '4h', '1d12h'"
        )
    seconds = sum(
        int(value) * _UNITS[unit]
        for value, unit in zip(match.groups(), "wdhms", strict=True)
        if value
    )
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    """The shortest author-style spelling of ``delta`` (``0s`` for zero)."""
    seconds = int(delta.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    parts = []
    for unit in "dhms":
        amount, seconds = divmod(seconds, _UNITS[unit])
        if amount:
            parts.append(f"{amount}{unit}")
    return sign + ("".join(parts) or "0s")


def _coerce(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    return value


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("a duration must be longer than zero, e.g. '30m'")
    return value


Duration = Annotated[
    timedelta,
    BeforeValidator(_coerce),
    AfterValidator(_positive),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {"type": "string", "pattern": DURATION_PATTERN, "examples": ["45m", "4h", "1d12h"]}
    ),
]
