"""Política de Contacto: one service decides, for every send, ALLOW, DEFER or SKIP.

The policy is one versioned document (:class:`ContactPolicy`) with four scopes of rules —
``global``, ``channels.<channel>``, ``categories.<category>``, ``journeys.<journey>`` — each
able to say: caps (``count`` messages per rolling ``window`` such as ``24h``, or per
``calendar_day`` / ``calendar_week`` in the customer's time zone), ``min_gap`` between
messages, ``quiet_hours`` and ``allowed_days`` in the customer's time zone. Journey rules also
carry a ``priority``. Every scope that matches a send applies: a send must fit every cap, gap,
quiet window and day list of ``global``, its channel, its category and its journey.

Decision order for one send (:meth:`ContactPolicyService.decide`), first match wins::

    1  consent       SKIP  no consent for the channel (opt-in channels need it even for
                           transactional messages; an email opt-out does not stop them)
    2  suppressions  SKIP  the address is suppressed (hard bounce, complaint ...)
    3  preferences   SKIP  the customer's own choices, for marketing: the send's ``topic`` is
                           one they left on the preference page ("left topic: promotions",
                           any channel); on email, a pause or "less often". No
                           ignore_policy and no exempt category overrides them
    4  ignore_policy ALLOW the step ignores the policy explicitly; the send still counts
    5  exempt        ALLOW exempt_categories (default: transactional); not counted
    6  timing        DEFER min_gap, then quiet_hours and allowed_days: to the first allowed
                           minute in the customer's zone (correct across DST)
    7  caps          SKIP  a cap is full at the time the send could go out
    8  priority      SKIP  taking the last slot of a cap that a higher-priority journey is
                           waiting for (see below)
    9                ALLOW with a reservation that counts towards every cap until released

Priority. Two journeys compete when both want the last free slot of a cap that counts them
both. The service can only arbitrate between sends it knows about, so it defines:

* A send that is ready now takes a free slot unless a *higher-priority* journey is waiting
  for that slot: its latest decision was a DEFER (quiet hours, allowed days, min gap) due
  within the cap window the slot belongs to (the same calendar day/week, or before the slot
  would free again in a rolling window), and not overdue by more than
  :data:`WAITING_GRACE`. The lower-priority send is then **skipped** with reason
  ``lower priority``: caps drop what does not fit (a deferral would only queue it behind the
  same cap and deliver it stale), and the slot stays free for the journey due there.
* Otherwise the first send to ask takes the slot, whatever its priority: a message already
  reserved or sent is never taken back (it may be on its way to the customer). A
  higher-priority send that finds the cap full is skipped with ``cap reached``.
* Equal priorities: first come, first served.

Typical case: at 21:30 both ``welcome`` (priority 10) and ``win_back`` (0) are deferred by
quiet hours to 08:00; whichever workflow wakes first, ``welcome`` gets the day's last slot.

Reservations. An ALLOW reserves a slot (``contact_reservations``, one row per message id);
the send then calls :meth:`~ContactPolicyService.mark_used` after the provider accepted it,
or :meth:`~ContactPolicyService.release` when it failed permanently, which frees the slot.
A reservation never marked either way still counts: the message may have gone out.

Atomicity. Each decision runs in one transaction that holds the customer's lock: SQLite
``BEGIN IMMEDIATE`` (the database's single writer lock), PostgreSQL
``pg_advisory_xact_lock`` on a 64-bit hash of the customer id. Fifty sends racing for the
last slot get exactly one ALLOW on both databases. The decision path talks to the driver
directly, with few statements: on PostgreSQL two round trips (BEGIN, the lock and one read
of everything the decision needs; the writes with COMMIT) of statements prepared once per
connection, on a small pool of its own. On SQLite a process's decisions queue for the
writer in the order they came, in turn with its other writers (ingestion, the dispatcher).

Idempotence. Asking again for the same message id returns the stored ALLOW (while its
reservation is held or used) or the stored SKIP; a DEFER, or an ALLOW whose reservation was
released, is decided afresh. Every decision is stored in ``policy_decisions``.

Envío Inteligente (:meth:`~ContactPolicyService.best_send_time`): the customer's best hour
of the week, learned from their own engagement events (:data:`ENGAGEMENT_WEIGHTS`) of the
last :data:`ENGAGEMENT_LOOKBACK` in their time zone, within a maximum delay and outside the
global quiet hours, with a fallback hour when there is too little data. The message ledger
has no open/click status yet, so only events are read.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import cached_property, lru_cache
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select, update

from hilo.clock import as_utc, utcnow
from hilo.customers.consent import (
    ADDRESS_TRAITS,
    CONSENT_DEFAULTS,
    FREQUENCY_SPACING_DAYS,
    PREFERENCE_CHANNEL,
    PREFERENCES_TRAIT,
)
from hilo.db.fastpath import NAMED_PARAMETER, pyformat
from hilo.db.models import (
    ContactPolicyVersion,
    ContactReservation,
    PolicyDecisionRecord,
    SendTimeChoice,
    Suppression,
)
from hilo.db.store import Store
from hilo.db.writers import writer_turn
from hilo.errors import InvalidInput
from hilo.journeys.definitions import CHANNELS, JOURNEY_KEY, WEEKDAYS
from hilo.journeys.durations import Duration, format_duration, parse_duration

__all__ = [
    "ENGAGEMENT_LOOKBACK",
    "ENGAGEMENT_WEIGHTS",
    "WAITING_GRACE",
    "BestTime",
    "Cap",
    "ContactPolicy",
    "ContactPolicyService",
    "CurrentPolicy",
    "JourneyRules",
    "PolicyDecision",
    "PolicyInvalid",
    "PolicyProblem",
    "QuietHours",
    "ScopeRules",
    "SendIntent",
    "left_topic",
    "parse_policy",
]

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
Outcome = Literal["allow", "defer", "skip"]

CALENDAR_WINDOWS: tuple[str, ...] = ("calendar_day", "calendar_week")
TRANSACTIONAL = "transactional"
_CLOCK = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
_CATEGORY = re.compile(r"^[a-z][a-z0-9_]{0,19}$")

# A waiting higher-priority send that has not come back this long after it was due is taken
# to be gone (its journey ended): it no longer holds the slot.
WAITING_GRACE = timedelta(minutes=5)

# Engagement that teaches Envío Inteligente, with how much each one says about attention.
ENGAGEMENT_WEIGHTS: dict[str, float] = {
    "Email Opened": 1.0,
    "Email Link Clicked": 2.0,
    "Email Clicked": 2.0,
    "Push Notification Tapped": 2.0,
    "Push Opened": 2.0,
    "SMS Link Clicked": 2.0,
    "Page Viewed": 1.0,
    "Screen Viewed": 1.0,
    "Application Opened": 1.0,
    "App Opened": 1.0,
}
ENGAGEMENT_LOOKBACK = timedelta(days=90)
MIN_ENGAGEMENT_SAMPLES = 5
# Keys the hash of customer ids, so this service's advisory locks stay clear of anyone else's.
_LOCK_SALT = b"hilo.contact_policy"


# ================================================================ the policy document


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _clock_minutes(value: str) -> int:
    hours, minutes = value.split(":")
    return int(hours) * 60 + int(minutes)


class Cap(_Strict):
    """At most ``count`` counted messages per ``window``."""

    count: int = Field(description="How many messages the window allows.", examples=[3])
    window: str = Field(
        description="A rolling duration ('24h', '7d') or 'calendar_day' / 'calendar_week' "
        "(midnight to midnight, Monday to Sunday, in the customer's time zone).",
        examples=["24h", "7d", "calendar_day", "calendar_week"],
    )

    @field_validator("count")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError(
                f"{value} would forbid every message; a cap allows at least 1 "
                "(to stop a channel, withdraw consent or suppress the address)"
            )
        return value

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, value: Any) -> str:
        if isinstance(value, str) and value.strip() in CALENDAR_WINDOWS:
            return value.strip()
        if isinstance(value, str):
            try:
                delta = parse_duration(value)
            except ValueError:
                delta = None
            if delta is not None and delta > timedelta(0):
                return value.strip()  # the author's spelling: '24h' stays '24h', not '1d'
        raise ValueError(
            f"{value!r} is not a window; write a rolling duration such as '24h' or '7d', "
            "or 'calendar_day' / 'calendar_week'"
        )

    @cached_property
    def rolling(self) -> timedelta | None:
        """The window's length when it rolls; None for calendar windows."""
        return None if self.window in CALENDAR_WINDOWS else parse_duration(self.window)

    def describe(self) -> str:
        if self.window == "calendar_day":
            return f"{self.count} per calendar day"
        if self.window == "calendar_week":
            return f"{self.count} per calendar week"
        return f"{self.count} per {self.window}"


