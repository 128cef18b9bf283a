"""The policy's rules as pure functions of a moment, a time zone and the customer's recent
sends: local periods and wall-clock arithmetic (correct across DST), the first allowed minute
after gaps, quiet hours and allowed days, which scopes apply, and whether a cap is full. No
database, no I/O: :mod:`hilo.policy.service` reads, calls these and writes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Any, Literal
from zoneinfo import ZoneInfo

from hilo.journeys.definitions import WEEKDAYS
from hilo.policy.document import (
    _LOCK_SALT,
    Cap,
    ContactPolicy,
    Outcome,
    QuietHours,
    ScopeRules,
    SendIntent,
)


def wall_to_utc(day: date, minute: int, zone: ZoneInfo) -> datetime:
    """The first instant whose local wall time in ``zone`` reaches ``day`` + ``minute``.

    A wall time skipped by a spring-forward maps to the moment of the jump; a repeated one
    (fall-back) to its first occurrence.
    """
    wall = datetime.combine(day, time()) + timedelta(minutes=minute)
    before = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if before.astimezone(zone).replace(tzinfo=None) == wall:
        return before
    after = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    # In the gap: the jump lies between the two readings; find its minute.
    low, high = min(before, after), max(before, after)
    while low < high:
        middle = low + timedelta(minutes=((high - low) // timedelta(minutes=1)) // 2)
        if middle.astimezone(zone).replace(tzinfo=None) >= wall:
            high = middle
        else:
            low = middle + timedelta(minutes=1)
    return low


def period(window: str, at: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The local calendar day or week (Monday first) around ``at``, as UTC bounds."""
    day = at.astimezone(zone).date()
    if window == "calendar_week":
        day -= timedelta(days=day.weekday())
    return period_bounds(window, day, zone)


