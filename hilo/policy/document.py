"""The contact policy as a brand writes it: one versioned document of scoped rules (caps,
minimum gaps, quiet hours, allowed days, priority), validated with problems that name the
field; and the questions and answers of a decision (:class:`SendIntent`,
:class:`PolicyDecision`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hilo.errors import InvalidInput
from hilo.journeys.definitions import CHANNELS, JOURNEY_KEY, WEEKDAYS
from hilo.journeys.durations import Duration, parse_duration

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
        if zone_or_none(value) is None:
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
        if value is not None and zone_or_none(value) is None:
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


def zone_or_none(name: str | None) -> ZoneInfo | None:
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None