class QuietHours(_Strict):
    """No sends from ``start`` to ``end`` local time; ``21:00``-``08:00`` spans midnight."""

    start: str = Field(examples=["21:00"])
    end: str = Field(examples=["08:00"])

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        if not isinstance(value, str) or not _CLOCK.match(value):
            raise ValueError(f"{value!r} is not a time of day; write HH:MM, e.g. '21:00'")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHours:
        if self.start == self.end:
            raise ValueError(
                f"start and end are both {self.start}: quiet hours would be empty; "
                "remove quiet_hours or give two different times"
            )
        return self

    def blocked_minutes(self) -> list[tuple[int, int]]:
        """The quiet stretches of one local day, as [start, end) minutes after midnight."""
        start, end = _clock_minutes(self.start), _clock_minutes(self.end)
        if start < end:
            return [(start, end)]
        return [(0, end), (start, 24 * 60)]

    def contains(self, minute: int) -> bool:
        return any(lo <= minute < hi for lo, hi in self.blocked_minutes())


class ScopeRules(_Strict):
    """What one scope (global, a channel, a category, a journey) allows."""

    caps: list[Cap] = Field(default_factory=list)
    min_gap: Duration | None = Field(
        None, description="Shortest time between two counted messages in this scope."
    )
    quiet_hours: QuietHours | None = None
    allowed_days: list[Weekday] | None = Field(
        None, description="Local days on which sends may go out; all days when absent."
    )

    @field_validator("allowed_days")
    @classmethod
    def _some_day(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError(
                "an empty list would forbid every day; list at least one of "
                "mon, tue, wed, thu, fri, sat, sun, or remove allowed_days"
            )
        return value


class JourneyRules(ScopeRules):
    """A journey's rules, with its priority when journeys compete for the last slot."""

    priority: int = Field(0, description="Higher wins the last slot of a cap; default 0.")


class ContactPolicy(_Strict):
    """The whole contact policy: the document stored, versioned and audited."""

    default_timezone: str = Field(
        "UTC", description="For customers whose time zone is unknown.", examples=["Europe/Madrid"]
    )
    exempt_categories: list[str] = Field(
        default_factory=lambda: [TRANSACTIONAL],
        description="Categories that bypass caps, gaps, quiet hours and priority; they are "
        "not counted. Consent and suppressions still apply.",
    )
    global_: ScopeRules = Field(default_factory=ScopeRules, alias="global")
    channels: dict[str, ScopeRules] = Field(default_factory=dict)
    categories: dict[str, ScopeRules] = Field(default_factory=dict)
    journeys: dict[str, JourneyRules] = Field(default_factory=dict)

    @field_validator("default_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if _zone_or_none(value) is None:
            raise ValueError(
                f"unknown time zone {value!r}; use an IANA name such as 'Europe/Madrid'"
            )
        return value

    @field_validator("channels")
    @classmethod
    def _known_channels(cls, value: dict[str, ScopeRules]) -> dict[str, ScopeRules]:
        for name in value:
            if name not in CHANNELS:
                raise ValueError(f"unknown channel {name!r}; channels are {', '.join(CHANNELS)}")
        return value

    @field_validator("categories", mode="before")
    @classmethod
    def _category_names(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name in value:
                if not isinstance(name, str) or not _CATEGORY.match(name):
                    raise ValueError(
                        f"{name!r} is not a category name; write lower_snake_case, e.g. 'marketing'"
                    )
        return value

    @field_validator("exempt_categories")
    @classmethod
    def _exempt_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _CATEGORY.match(name):
                raise ValueError(
                    f"{name!r} is not a category name; write lower_snake_case, e.g. 'transactional'"
                )
        return value

    @field_validator("journeys", mode="before")
    @classmethod
    def _journey_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name in value:
                if not isinstance(name, str) or not re.match(JOURNEY_KEY, name):
                    raise ValueError(
                        f"{name!r} is not a journey key; keys are lower_snake_case, "
                        "e.g. 'abandoned_cart'"
                    )
        return value

    def document(self) -> dict[str, Any]:
        """The JSON form, as stored and served (``global`` spelt as such)."""
        return self.model_dump(mode="json", by_alias=True)


class PolicyProblem(BaseModel):
    """One thing wrong with a policy document: where, and what would be right."""

    field: str = Field(examples=["channels.email.caps[0].window"])
    problem: str


class PolicyInvalid(InvalidInput):
    """A policy document that does not validate; ``problems`` names every field."""

    def __init__(self, problems: list[PolicyProblem]) -> None:
        self.problems = problems
        super().__init__(
            "invalid contact policy:\n"
            + "\n".join(f"  {problem.field}: {problem.problem}" for problem in problems)
        )


_FIELDS = {
    "root": (
        "default_timezone",
        "exempt_categories",
        "global",
        "channels",
        "categories",
        "journeys",
    ),
    "scope": ("caps", "min_gap", "quiet_hours", "allowed_days"),
    "cap": ("count", "window"),
    "quiet_hours": ("start", "end"),
}


def _fields_expected(loc: Sequence[int | str]) -> tuple[str, ...]:
    """Which fields the object at ``loc`` (the parent of an unknown field) accepts."""
    parts = list(loc)
    if not parts:
        return _FIELDS["root"]
    if parts[-1] == "quiet_hours":
        return _FIELDS["quiet_hours"]
    if len(parts) >= 2 and parts[-2] == "caps":
        return _FIELDS["cap"]
    if parts[0] == "journeys":
        return (*_FIELDS["scope"], "priority")
    return _FIELDS["scope"]


def _path(loc: Sequence[int | str]) -> str:
    text_path = ""
    for part in loc:
        if isinstance(part, int):
            text_path += f"[{part}]"
        else:
            text_path += f".{part}" if text_path else str(part)
    return text_path or "(document)"


def policy_problems(error: ValidationError) -> list[PolicyProblem]:
    problems = []
    for item in error.errors():
        loc = list(item["loc"])
        if item["type"] == "extra_forbidden":
            name = loc[-1]
            allowed = ", ".join(_fields_expected(loc[:-1]))
            message = f"unknown field {name!r}; expected one of: {allowed}"
        elif item["type"] == "value_error":
            message = str(item.get("ctx", {}).get("error", item["msg"]))
        elif item["type"] == "literal_error" and loc and loc[-2:-1] == ["allowed_days"]:
            message = f"{item['input']!r} is not a day; write one of {', '.join(WEEKDAYS)}"
        else:
            message = item["msg"]
        problems.append(PolicyProblem(field=_path(loc), problem=message))
    return problems


def parse_policy(document: Mapping[str, Any] | ContactPolicy) -> ContactPolicy:
    """Validate a policy document; :class:`PolicyInvalid` names every problem's field."""
    if isinstance(document, ContactPolicy):
        return document
    if not isinstance(document, Mapping):
        raise PolicyInvalid(
            [PolicyProblem(field="(document)", problem="a policy is a mapping of rules")]
        )
    try:
        return ContactPolicy.model_validate(dict(document))
    except ValidationError as error:
        raise PolicyInvalid(policy_problems(error)) from None


# ================================================================ requests and answers


class SendIntent(BaseModel):
    """One send that asks the policy: who, what, from which journey."""

    message_id: str = Field(min_length=1, max_length=200)
    customer_id: str = Field(min_length=1, max_length=200)
    journey_key: str = Field(min_length=1, max_length=63)
    channel: str = Field(min_length=1, max_length=20, examples=["email"])
    category: str = Field("marketing", min_length=1, max_length=20)
    priority: int | None = Field(None, description="Overrides the journey's priority.")
    ignore_policy: bool = Field(
        False, description="The step ignores caps, gaps, quiet hours and priority."
    )
    address: str | None = Field(
        None, max_length=320, description="Where it goes (email address, phone), for suppressions."
    )
    timezone: str | None = Field(None, description="Overrides the profile's time zone.")
    topic: str | None = Field(
        None,
        max_length=100,
        description="The preference topic the message is about; skipped when the customer left it.",
    )

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None and _zone_or_none(value) is None:
            raise ValueError(
                f"unknown time zone {value!r}; use an IANA name such as 'America/New_York'"
            )
        return value


class PolicyDecision(BaseModel):
    """The answer for one send."""

    message_id: str
    outcome: Outcome
    reason: str
    rule: str | None = Field(
        None, description="The policy path or check that decided, e.g. channels.email.caps[0]."
    )
    defer_until: datetime | None = None
    reservation_id: int | None = None
    decided_at: datetime
    policy_version: int
    timezone: str | None = None
    replayed: bool = Field(False, description="True when this repeats a stored decision.")


class BestTime(BaseModel):
    """Envío Inteligente's answer: when to send, and why."""

    at: datetime
    hour_of_week: int = Field(description="Local hour of the week: Monday 00:00 is 0.")
    reason: str
    samples: int = Field(description="Engagement events it learned from.")
    timezone: str
    fallback: bool


class CurrentPolicy(BaseModel):
    version: int = Field(description="0 while no policy was ever set (the defaults apply).")
    policy: ContactPolicy
    actor: str | None = None
    note: str | None = None
    created_at: datetime | None = None


# ================================================================ tables


_MARK_USED_SQL = """
    UPDATE contact_reservations SET status = 'used', updated_at = :now
    WHERE message_id = :message_id AND status IN ('reserved', 'used')
"""


def _zone_or_none(name: str | None) -> ZoneInfo | None:
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _wall_to_utc(day: date, minute: int, zone: ZoneInfo) -> datetime:
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


def _period(window: str, at: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The local calendar day or week (Monday first) around ``at``, as UTC bounds."""
    day = at.astimezone(zone).date()
    if window == "calendar_week":
        day -= timedelta(days=day.weekday())
    return _period_bounds(window, day, zone)


@lru_cache(maxsize=4096)
def _period_bounds(window: str, first_day: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    length = 7 if window == "calendar_week" else 1
    end_day = first_day + timedelta(days=length)
    return _wall_to_utc(first_day, 0, zone), _wall_to_utc(end_day, 0, zone)


def _moment_or_none(value: Any) -> datetime | None:
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


def _local_label(moment: datetime, zone: ZoneInfo) -> str:
    return moment.astimezone(zone).strftime("%a %Y-%m-%d %H:%M %Z")


def _hour_label(hour_of_week: int) -> str:
    return f"{WEEKDAYS[hour_of_week // 24].capitalize()} {hour_of_week % 24:02d}:00"


@dataclass(frozen=True)
class _Timing:
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


def _next_allowed(at: datetime, zone: ZoneInfo, timings: Sequence[_Timing]) -> datetime | None:
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
            end = _wall_to_utc(day, high, zone)
            if end <= at:
                continue
            return max(at, _wall_to_utc(day, low, zone))
    return None


# ================================================================ the service


@dataclass(frozen=True)
class _Sent:
    """A counted reservation, as the caps and gaps see it."""

    at: datetime
    channel: str
    category: str
    journey_key: str


@dataclass(frozen=True)
class _Scope:
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
class _Verdict:
    outcome: Outcome
    reason: str
    rule: str | None = None
    defer_until: datetime | None = None
    counted: bool = True


def _scopes(policy: ContactPolicy, intent: SendIntent) -> list[_Scope]:
    scopes = [_Scope("global", policy.global_, "global", "")]
    if (channel := policy.channels.get(intent.channel)) is not None:
        scopes.append(_Scope(f"channels.{intent.channel}", channel, "channel", intent.channel))
    if (category := policy.categories.get(intent.category)) is not None:
        scopes.append(
            _Scope(f"categories.{intent.category}", category, "category", intent.category)
        )
    if (journey := policy.journeys.get(intent.journey_key)) is not None:
        scopes.append(
            _Scope(f"journeys.{intent.journey_key}", journey, "journey", intent.journey_key)
        )
    return scopes


def _timings(scopes: Iterable[_Scope]) -> list[_Timing]:
    """The quiet hours and day lists of these scopes, each named by its policy path."""
    timings = []
    for scope in scopes:
        if scope.rules.quiet_hours is not None:
            timings.append(_Timing(f"{scope.path}.quiet_hours", scope.rules.quiet_hours, None))
        if scope.rules.allowed_days is not None:
            days = frozenset(scope.rules.allowed_days)
            timings.append(_Timing(f"{scope.path}.allowed_days", None, days))
    return timings


def _lock_key(customer_id: str) -> int:
    digest = hashlib.blake2b(customer_id.encode(), digest_size=8, key=_LOCK_SALT).digest()
    return int.from_bytes(digest, "big", signed=True)


def _normalise_address(channel: str, address: str | None) -> str | None:
    if address is None or not address.strip():
        return None
    cleaned = address.strip()
    return cleaned.lower() if channel == "email" else cleaned


_HISTORY_SQL = """
    SELECT reserved_at, channel, category, journey_key FROM contact_reservations
    WHERE customer_id = :customer AND counted AND status IN ('reserved', 'used')
      AND reserved_at > :since
"""
# The address a send's suppression is looked up by: the one it names, else the profile's
# trait, cleaned as _normalise_address does (the decision checks that they agree).
_LOOKUP = """coalesce(:address, CASE WHEN :channel = 'email' THEN lower(trim({trait}))
                    ELSE trim({trait}) END)"""
# Everything a decision needs to know first, in one round trip; the history is read for the
# cached policy's horizons (read again on its own when the policy changed meanwhile).
_SNAPSHOT_SQL = """
    SELECT v.policy_version, p.consent, p.timezone, p.traits,
           d.decision, d.reason, d.rule, d.reservation_id, d.decided_at,
           d.policy_version, d.timezone,
           r.id, r.status, {lookup},
           (SELECT s.reason FROM suppressions AS s
            WHERE s.channel = :channel AND s.address = {lookup}),
           (SELECT {aggregate} FROM contact_reservations AS h
            WHERE h.customer_id = :customer AND h.counted AND h.status IN ('reserved', 'used')
              AND h.reserved_at > :since),
           (SELECT max(w.priority) FROM policy_decisions AS w
            WHERE w.customer_id = :customer AND w.defer_until >= :waiting_since)
    FROM (SELECT max(version) AS policy_version FROM contact_policy_versions) AS v
    LEFT JOIN profiles AS p ON p.customer_id = :customer
    LEFT JOIN policy_decisions AS d
           ON d.id = (SELECT max(id) FROM policy_decisions WHERE message_id = :message)
    LEFT JOIN contact_reservations AS r ON r.message_id = :message
"""
_SUPPRESSED_SQL = "SELECT reason FROM suppressions WHERE channel = :channel AND address = :address"
_POLICY_SQL = "SELECT document FROM contact_policy_versions WHERE version = :version"
# The customer's latest marketing message on a channel still counted, for "less often".
_LAST_MARKETING_SQL = """
    SELECT max(reserved_at) FROM contact_reservations
    WHERE customer_id = :customer AND channel = :channel AND category = 'marketing'
      AND status IN ('reserved', 'used') AND reserved_at > :since
"""
# Higher-priority sends still waiting on a DEFER (no later decision for their message).
_WAITING_SQL = """
    SELECT d.journey_key, d.channel, d.category, d.priority, d.defer_until
    FROM policy_decisions AS d
    WHERE d.customer_id = :customer AND d.decision = 'defer' AND d.priority > :priority
      AND d.message_id <> :message AND d.defer_until >= :low AND d.defer_until < :high
      AND d.id = (SELECT max(id) FROM policy_decisions AS l WHERE l.message_id = d.message_id)
    ORDER BY d.priority DESC, d.defer_until
"""
# {guard}: nothing, or the optimistic write's condition (below).
_RESERVATION_INSERT_GUARDED = """
    INSERT INTO contact_reservations (message_id, customer_id, journey_key, channel, category,
        priority, counted, reserved_at, status, release_reason, updated_at)
    SELECT :message_id, :customer_id, :journey_key, :channel, :category,
        :priority, :counted, :decided_at, 'reserved', NULL, :decided_at
    {guard}
    RETURNING id
"""
_RESERVATION_RENEW_GUARDED = """
    UPDATE contact_reservations SET status = 'reserved', release_reason = NULL,
        reserved_at = :decided_at, updated_at = :decided_at, counted = :counted,
        priority = :priority, journey_key = :journey_key, channel = :channel,
        category = :category
    WHERE message_id = :message_id {guard}
    RETURNING id
"""
_RESERVATION_INSERT = _RESERVATION_INSERT_GUARDED.format(guard="")
_RESERVATION_RENEW = _RESERVATION_RENEW_GUARDED.format(guard="")
_DECISION_COLUMNS = (
    "message_id, customer_id, journey_key, channel, category, priority, decision, reason, "
    "rule, defer_until, reservation_id, policy_version, timezone, decided_at"
)
_DECISION_INSERT = f"""
    INSERT INTO policy_decisions ({_DECISION_COLUMNS})
    VALUES (:message_id, :customer_id, :journey_key, :channel, :category, :priority,
        :decision, :reason, :rule, :defer_until, :reservation_id, :policy_version, :timezone,
        :decided_at)
"""
# PostgreSQL: the reservation and its decision in one statement.
_ALLOW_WITH = f"""
    WITH r AS ({{reservation}})
    INSERT INTO policy_decisions ({_DECISION_COLUMNS})
    VALUES (:message_id, :customer_id, :journey_key, :channel, :category, :priority,
        :decision, :reason, :rule, NULL, (SELECT id FROM r), :policy_version, :timezone,
        :decided_at)
    RETURNING reservation_id
"""
# PostgreSQL, optimistic: the ALLOW is written only if nothing it was decided on changed since
# the snapshot: the policy version, and the customer's counted reservations (their number
# and ids; a new one, a renewed one or a release all change them).
_UNCHANGED = """
    SELECT 1 WHERE
      (SELECT coalesce(max(version), 0) FROM contact_policy_versions) = :policy_version
      AND (SELECT count(*) = :seen_count AND coalesce(sum(h.id), 0) = :seen_sum
           FROM contact_reservations AS h
           WHERE h.customer_id = :customer_id AND h.counted
             AND h.status IN ('reserved', 'used') AND h.reserved_at > :since)
"""
_CHECKED_RESERVATION_INSERT = _RESERVATION_INSERT_GUARDED.format(
    guard="WHERE EXISTS (SELECT 1 FROM unchanged)"
)
_CHECKED_RESERVATION_RENEW = _RESERVATION_RENEW_GUARDED.format(
    guard="AND EXISTS (SELECT 1 FROM unchanged)"
)
_CHECKED_ALLOW = f"""
    WITH unchanged AS ({_UNCHANGED}), r AS ({{reservation}})
    INSERT INTO policy_decisions ({_DECISION_COLUMNS})
    SELECT :message_id, :customer_id, :journey_key, :channel, :category, :priority,
        :decision, :reason, :rule, NULL, r.id, :policy_version, :timezone, :decided_at
    FROM r
    RETURNING reservation_id
"""
# The PostgreSQL type of every parameter of the statements prepared on the server.
_PARAMETER_TYPES = {
    "customer": "text",
    "message": "text",
    "channel": "text",
    "address": "text",
    "trait": "text",
    "since": "timestamptz",
    "waiting_since": "timestamptz",
    "message_id": "text",
    "customer_id": "text",
    "journey_key": "text",
    "category": "text",
    "priority": "integer",
    "counted": "boolean",
    "decision": "text",
    "reason": "text",
    "rule": "text",
    "defer_until": "timestamptz",
    "reservation_id": "integer",
    "policy_version": "integer",
    "seen_count": "bigint",
    "seen_sum": "bigint",
    "timezone": "text",
    "decided_at": "timestamptz",
}


@dataclass
class _Snapshot:
    policy_version: int
    consent: dict[str, Any]
    profile_timezone: str | None
    traits: dict[str, Any]
    decision: str | None
    reason: str | None
    rule: str | None
    reservation_id: int | None
    decided_at: datetime | None
    decided_version: int | None
    decided_timezone: str | None
    reservation_row: int | None
    reservation_status: str | None
    # The address the suppression below was looked up by, and what it found.
    suppression_address: str | None
    suppressed_because: str | None
    history: list[_Sent]
    # How many counted reservations the history holds and the sum of their ids: an optimistic
    # ALLOW is written only if the customer's still match (_UNCHANGED).
    fingerprint: tuple[int, int]
    # The highest priority among this customer's recent DEFERs (some maybe decided since).
    waiting_priority: int | None


class _Transaction:
    """A decision's transaction: its cursor, and the snapshot read under the lock.

    Optimistic (PostgreSQL): the snapshot was read without the lock, outside any
    transaction; the write checks it still stands, or raises :class:`_Stale`.
    """

    def __init__(
        self,
        cursor: Any,
        snapshot: Sequence[Any],
        optimistic: bool = False,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        self.cursor = cursor
        self.snapshot = snapshot
        self.committed = False  # the write committed it
        self.optimistic = optimistic
        self.params = params or {}
        self.fingerprint = (0, 0)  # of the snapshot's counted reservations, once parsed


class _Stale(Exception):
    """What an optimistic decision was based on changed before its write: decide again,
    under the customer's lock."""


class _Backend:
    """The decision path's SQL on one database: driver-level, few round trips a decision."""

    aggregate: str
    trait: str  # the profile's trait named :trait, as text

    def __init__(self) -> None:
        lookup = _LOOKUP.format(trait=self.trait)
        self.snapshot_source = _SNAPSHOT_SQL.format(aggregate=self.aggregate, lookup=lookup)
        self.snapshot_sql = self.prepare(self.snapshot_source)
        self.history_sql = self.prepare(_HISTORY_SQL)
        self.suppressed_sql = self.prepare(_SUPPRESSED_SQL)
        self.policy_sql = self.prepare(_POLICY_SQL)
        self.waiting_sql = self.prepare(_WAITING_SQL)
        self.last_marketing_sql = self.prepare(_LAST_MARKETING_SQL)

    def prepare(self, sql: str) -> str:
        return sql

    def when(self, moment: datetime | None) -> Any:
        return moment

    def moment(self, value: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return as_utc(value)

    def json(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value

    # Whether decisions may first be tried without the customer's lock (see _Transaction).
    optimistic = False

    def transaction(
        self, lock_key: int, params: Mapping[str, Any], commit: bool, optimistic: bool = False
    ) -> AbstractContextManager[_Transaction]:
        """The customer's transaction, holding their lock, with the snapshot read in it."""
        raise NotImplementedError

    def write(self, tx: _Transaction, reserve: bool, renew: bool, values: dict[str, Any]) -> Any:
        """Store the decision (and its reservation when ``reserve``); the reservation id.
        The transaction commits with it or when it ends."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _SQLiteBackend(_Backend):
    aggregate = (
        "json_group_array(json_array(h.reserved_at, h.channel, h.category, h.journey_key, h.id))"
    )
    trait = "json_extract(p.traits, '$.' || :trait)"

    def __init__(self, store: Store) -> None:
        # The store's connections: no commit of theirs copies the WAL into the database (the
        # store's own thread does), so no decision waits behind a checkpoint.
        self.engine = store.engine
        # Decisions wait for the database's single writer here, in the order they came, and
        # then in turn with ingestion and the dispatcher; SQLite's busy handler would sleep
        # in steps of up to 100 ms instead.
        self.writer = writer_turn(store.engine)
        super().__init__()
        self.reservation_insert = _RESERVATION_INSERT
        self.reservation_renew = _RESERVATION_RENEW
        self.decision_insert = _DECISION_INSERT

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The turn to write: first among this process's decisions, then among all writers."""
        with self.writer:
            yield

    def when(self, moment: datetime | None) -> Any:
        # The text SQLAlchemy stores for DateTime on SQLite, so both read each other's rows.
        if moment is None:
            return None
        return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")

    @contextmanager
    def transaction(
        self, lock_key: int, params: Mapping[str, Any], commit: bool, optimistic: bool = False
    ) -> Iterator[_Transaction]:
        # SQLite has one writer at a time anyway: no optimistic path.
        # A preview only reads: a deferred transaction, out of the writers' way.
        with self._writing() if commit else nullcontext():
            proxied = self.engine.raw_connection()
            connection: Any = proxied.driver_connection
            previous = connection.isolation_level
            # The driver must not open its own transaction: the BEGIN below is ours.
            connection.isolation_level = None
            cursor = connection.cursor()
            try:
                cursor.execute("BEGIN IMMEDIATE" if commit else "BEGIN")
                try:
                    cursor.execute(self.snapshot_sql, params)
                    yield _Transaction(cursor, cursor.fetchone())
                except BaseException:
                    cursor.execute("ROLLBACK")
                    raise
                cursor.execute("COMMIT" if commit else "ROLLBACK")
            finally:
                cursor.close()
                connection.isolation_level = previous
                proxied.close()

    def write(self, tx: _Transaction, reserve: bool, renew: bool, values: dict[str, Any]) -> Any:
        reservation_id = None
        if reserve:
            tx.cursor.execute(self.reservation_renew if renew else self.reservation_insert, values)
            reservation_id = int(tx.cursor.fetchone()[0])
        tx.cursor.execute(self.decision_insert, {**values, "reservation_id": reservation_id})
        return reservation_id


class _PostgresBackend(_Backend):
    """Two round trips a decision: optimistic first (see _Transaction), else BEGIN, the lock
    and the snapshot; the writes and COMMIT.

    The snapshot and the writes are prepared on the server once per connection (``PREPARE``)
    and run as ``EXECUTE`` with their values bound on the client, so that each round trip is
    one simple query of several statements, with nothing to plan.
    """

    aggregate = (
        "json_agg(json_build_array(h.reserved_at, h.channel, h.category, h.journey_key, h.id))"
    )
    trait = "(p.traits ->> :trait)"
    optimistic = True

    def __init__(self, url: str) -> None:
        import psycopg

        self._client_cursor: Any = psycopg.ClientCursor
        self._failed = psycopg.OperationalError
        self._integrity = psycopg.IntegrityError
        super().__init__()
        # Connections of its own, in autocommit, so BEGIN travels with the snapshot and
        # COMMIT with the write; not pinged when taken, one round trip less (a dead one is
        # retried instead).
        self.connections = _Connections(
            lambda: psycopg.connect(_libpq_url(url), autocommit=True), self._prepare_connection
        )
        self._prepares: list[str] = []
        snapshot = self._server_prepared("hilo_policy_snapshot", self.snapshot_source)
        # The lock is a statement of its own: the snapshot, the statement after it, sees what
        # the previous holder committed (READ COMMITTED takes a snapshot per statement).
        self.locked_snapshot = (
            "BEGIN ISOLATION LEVEL READ COMMITTED; "
            f"SELECT pg_advisory_xact_lock(%(lock)s); {snapshot}"
        )
        self.unlocked_snapshot = f"BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY; {snapshot}"
        self.decision_insert = self._server_prepared("hilo_policy_decision", _DECISION_INSERT)
        self.allow_insert = self._server_prepared(
            "hilo_policy_allow", _ALLOW_WITH.format(reservation=_RESERVATION_INSERT)
        )
        self.allow_renew = self._server_prepared(
            "hilo_policy_allow_again", _ALLOW_WITH.format(reservation=_RESERVATION_RENEW)
        )
        self.checked_allow_insert = self._server_prepared(
            "hilo_policy_allow_checked",
            _CHECKED_ALLOW.format(reservation=_CHECKED_RESERVATION_INSERT),
        )
        self.checked_allow_renew = self._server_prepared(
            "hilo_policy_allow_again_checked",
            _CHECKED_ALLOW.format(reservation=_CHECKED_RESERVATION_RENEW),
        )
        self.lone_snapshot = snapshot

    def prepare(self, sql: str) -> str:
        return pyformat(sql)

    def _server_prepared(self, name: str, sql: str) -> str:
        """Record ``PREPARE name`` for ``sql``; the ``EXECUTE`` that runs it, with psycopg's
        placeholders for its values."""
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        body = NAMED_PARAMETER.sub(number, sql)
        types = ", ".join(_PARAMETER_TYPES[parameter] for parameter in names)
        self._prepares.append(f"PREPARE {name} ({types}) AS {body}")
        return f"EXECUTE {name} ({', '.join(f'%({parameter})s' for parameter in names)})"

    def _prepare_connection(self, connection: Any) -> None:
        for statement in self._prepares:
            connection.execute(statement)

    @contextmanager
    def transaction(
        self, lock_key: int, params: Mapping[str, Any], commit: bool, optimistic: bool = False
    ) -> Iterator[_Transaction]:
        # A preview only reads: no lock, nobody waits for it. An optimistic decision reads
        # its snapshot alone, in one statement outside any transaction.
        if optimistic:
            sql = self.lone_snapshot
        else:
            sql = self.locked_snapshot if commit else self.unlocked_snapshot
        values = {**params, "lock": lock_key}
        proxied, cursor = self._begin(sql, values)
        try:
            while cursor.nextset():  # to the last statement's result: the snapshot
                pass
            tx = _Transaction(cursor, cursor.fetchone(), optimistic, values)
            yield tx
            if not tx.committed and not optimistic:  # nothing written: end the transaction
                cursor.execute("ROLLBACK")
        except BaseException:
            self._abandon(proxied, cursor)
            raise
        finally:
            cursor.close()
            proxied.close()

    def _begin(self, sql: str, values: Mapping[str, Any]) -> tuple[Any, Any]:
        """A pooled connection and its cursor, ``sql`` run; a connection found dead in the
        pool is replaced once."""
        for attempt in range(2):
            proxied = self.connections.take()
            connection: Any = proxied.driver_connection
            cursor = self._client_cursor(connection)
            try:
                cursor.execute(sql, values)
            except self._failed:
                if attempt or not connection.broken:
                    self._abandon(proxied, cursor)
                    cursor.close()
                    proxied.close()
                    raise
                cursor.close()
                proxied.invalidate()
                continue
            except BaseException:
                self._abandon(proxied, cursor)
                cursor.close()
                proxied.close()
                raise
            return proxied, cursor
        raise AssertionError("unreachable")

    def _abandon(self, proxied: Any, cursor: Any) -> None:
        """Roll back what the connection began; a broken connection leaves the pool."""
        try:
            cursor.execute("ROLLBACK")
        except self._failed:
            proxied.invalidate()

    def write(self, tx: _Transaction, reserve: bool, renew: bool, values: dict[str, Any]) -> Any:
        if tx.optimistic:
            return self._write_checked(tx, reserve, renew, values)
        if reserve:
            sql = self.allow_renew if renew else self.allow_insert
        else:
            sql, values = self.decision_insert, {**values, "reservation_id": None}
        tx.cursor.execute(f"{sql}; COMMIT", values)
        tx.committed = True
        return tx.cursor.fetchone()[0] if reserve else None

    def _write_checked(
        self, tx: _Transaction, reserve: bool, renew: bool, values: dict[str, Any]
    ) -> Any:
        """An optimistic decision's write. A SKIP or a DEFER holds nothing back from anyone:
        stored as it is, one statement, no lock. An ALLOW takes the customer's lock and is
        written only if its snapshot still stands; otherwise :class:`_Stale`."""
        cursor = tx.cursor
        if not reserve:
            cursor.execute(self.decision_insert, {**values, "reservation_id": None})
            tx.committed = True
            return None
        sql = self.checked_allow_renew if renew else self.checked_allow_insert
        checked = {
            **values,
            "lock": tx.params["lock"],
            "since": tx.params["since"],
            "seen_count": tx.fingerprint[0],
            "seen_sum": tx.fingerprint[1],
        }
        try:
            cursor.execute(f"BEGIN; SELECT pg_advisory_xact_lock(%(lock)s); {sql}; COMMIT", checked)
        except self._integrity as error:  # the same message decided at the same moment
            cursor.execute("ROLLBACK")
            raise _Stale(str(error)) from error
        row = None
        while True:  # past BEGIN's and the lock's results, to the ALLOW's
            described = cursor.description
            if described is not None and described[0].name == "reservation_id":
                row = cursor.fetchone()
                break
            if not cursor.nextset():
                break
        if row is None:
            raise _Stale("the customer's reservations or the policy changed")
        tx.committed = True
        return row[0]

    def close(self) -> None:
        self.connections.close()


def _libpq_url(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://...``) as libpq reads it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class _Pooled:
    """A connection taken from :class:`_Connections`: ``close`` gives it back, ``invalidate``
    discards it."""

    __slots__ = ("driver_connection", "_pool")

    def __init__(self, connection: Any, pool: _Connections) -> None:
        self.driver_connection = connection
        self._pool: _Connections | None = pool

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:  # once: after invalidate() it is gone already
            pool.give_back(self.driver_connection)

    def invalidate(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.discard(self.driver_connection)


class _Connections:
    """The decisions' PostgreSQL connections: at most ``size`` open, the most recently used
    taken first.

    A decision needs a bare driver connection for two round trips; SQLAlchemy's pool cost
    about a tenth of a decision's CPU for events, resets and bookkeeping it did not need.
    """

    def __init__(
        self, connect: Callable[[], Any], prepare: Callable[[Any], None], size: int = 20
    ) -> None:
        self._connect = connect
        self._prepare = prepare
        self._idle: list[Any] = []
        self._guard = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._closed = False

    def take(self) -> _Pooled:
        self._slots.acquire()
        try:
            with self._guard:
                connection = self._idle.pop() if self._idle else None
            if connection is None:
                connection = self._connect()
                self._prepare(connection)
        except BaseException:
            self._slots.release()
            raise
        return _Pooled(connection, self)

    def give_back(self, connection: Any) -> None:
        if connection.broken or connection.closed or self._closed:
            connection.close()
        else:
            with self._guard:
                self._idle.append(connection)
        self._slots.release()

    def discard(self, connection: Any) -> None:
        connection.close()
        self._slots.release()

    def close(self) -> None:
        with self._guard:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


@dataclass(frozen=True)
class _Plan:
    """What a policy says for one kind of send (channel, category, journey), worked out once."""

    scopes: list[_Scope]
    timings: list[_Timing]
    horizon: timedelta | None  # how far back any cap or gap can look, in any time zone

    @classmethod
    def of(cls, policy: ContactPolicy, intent: SendIntent) -> _Plan:
        scopes = _scopes(policy, intent)
        horizons: list[timedelta] = []
        for scope in scopes:
            if scope.rules.min_gap is not None:
                horizons.append(scope.rules.min_gap)
            for cap in scope.rules.caps:
                rolling = cap.rolling
                # A local day or week started at most this long ago, in any zone.
                horizons.append(
                    rolling
                    if rolling is not None
                    else timedelta(days=2 if cap.window == "calendar_day" else 8)
                )
        horizon = max(horizons) + timedelta(seconds=1) if horizons else None
        return cls(scopes, _timings(scopes), horizon)

    def since(self, now: datetime) -> datetime | None:
        return None if self.horizon is None else now - self.horizon


class ContactPolicyService:
    """Decides every send under the current contact policy; stores every answer."""

    def __init__(
        self,
        store: Store,
        engagement_weights: Mapping[str, float] | None = None,
        min_engagement_samples: int = MIN_ENGAGEMENT_SAMPLES,
    ) -> None:
        self.store = store
        self.consent_defaults: dict[str, bool] = dict(CONSENT_DEFAULTS)
        self.address_traits: dict[str, str] = dict(ADDRESS_TRAITS)
        # Channels nothing may reach without an explicit opt-in, transactional or not.
        self.opt_in_channels = frozenset(
            channel for channel, default in CONSENT_DEFAULTS.items() if not default
        )
        self.engagement_weights = dict(engagement_weights or ENGAGEMENT_WEIGHTS)
        self.min_engagement_samples = min_engagement_samples
        dialect = store.engine.dialect.name
        self._backend: _Backend
        if dialect == "sqlite":
            self._backend = _SQLiteBackend(store)
        elif dialect == "postgresql":
            self._backend = _PostgresBackend(store.url)
        else:
            raise ValueError(f"the contact policy supports SQLite and PostgreSQL, not {dialect}")
        self._policy: tuple[int, ContactPolicy] = (0, ContactPolicy())
        self._plans: dict[tuple[int, str, str, str], _Plan] = {}

    def close(self) -> None:
        """Give back the connections of the decision path (PostgreSQL keeps its own pool)."""
        self._backend.close()

    # ------------------------------------------------------------ the policy document

    def _plan(self, version: int, policy: ContactPolicy, intent: SendIntent) -> _Plan:
        key = (version, intent.channel, intent.category, intent.journey_key)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 10_000:
                self._plans.clear()
            plan = self._plans[key] = _Plan.of(policy, intent)
        return plan

    def _policy_version(self, cursor: Any, version: int) -> ContactPolicy:
        cached_version, cached = self._policy
        if cached_version == version:
            return cached
        if version == 0:
            policy = ContactPolicy()
        else:
            cursor.execute(self._backend.policy_sql, {"version": version})
            policy = ContactPolicy.model_validate(self._backend.json(cursor.fetchone()[0]))
        self._policy = (version, policy)
        return policy

    def get_policy(self) -> CurrentPolicy:
        """The policy in force and its version (0 and the defaults when never set)."""
        with self.store.session() as session:
            row = session.exec(
                select(ContactPolicyVersion)
                .order_by(col(ContactPolicyVersion.version).desc())
                .limit(1)
            ).first()
        if row is None:
            return CurrentPolicy(version=0, policy=ContactPolicy())
        return CurrentPolicy(
            version=row.version,
            policy=ContactPolicy.model_validate(row.document),
            actor=row.actor,
            note=row.note,
            created_at=as_utc(row.created_at),
        )

    def set_policy(
        self,
        document: Mapping[str, Any] | ContactPolicy,
        actor: str,
        note: str | None = None,
    ) -> ContactPolicyVersion:
        """Replace the policy; the new version records who, when, why and what changed."""
        policy = parse_policy(document)
        if not actor or not actor.strip():
            raise PolicyInvalid(
                [PolicyProblem(field="actor", problem="say who changes the policy, e.g. 'ana'")]
            )
        for _attempt in range(5):
            current = self.get_policy()
            changes = _diff(current.policy.document(), policy.document())
            row = ContactPolicyVersion(
                version=current.version + 1,
                document=policy.document(),
                actor=actor.strip()[:200],
                note=note[:1000] if note else None,
                changes=changes,
                summary=_summary(changes)[:2000],
            )
            with self.store.session() as session:
                session.add(row)
                try:
                    session.commit()
                except IntegrityError:
                    session.rollback()  # another change took this number: diff against it
                    continue
                return row
        raise RuntimeError("the contact policy is changing too fast to record a new version")

    def history(self, limit: int = 100) -> list[ContactPolicyVersion]:
        """Every version, newest first."""
        with self.store.session() as session:
            return list(
                session.exec(
                    select(ContactPolicyVersion)
                    .order_by(col(ContactPolicyVersion.version).desc())
                    .limit(limit)
                )
            )

    # ------------------------------------------------------------ decisions

    def decide(self, intent: SendIntent, now: datetime) -> PolicyDecision:
        """ALLOW (with a reservation), DEFER until a time, or SKIP; stored, atomic, idempotent."""
        return self._decide(intent, as_utc(now), persist=True)

    def preview(self, intent: SendIntent, now: datetime) -> PolicyDecision:
        """What :meth:`decide` would answer, without reserving or storing anything."""
        return self._decide(intent, as_utc(now), persist=False)

    def _decide(self, intent: SendIntent, now: datetime, persist: bool) -> PolicyDecision:
        if persist and self._backend.optimistic:
            # First without the customer's lock: a SKIP or DEFER never needs it, and an ALLOW
            # checks at its write that its snapshot still stands. So one customer's decisions
            # wait for each other only when they would ALLOW at the same moment.
            try:
                return self._decide_once(intent, now, persist, optimistic=True)
            except _Stale:
                pass
        return self._decide_once(intent, now, persist, optimistic=False)

    def _decide_once(
        self, intent: SendIntent, now: datetime, persist: bool, optimistic: bool
    ) -> PolicyDecision:
        backend = self._backend
        address = _normalise_address(intent.channel, intent.address)
        trait = self.address_traits.get(intent.channel)
        cached_version, cached_policy = self._policy
        since = self._plan(cached_version, cached_policy, intent).since(now)
        params = {
            "customer": intent.customer_id,
            "message": intent.message_id,
            "channel": intent.channel,
            "address": address,
            "trait": trait,
            "since": backend.when(since),
            "waiting_since": backend.when(now - WAITING_GRACE),
        }
        lock_key = _lock_key(intent.customer_id)
        with backend.transaction(lock_key, params, persist, optimistic) as tx:
            cursor = tx.cursor
            snapshot = self._snapshot(tx.snapshot)
            tx.fingerprint = snapshot.fingerprint
            replay = self._replay(intent, snapshot)
            if replay is not None:
                return replay
            version = snapshot.policy_version
            policy = self._policy_version(cursor, version)
            history = snapshot.history
            plan = self._plan(version, policy, intent)
            if version != cached_version:
                if optimistic:  # the snapshot's history is the old plan's: decide locked
                    raise _Stale("the policy changed")
                history = self._history(cursor, intent, plan.since(now))
            zone = (
                _zone_or_none(intent.timezone)
                or _zone_or_none(snapshot.profile_timezone)
                or ZoneInfo(policy.default_timezone)
            )
            if address is None and trait:
                found = snapshot.traits.get(trait)
                address = _normalise_address(intent.channel, str(found) if found else None)
            suppressed = None
            if address is not None and address == snapshot.suppression_address:
                suppressed = snapshot.suppressed_because
            elif address is not None:  # the snapshot looked up another spelling: ask again
                cursor.execute(
                    backend.suppressed_sql, {"channel": intent.channel, "address": address}
                )
                found_row = cursor.fetchone()
                suppressed = found_row[0] if found_row else None
            priority = self._priority(policy, intent)
            verdict = self._evaluate(
                cursor,
                intent,
                now,
                policy,
                plan,
                zone,
                history,
                consent=snapshot.consent,
                preferences=snapshot.traits.get(PREFERENCES_TRAIT),
                suppressed=suppressed,
                address=address,
                priority=priority,
                waiting_priority=snapshot.waiting_priority,
            )
            reservation_id: int | None = None
            if persist:
                reservation_id = backend.write(
                    tx,
                    reserve=verdict.outcome == "allow",
                    renew=snapshot.reservation_row is not None,
                    values={
                        "message_id": intent.message_id,
                        "customer_id": intent.customer_id,
                        "journey_key": intent.journey_key,
                        "channel": intent.channel,
                        "category": intent.category,
                        "priority": priority,
                        "counted": verdict.counted,
                        "decision": verdict.outcome,
                        "reason": verdict.reason[:500],
                        "rule": verdict.rule,
                        "defer_until": backend.when(verdict.defer_until),
                        "policy_version": version,
                        "timezone": zone.key,
                        "decided_at": backend.when(now),
                    },
                )
            return PolicyDecision(
                message_id=intent.message_id,
                outcome=verdict.outcome,
                reason=verdict.reason,
                rule=verdict.rule,
                defer_until=verdict.defer_until,
                reservation_id=reservation_id,
                decided_at=now,
                policy_version=version,
                timezone=zone.key,
            )

    def _snapshot(self, row: Sequence[Any]) -> _Snapshot:
        backend = self._backend
        counted = backend.json(row[15]) or ()
        history = [
            _Sent(as_utc(datetime.fromisoformat(at)), channel, category, journey_key)
            for at, channel, category, journey_key, _id in counted
        ]
        return _Snapshot(
            policy_version=row[0] or 0,
            consent=backend.json(row[1]) or {},
            profile_timezone=row[2],
            traits=backend.json(row[3]) or {},
            decision=row[4],
            reason=row[5],
            rule=row[6],
            reservation_id=row[7],
            decided_at=backend.moment(row[8]),
            decided_version=row[9],
            decided_timezone=row[10],
            reservation_row=row[11],
            reservation_status=row[12],
            suppression_address=row[13],
            suppressed_because=row[14],
            history=history,
            fingerprint=(len(counted), sum(int(entry[4]) for entry in counted)),
            waiting_priority=row[16],
        )

    def _history(self, cursor: Any, intent: SendIntent, since: datetime | None) -> list[_Sent]:
        if since is None:
            return []
        backend = self._backend
        cursor.execute(
            backend.history_sql, {"customer": intent.customer_id, "since": backend.when(since)}
        )
        return [
            _Sent(as_utc(backend.moment(at) or since), channel, category, journey_key)
            for at, channel, category, journey_key in cursor.fetchall()
        ]

    def _replay(self, intent: SendIntent, snapshot: _Snapshot) -> PolicyDecision | None:
        """The stored answer when it still stands: an ALLOW whose slot is held, or a SKIP."""
        held = snapshot.decision == "allow" and snapshot.reservation_status in ("reserved", "used")
        if not held and snapshot.decision != "skip":
            return None
        assert snapshot.decided_at is not None
        return PolicyDecision(
            message_id=intent.message_id,
            outcome="allow" if held else "skip",
            reason=snapshot.reason or "",
            rule=snapshot.rule,
            reservation_id=snapshot.reservation_id,
            decided_at=snapshot.decided_at,
            policy_version=snapshot.decided_version or 0,
            timezone=snapshot.decided_timezone,
            replayed=True,
        )

    @staticmethod
    def _priority(policy: ContactPolicy, intent: SendIntent) -> int:
        if intent.priority is not None:
            return intent.priority
        rules = policy.journeys.get(intent.journey_key)
        return rules.priority if rules is not None else 0

    def _evaluate(
        self,
        cursor: Any,
        intent: SendIntent,
        now: datetime,
        policy: ContactPolicy,
        plan: _Plan,
        zone: ZoneInfo,
        history: Sequence[_Sent],
        consent: Mapping[str, Any],
        preferences: Any,
        suppressed: str | None,
        address: str | None,
        priority: int,
        waiting_priority: int | None,
    ) -> _Verdict:
        channel, category = intent.channel, intent.category
        if channel in self.consent_defaults:
            needed = category != TRANSACTIONAL or channel in self.opt_in_channels
            if needed and consent.get(channel, self.consent_defaults[channel]) is not True:
                return _Verdict("skip", f"no consent: {channel}", "consent")
        if suppressed is not None:
            return _Verdict(
                "skip", f"suppressed: {address} on {channel} ({suppressed})", "suppressions"
            )
        topic = intent.topic
        if topic is not None and category != TRANSACTIONAL and left_topic(preferences, topic):
            return _Verdict("skip", f"left topic: {topic}", "preferences.topics")
        if channel == PREFERENCE_CHANNEL and category != TRANSACTIONAL:
            chosen = self._customer_choice(cursor, intent, now, zone, preferences)
            if chosen is not None:
                return chosen
        exempt = category in policy.exempt_categories
        if intent.ignore_policy:
            return _Verdict(
                "allow",
                "the step ignores the contact policy (consent, suppressions and the "
                "customer's own pause and frequency still apply)",
                "ignore_policy",
                counted=not exempt,
            )
        if exempt:
            return _Verdict(
                "allow",
                f"{category} messages are exempt from caps, gaps, quiet hours and priority",
                "exempt_categories",
                counted=False,
            )
        scopes = plan.scopes
        # Timing: the earliest moment every gap, quiet window and day list allows.
        at, rule, reason = now, None, ""
        for scope in scopes:
            gap = scope.rules.min_gap
            if gap is None:
                continue
            last = max(
                (s.at for s in history if scope.counts(s.channel, s.category, s.journey_key)),
                default=None,
            )
            if last is not None and last + gap > at:
                at, rule = last + gap, f"{scope.path}.min_gap"
                reason = (
                    f"min gap {format_duration(gap)} between {scope.label()}: "
                    f"the last went out {_local_label(last, zone)}"
                )
        timings = plan.timings
        blocking = [timing for timing in timings if timing.blocks(at, zone)]
        if blocking:
            opening = _next_allowed(at, zone, timings)
            if opening is None:
                return _Verdict(
                    "skip",
                    "the quiet hours and allowed days together leave no time to send",
                    blocking[0].path,
                )
            described = blocking[0].describe(zone)
            reason = f"{reason}; then {described}" if reason else described
            at, rule = opening, blocking[0].path
        # Caps, counted at the moment the send could go out.
        for scope in scopes:
            for index, cap in enumerate(scope.rules.caps):
                full = self._cap_full(cap, scope, intent, history, at, zone)
                if full is not None:
                    counted, frees = full
                    return _Verdict(
                        "skip",
                        f"cap reached: {counted} {scope.label()} of {cap.describe()}"
                        f" ({zone.key}); a slot frees {_local_label(frees, zone)}",
                        f"{scope.path}.caps[{index}]",
                    )
        if at > now:
            return _Verdict(
                "defer", f"{reason}: wait until {_local_label(at, zone)}", rule, defer_until=at
            )
        if waiting_priority is None or waiting_priority <= priority:
            return _Verdict("allow", "within the contact policy")  # nobody of higher rank waits
        competitor = self._higher_priority_waiting(
            cursor, intent, now, zone, scopes, history, priority
        )
        if competitor is not None:
            return competitor
        return _Verdict("allow", "within the contact policy")

    def _customer_choice(
        self,
        cursor: Any,
        intent: SendIntent,
        now: datetime,
        zone: ZoneInfo,
        preferences: Any,
    ) -> _Verdict | None:
        """What the customer chose on the preference page: a pause, or less often.

        Like consent, these are the customer's word, not the brand's rules: no step's
        ``ignore_policy`` and no exempt category overrides them (transactional mail aside).
        A journey message is skipped, not deferred: it would be stale weeks later.
        """
        if not isinstance(preferences, Mapping):
            return None
        pause_until = _moment_or_none(preferences.get("pause_until"))
        if pause_until is not None and pause_until > now:
            return _Verdict(
                "skip",
                f"paused by the customer until {_local_label(pause_until, zone)}",
                "preferences.pause",
            )
        frequency = preferences.get("frequency")
        days = FREQUENCY_SPACING_DAYS.get(frequency) if isinstance(frequency, str) else None
        if days is None:
            return None
        backend = self._backend
        cursor.execute(
            backend.last_marketing_sql,
            {
                "customer": intent.customer_id,
                "channel": intent.channel,
                "since": backend.when(now - timedelta(days=days)),
            },
        )
        row = cursor.fetchone()
        last = backend.moment(row[0]) if row else None
        if last is None:
            return None
        following = last + timedelta(days=days)
        return _Verdict(
            "skip",
            f"the customer chose {frequency} {intent.channel}: the last went out "
            f"{_local_label(last, zone)}, the next may from {_local_label(following, zone)}",
            "preferences.frequency",
        )

    @staticmethod
    def _cap_full(
        cap: Cap,
        scope: _Scope,
        intent: SendIntent,
        history: Sequence[_Sent],
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
        start, end = _period(cap.window, at, zone)
        inside = [moment for moment in in_scope if start <= moment < end]
        if len(inside) < cap.count:
            return None
        return len(inside), end

    def _higher_priority_waiting(
        self,
        cursor: Any,
        intent: SendIntent,
        now: datetime,
        zone: ZoneInfo,
        scopes: Sequence[_Scope],
        history: Sequence[_Sent],
        priority: int,
    ) -> _Verdict | None:
        """SKIP when this send would take the last slot a higher-priority journey waits for."""
        last_slots: list[tuple[_Scope, int, Cap, datetime]] = []
        for scope in scopes:
            for index, cap in enumerate(scope.rules.caps):
                counted = [
                    s.at for s in history if scope.counts(s.channel, s.category, s.journey_key)
                ]
                rolling = cap.rolling
                if rolling is not None:
                    used = sum(1 for moment in counted if moment > now - rolling)
                    window_end = now + rolling
                else:
                    start, window_end = _period(cap.window, now, zone)
                    used = sum(1 for moment in counted if start <= moment < window_end)
                if used == cap.count - 1:
                    last_slots.append((scope, index, cap, window_end))
        if not last_slots:
            return None
        high = max(end for *_rest, end in last_slots)
        backend = self._backend
        cursor.execute(
            backend.waiting_sql,
            {
                "customer": intent.customer_id,
                "priority": priority,
                "message": intent.message_id,
                "low": backend.when(now - WAITING_GRACE),
                "high": backend.when(high),
            },
        )
        for journey_key, channel, category, their_priority, due in cursor.fetchall():
            due_at = backend.moment(due)
            if journey_key == intent.journey_key or due_at is None:
                continue
            for scope, index, cap, window_end in last_slots:
                if due_at < window_end and scope.counts(channel, category, journey_key):
                    return _Verdict(
                        "skip",
                        f"lower priority: journey {journey_key} (priority {their_priority} > "
                        f"{priority}) is due {_local_label(due_at, zone)} for the last slot of "
                        f"{scope.path} cap {cap.describe()}",
                        f"{scope.path}.caps[{index}]",
                    )
        return None

    # ------------------------------------------------------------ reservations

    def used_statement(self, message_id: str) -> tuple[str, dict[str, Any]]:
        """:meth:`mark_used` as SQL with ``:name`` parameters, and their values, for the
        caller's own transaction (the send runs it with the ledger update on the driver's
        connection, saving a commit a message)."""
        return _MARK_USED_SQL, {"message_id": message_id, "now": utcnow()}

    def mark_used(self, message_id: str) -> bool:
        """The provider took the message: its slot stays counted. False if not reserved."""
        return self._set_status(message_id, ("reserved", "used"), status="used")

    def release(self, message_id: str, reason: str) -> bool:
        """The send failed for good: free its slot. False when nothing was reserved."""
        return self._set_status(
            message_id, ("reserved",), status="released", release_reason=reason[:500]
        )

    def _set_status(self, message_id: str, current: tuple[str, ...], **values: Any) -> bool:
        with self.store.session() as session:
            result = session.exec(
                update(ContactReservation)
                .where(
                    col(ContactReservation.message_id) == message_id,
                    col(ContactReservation.status).in_(current),
                )
                .values(updated_at=utcnow(), **values)
            )
            session.commit()
            return bool(result.rowcount)

    def reservation(self, message_id: str) -> ContactReservation | None:
        with self.store.session() as session:
            return session.exec(
                select(ContactReservation).where(ContactReservation.message_id == message_id)
            ).first()

    def decisions(
        self, customer_id: str | None = None, message_id: str | None = None, limit: int = 100
    ) -> list[PolicyDecisionRecord]:
        """Stored decisions, newest first."""
        with self.store.session() as session:
            query = select(PolicyDecisionRecord)
            if customer_id is not None:
                query = query.where(PolicyDecisionRecord.customer_id == customer_id)
            if message_id is not None:
                query = query.where(PolicyDecisionRecord.message_id == message_id)
            rows = session.exec(query.order_by(col(PolicyDecisionRecord.id).desc()).limit(limit))
            return list(rows)

    # ------------------------------------------------------------ suppressions

    def suppress(self, channel: str, address: str, reason: str, source: str) -> Suppression:
        """Stop every send to ``address`` on ``channel``; the first record of it is kept."""
        cleaned = _normalise_address(channel, address)
        if cleaned is None:
            raise ValueError("address: give the address to suppress, e.g. ana@example.com")
        with self.store.session() as session:
            row = Suppression(
                channel=channel, address=cleaned, reason=reason[:500], source=source[:100]
            )
            session.add(row)
            try:
                session.commit()
                return row
            except IntegrityError:
                session.rollback()
            stored = session.exec(
                select(Suppression).where(
                    Suppression.channel == channel, Suppression.address == cleaned
                )
            ).one()
            return stored

    def unsuppress(self, channel: str, address: str) -> bool:
        cleaned = _normalise_address(channel, address)
        with self.store.session() as session:
            row = session.exec(
                select(Suppression).where(
                    Suppression.channel == channel, Suppression.address == cleaned
                )
            ).first()
            if row is None:
                return False
            session.delete(row)
            session.commit()
            return True

    def suppressions(
        self, channel: str | None = None, address: str | None = None, limit: int = 100
    ) -> list[Suppression]:
        with self.store.session() as session:
            query = select(Suppression)
            if channel is not None:
                query = query.where(Suppression.channel == channel)
            if address is not None:
                cleaned = _normalise_address(channel or "", address)
                query = query.where(Suppression.address == cleaned)
            return list(session.exec(query.order_by(col(Suppression.id).desc()).limit(limit)))

    # ------------------------------------------------------------ Envío Inteligente

    def best_send_time(
        self,
        customer_id: str,
        now: datetime,
        fallback_hour: int = 10,
        max_delay: timedelta = timedelta(hours=24),
        timezone: str | None = None,
        message_id: str | None = None,
    ) -> BestTime:
        """The customer's best hour within ``max_delay``, learned from their engagement.

        Candidates are the starts of the local hours from now to ``now + max_delay`` that the
        global quiet hours and allowed days permit (the current hour counts as now). Each
        scores its engagement in the same hour of the week, plus a seventh of its engagement
        in the same hour on any day; the highest wins, the earliest on a tie. With fewer than
        ``min_engagement_samples`` events, or none in reach, the fallback hour is used (now
        when it is out of reach). The choice and its reason are stored.
        """
        if not 0 <= fallback_hour <= 23:
            raise ValueError(f"fallback_hour: {fallback_hour} is not an hour; use 0-23")
        if max_delay < timedelta(0):
            raise ValueError("max_delay: must not be negative, e.g. timedelta(hours=24)")
        now = as_utc(now)
        policy = self.get_policy().policy
        profile = self.store.get_profile(customer_id)
        zone = (
            _zone_or_none(timezone)
            or _zone_or_none(profile.timezone if profile else None)
            or ZoneInfo(policy.default_timezone)
        )
        by_week: dict[int, float] = defaultdict(float)
        by_day: dict[int, float] = defaultdict(float)
        samples = 0
        for moment, name in self._engagement(customer_id, now):
            local = as_utc(moment).astimezone(zone)
            weight = self.engagement_weights[name]
            by_week[local.weekday() * 24 + local.hour] += weight
            by_day[local.hour] += weight
            samples += 1
        timings = [
            _Timing(
                "global",
                policy.global_.quiet_hours,
                frozenset(policy.global_.allowed_days) if policy.global_.allowed_days else None,
            )
        ]
        candidates = [
            moment
            for moment in _hour_starts(now, now + max_delay, zone)
            if not timings[0].blocks(moment, zone)
        ] or [now]

        def hour_of(moment: datetime) -> int:
            local = moment.astimezone(zone)
            return local.weekday() * 24 + local.hour

        def score(moment: datetime) -> float:
            how = hour_of(moment)
            return by_week[how] + by_day[how % 24] / 7

        chosen: datetime | None = None
        reason = ""
        if samples >= self.min_engagement_samples:
            week_score = [by_week[how] + by_day[how % 24] / 7 for how in range(168)]
            best_how = max(range(168), key=lambda how: (week_score[how], -how))
            scored = [(score(moment), moment) for moment in candidates]
            top = max(value for value, _ in scored)
            if top > 0:
                chosen = next(moment for value, moment in scored if value == top)
                window = f"{samples} engagement events in {ENGAGEMENT_LOOKBACK.days} days"
                if top >= week_score[best_how]:
                    reason = (
                        f"learned: {_hour_label(hour_of(chosen))} is their best hour ({window})"
                    )
                else:
                    reason = (
                        f"learned best hour {_hour_label(best_how)} is beyond the maximum delay "
                        f"of {format_duration(max_delay)}; best in reach "
                        f"{_hour_label(hour_of(chosen))} ({window})"
                    )
            else:
                reason = (
                    f"learned best hour {_hour_label(best_how)} is beyond the maximum delay of "
                    f"{format_duration(max_delay)} and nothing in reach has engagement; "
                )
        else:
            reason = (
                f"too little engagement to learn from ({samples} events, "
                f"{self.min_engagement_samples} needed); "
            )
        fallback = chosen is None
        if chosen is None:
            in_reach = [m for m in candidates if m.astimezone(zone).hour == fallback_hour]
            if in_reach:
                chosen = in_reach[0]
                reason += f"fallback hour {fallback_hour:02d}:00 ({zone.key})"
            else:
                chosen = candidates[0]
                reason += (
                    f"fallback hour {fallback_hour:02d}:00 is not within "
                    f"{format_duration(max_delay)}: send at the first allowed moment"
                )
        result = BestTime(
            at=chosen,
            hour_of_week=hour_of(chosen),
            reason=reason,
            samples=samples,
            timezone=zone.key,
            fallback=fallback,
        )
        with self.store.session() as session:
            session.add(
                SendTimeChoice(
                    customer_id=customer_id,
                    message_id=message_id,
                    chosen_at=result.at,
                    hour_of_week=result.hour_of_week,
                    timezone=result.timezone,
                    reason=result.reason[:500],
                    samples=samples,
                    fallback=fallback,
                    decided_at=now,
                )
            )
            session.commit()
        return result

    def _engagement(self, customer_id: str, now: datetime) -> list[tuple[datetime, str]]:
        from hilo.db.models import StoredEvent

        with self.store.session() as session:
            rows = session.exec(
                select(StoredEvent.timestamp, StoredEvent.name)
                .where(
                    StoredEvent.customer_id == customer_id,
                    col(StoredEvent.name).in_(sorted(self.engagement_weights)),
                    col(StoredEvent.timestamp) >= now - ENGAGEMENT_LOOKBACK,
                    col(StoredEvent.timestamp) <= now,
                )
                .order_by(col(StoredEvent.timestamp).desc())
                .limit(5000)
            )
            return [(moment, name) for moment, name in rows]


def _hour_starts(start: datetime, end: datetime, zone: ZoneInfo) -> Iterator[datetime]:
    """``start`` itself, then the start of every later local hour up to ``end``."""
    local = start.astimezone(zone)
    hour = local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
    yield start
    moment = hour + timedelta(hours=1)
    while moment <= end:
        yield moment
        moment += timedelta(hours=1)


# ================================================================ audit


def _flatten(document: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf values by dotted path; an empty mapping has no leaves."""
    if isinstance(document, dict):
        flat: dict[str, Any] = {}
        for key, value in document.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: document}


def _diff(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """What changed, path by path (lists compare whole)."""
    old, new = _flatten(before), _flatten(after)
    changes = []
    for path in sorted(old.keys() | new.keys()):
        if old.get(path) != new.get(path):
            changes.append({"path": path, "before": old.get(path), "after": new.get(path)})
    return changes


def _summary(changes: list[dict[str, Any]]) -> str:
    if not changes:
        return "no change"
    return "; ".join(f"{c['path']}: {c['before']!r} -> {c['after']!r}" for c in changes)