@lru_cache(maxsize=4096)
def period_bounds(window: str, first_day: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    length = 7 if window == "calendar_week" else 1
    end_day = first_day + timedelta(days=length)
    return wall_to_utc(first_day, 0, zone), wall_to_utc(end_day, 0, zone)


def moment_or_none(value: Any) -> datetime | None:
    """A stored moment (ISO text or datetime) as an aware datetime; None when unreadable."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def left_topic(preferences: Any, topic: str) -> bool:
    """True when the customer's saved choices leave ``topic`` out.

    Never saved (no ``topics`` list): every topic, as the preference page shows it. Saved:
    the ticked topics only, as the page's confirmation says ("no topics ticked, so no
    marketing until you pick one").
    """
    if not isinstance(preferences, Mapping):
        return False
    chosen = preferences.get("topics")
    return isinstance(chosen, list) and topic not in chosen


def local_label(moment: datetime, zone: ZoneInfo) -> str:
    return moment.astimezone(zone).strftime("%a %Y-%m-%d %H:%M %Z")


def hour_label(hour_of_week: int) -> str:
    return f"{WEEKDAYS[hour_of_week // 24].capitalize()} {hour_of_week % 24:02d}:00"


@dataclass(frozen=True)
class Timing:
    """The quiet hours or allowed days of one scope."""

    path: str
    quiet: QuietHours | None
    days: frozenset[str] | None

    def blocks(self, moment: datetime, zone: ZoneInfo) -> bool:
        local = moment.astimezone(zone)
        if self.days is not None and WEEKDAYS[local.weekday()] not in self.days:
            return True
        return self.quiet is not None and self.quiet.contains(local.hour * 60 + local.minute)

    def describe(self, zone: ZoneInfo) -> str:
        if self.quiet is not None:
            return f"quiet hours {self.quiet.start}-{self.quiet.end} ({zone.key})"
        return f"allowed days {', '.join(d for d in WEEKDAYS if d in (self.days or ()))}"


def next_allowed(at: datetime, zone: ZoneInfo, timings: Sequence[Timing]) -> datetime | None:
    """The first minute at or after ``at`` that no quiet hours or day list forbids."""
    if not timings:
        return at
    days: set[str] = set(WEEKDAYS)
    blocked: list[tuple[int, int]] = []
    for timing in timings:
        if timing.days is not None:
            days &= timing.days
        if timing.quiet is not None:
            blocked.extend(timing.quiet.blocked_minutes())
    free: list[tuple[int, int]] = []
    cursor = 0
    for low, high in sorted(blocked):
        if low > cursor:
            free.append((cursor, low))
        cursor = max(cursor, high)
    if cursor < 24 * 60:
        free.append((cursor, 24 * 60))
    today = at.astimezone(zone).date()
    for offset in range(9):
        day = today + timedelta(days=offset)
        if WEEKDAYS[day.weekday()] not in days:
            continue
        for low, high in free:
            end = wall_to_utc(day, high, zone)
            if end <= at:
                continue
            return max(at, wall_to_utc(day, low, zone))
    return None


# ================================================================ the service


@dataclass(frozen=True)
class Sent:
    """A counted reservation, as the caps and gaps see it."""

    at: datetime
    channel: str
    category: str
    journey_key: str


@dataclass(frozen=True)
class Scope:
    path: str
    rules: ScopeRules
    kind: Literal["global", "channel", "category", "journey"]
    name: str

    def counts(self, channel: str, category: str, journey_key: str) -> bool:
        if self.kind == "channel":
            return channel == self.name
        if self.kind == "category":
            return category == self.name
        if self.kind == "journey":
            return journey_key == self.name
        return True

    def label(self) -> str:
        return "messages" if self.kind == "global" else f"{self.name} messages"


@dataclass
class Verdict:
    outcome: Outcome
    reason: str
    rule: str | None = None
    defer_until: datetime | None = None
    counted: bool = True


def scopes_for(policy: ContactPolicy, intent: SendIntent) -> list[Scope]:
    scopes = [Scope("global", policy.global_, "global", "")]
    if (channel := policy.channels.get(intent.channel)) is not None:
        scopes.append(Scope(f"channels.{intent.channel}", channel, "channel", intent.channel))
    if (category := policy.categories.get(intent.category)) is not None:
        scopes.append(Scope(f"categories.{intent.category}", category, "category", intent.category))
    if (journey := policy.journeys.get(intent.journey_key)) is not None:
        scopes.append(
            Scope(f"journeys.{intent.journey_key}", journey, "journey", intent.journey_key)
        )
    return scopes


def timings_of(scopes: Iterable[Scope]) -> list[Timing]:
    """The quiet hours and day lists of these scopes, each named by its policy path."""
    timings = []
    for scope in scopes:
        if scope.rules.quiet_hours is not None:
            timings.append(Timing(f"{scope.path}.quiet_hours", scope.rules.quiet_hours, None))
        if scope.rules.allowed_days is not None:
            days = frozenset(scope.rules.allowed_days)
            timings.append(Timing(f"{scope.path}.allowed_days", None, days))
    return timings


def lock_key(customer_id: str) -> int:
    digest = hashlib.blake2b(customer_id.encode(), digest_size=8, key=_LOCK_SALT).digest()
    return int.from_bytes(digest, "big", signed=True)


def normalise_address(channel: str, address: str | None) -> str | None:
    if address is None or not address.strip():
        return None
    cleaned = address.strip()
    return cleaned.lower() if channel == "email" else cleaned


def cap_full(
    cap: Cap,
    scope: Scope,
    intent: SendIntent,
    history: Sequence[Sent],
    at: datetime,
    zone: ZoneInfo,
) -> tuple[int, datetime] | None:
    """(messages counted, when a slot frees) when the cap has no room at ``at``."""
    in_scope = [s.at for s in history if scope.counts(s.channel, s.category, s.journey_key)]
    rolling = cap.rolling
    if rolling is not None:
        inside = sorted(moment for moment in in_scope if moment > at - rolling)
        if len(inside) < cap.count:
            return None
        return len(inside), inside[len(inside) - cap.count] + rolling
    start, end = period(cap.window, at, zone)
    inside = [moment for moment in in_scope if start <= moment < end]
    if len(inside) < cap.count:
        return None
    return len(inside), end


def priority_of(policy: ContactPolicy, intent: SendIntent) -> int:
    if intent.priority is not None:
        return intent.priority
    rules = policy.journeys.get(intent.journey_key)
    return rules.priority if rules is not None else 0
