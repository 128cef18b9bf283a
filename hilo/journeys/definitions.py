"""The journey grammar: what a brand can say, validated before it ever runs.

A definition is data (YAML or JSON) checked by pydantic and then by :func:`check_journey`,
which finds what a schema cannot (duplicate step ids, unreachable steps, templates that do
not render). Every problem is a :class:`JourneyProblem` naming the step path, e.g.
``steps[2] (push_reminder).title``, and saying what would be right.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from hilo.errors import InvalidInput
from hilo.journeys.conditions import Condition, SameValue, same_value
from hilo.journeys.durations import Duration

STEP_ID = r"^[a-z][a-z0-9_]{0,62}$"
JOURNEY_KEY = r"^[a-z][a-z0-9_]{0,62}$"
RESERVED_KEYS = frozenset({"schema", "validate"})
STEP_TYPES = ("send", "wait", "wait_for", "branch", "split", "update_profile", "handoff", "exit")
CHANNELS = ("email", "sms", "whatsapp", "push", "webpush", "webhook", "audience")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_CLOCK = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# ---------------------------------------------------------------- trigger, entry, exit, goal


class Trigger(_Strict):
    """What starts an instance: an event name, an optional filter and an optional key."""

    event: str = Field(min_length=1, examples=["Cart Abandoned"])
    where: Condition | None = Field(
        None, description="Filter on the event, e.g. {path: event.properties.cart_value, ...}"
    )
    key: str | None = Field(
        None,
        pattern=r"^properties\.[A-Za-z0-9_.]+$",
        description="Event property that keys instances, so one customer can have several "
        "(e.g. properties.cart_id).",
        examples=["properties.cart_id"],
    )


class Entry(_Strict):
    """Who may enter, and how often."""

    reentry: Literal["once", "always", "after_cooldown"] = Field(
        "always",
        description="once: a customer enters at most once ever; after_cooldown: again once "
        "'cooldown' has passed since their last instance ended; always: whenever no "
        "instance is running.",
    )
    cooldown: Duration | None = None
    holdout_percent: float = Field(
        0, ge=0, le=100, description="Share of entries kept as a control group: they get no sends."
    )

    @model_validator(mode="after")
    def _cooldown_when_needed(self) -> Entry:
        if self.reentry == "after_cooldown" and self.cooldown is None:
            raise ValueError("reentry 'after_cooldown' needs 'cooldown', e.g. cooldown: 7d")
        if self.reentry != "after_cooldown" and self.cooldown is not None:
            raise ValueError("'cooldown' only applies with reentry: after_cooldown")
        return self


class EventMatch(_Strict):
    """An event a running instance listens for."""

    event: str = Field(min_length=1, examples=["Order Completed"])
    where: Condition | None = None
    match_trigger: list[str] = Field(
        default_factory=list,
        description="Event properties that must equal the trigger's (e.g. [cart_id]).",
    )

    def matches(
        self, event: dict[str, Any], context: dict[str, Any], same: SameValue = same_value
    ) -> bool:
        if event.get("name") != self.event:
            return False
        if self.trigger_mismatch(event, context, same) is not None:
            return False
        return self.where is None or self.where.evaluate({**context, "event": event}, same)

    def trigger_mismatch(
        self, event: dict[str, Any], context: dict[str, Any], same: SameValue = same_value
    ) -> str | None:
        """Why ``event`` is not about the trigger's ``match_trigger`` properties (``cart_id
        c2 ≠ trigger's c1``); None when it is."""
        trigger_props = context.get("trigger", {}).get("properties", {})
        event_props = event.get("properties", {})
        for prop in self.match_trigger:
            theirs = _shown(trigger_props[prop]) if prop in trigger_props else "none"
            if prop not in event_props:
                return f"the event has no {prop} (trigger's {theirs})"
            if not same(event_props[prop], trigger_props.get(prop)):
                return f"{prop} {_shown(event_props[prop])} ≠ trigger's {theirs}"
        return None


def _shown(value: Any) -> str:
    """A property value as an operator reads it: text as it is, anything else (and text
    that spaces or emptiness would hide) as JSON."""
    if isinstance(value, str) and value and value.strip() == value:
        return value
    return json.dumps(value, default=str)


class ExitRule(EventMatch):
    """An event that ends the instance at once, even in the middle of a wait."""

    reason: str | None = Field(None, description="Recorded as the exit reason.")


class Goal(_Strict):
    """The conversion this journey is measured on."""

    event: str = Field(min_length=1, examples=["Order Completed"])
    where: Condition | None = None
    match_trigger: list[str] = Field(default_factory=list)
    within: Duration = Field(
        default=timedelta(days=7), description="Attribution window from entry."
    )
    revenue: str | None = Field(
        None, pattern=r"^properties\.[A-Za-z0-9_.]+$", examples=["properties.total"]
    )

    def as_match(self) -> EventMatch:
        return EventMatch(event=self.event, where=self.where, match_trigger=self.match_trigger)


# ---------------------------------------------------------------- steps


class StepBase(_Strict):
    id: str = Field(
        pattern=STEP_ID,
        description="Unique in the journey; lower_snake_case. Message ids and metrics use it.",
    )
    summary: str | None = Field(None, max_length=200, description="Shown to operators.")


class SendStep(StepBase):
    type: Literal["send"]
    channel: Literal["email", "sms", "whatsapp", "push", "webpush", "webhook", "audience"]
    template: str = Field(min_length=1, description="Template name, e.g. cart_reminder_1.")
    category: Literal["marketing", "transactional"] = "marketing"
    topic: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
        description="A preference-page topic (HILO_PREFERENCE_TOPICS) this message is about: "
        "a customer who left the topic is skipped. Marketing sends only.",
        examples=["promotions"],
    )
    subject: str | None = Field(None, description="Email subject (Liquid).")
    title: str | None = Field(None, description="Push and web push title (Liquid).")
    body: str | None = Field(None, description="Message body (Liquid).")
    audience: str | None = Field(None, description="Ad audience name (channel audience).")
    action: Literal["add", "remove"] | None = Field(
        None,
        description="Channel audience: add the customer (default; needs their consent and an "
        "address not suppressed) or remove them. A journey that exits removes the customer from "
        "the audiences it added them to.",
    )
    url: str | None = Field(
        None,
        description="Channel webhook: where the step posts, signed. Push and web push: the "
        "page the notification opens.",
    )
    on_failure: Literal["continue", "exit"] = "continue"
    on_skip: Literal["continue", "exit"] = Field(
        "continue",
        description="When the contact policy skips this send (no consent, cap reached, "
        "lower priority): go on to the next step, or end the journey.",
    )
    ignore_policy: bool = Field(
        False,
        description="Send outside caps, gaps, quiet hours and priority (never outside "
        "consent or suppressions); the send still counts towards caps.",
    )

    @model_validator(mode="after")
    def _channel_fields(self) -> SendStep:
        required = {
            "email": ("subject", "body"),
            "sms": ("body",),
            "whatsapp": ("body",),
            "push": ("title", "body"),
            "webpush": ("title", "body"),
            "webhook": ("url",),
            "audience": ("audience",),
        }[self.channel]
        missing = [name for name in required if not getattr(self, name)]
        if self.action is not None and self.channel != "audience":
            raise PydanticCustomError(
                "send_field_invalid",
                "'action' (add or remove) applies to audience sends only; remove it",
                {"field": "action"},
            )
        if self.topic is not None and self.channel == "webhook":
            raise PydanticCustomError(
                "send_field_invalid",
                "a webhook does not reach the customer, so no topic choice applies; remove 'topic'",
                {"field": "topic"},
            )
        if self.topic is not None and self.category == "transactional":
            raise PydanticCustomError(
                "send_field_invalid",
                "a transactional send reaches the customer whatever topics they chose; "
                "remove 'topic' or make the send category marketing",
                {"field": "topic"},
            )
        if missing:
            # A custom error carries the field, so the problem's path points at it.
            raise PydanticCustomError(
                "send_field_missing",
                "{channel} sends need {missing} (required for {channel}: {required})",
                {
                    "channel": self.channel,
                    "missing": " and ".join(missing),
                    "required": ", ".join(required),
                    "field": missing[0],
                },
            )
        return self

    def content(self) -> dict[str, str]:
        """The Liquid sources this step renders, by field."""
        fields = ("subject", "title", "body", "audience", "url")
        content = {name: value for name in fields if (value := getattr(self, name))}
        if self.channel == "audience":
            content["action"] = self.action or "add"
        return content

    def adds_to_audience(self) -> bool:
        return self.channel == "audience" and self.action != "remove"


class TimeWindow(_Strict):
    """A local time window in the customer's time zone."""

    start: str = Field(examples=["09:00"])
    end: str = Field(examples=["21:00"])
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(
        default_factory=lambda: list(WEEKDAYS)  # type: ignore[arg-type]
    )

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        if not _CLOCK.match(value):
            raise ValueError(f"'{value}' is not a time of day; write HH:MM, e.g. '09:00'")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> TimeWindow:
        if self.start == self.end:
            raise ValueError("start and end are equal: the window would be empty")
        if not self.days:
            raise ValueError("days is empty: list at least one of mon..sun")
        return self


class BestTime(_Strict):
    """Envío Inteligente: wait for the hour this customer tends to engage."""

    fallback_hour: int = Field(
        10, ge=0, le=23, description="Local hour to use when there is too little engagement."
    )
    max_delay: Duration = Field(
        default_factory=lambda: timedelta(hours=24),
        description="Never wait longer than this for the best hour.",
    )


class WaitStep(StepBase):
    type: Literal["wait"]
    duration: Duration | None = None
    until: TimeWindow | None = Field(
        None, description="Wait until the customer's local time is inside this window."
    )
    best_time: BestTime | None = Field(
        None,
        description="Wait until the customer's best hour, learned from their opens, clicks "
        "and visits.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> WaitStep:
        kinds = [self.duration, self.until, self.best_time]
        if sum(kind is not None for kind in kinds) != 1:
            raise ValueError(
                "a wait needs exactly one of 'duration' (e.g. 4h), 'until' "
                "(a time window such as {start: '09:00', end: '21:00'}) or 'best_time' "
                "(e.g. {fallback_hour: 10, max_delay: 24h})"
            )
        return self


class Outcome(EventMatch):
    """One event a ``wait_for`` waits for, and the steps to take when it comes."""

    steps: list[Step] = Field(default_factory=list)


class WaitForStep(StepBase):
    type: Literal["wait_for"]
    events: list[Outcome] = Field(min_length=1)
    timeout: Duration = Field(description="How long to wait before taking on_timeout.")
    on_timeout: list[Step] = Field(default_factory=list)


class Branch(_Strict):
    name: str | None = None
    when: Condition
    steps: list[Step] = Field(default_factory=list)


class BranchStep(StepBase):
    type: Literal["branch"]
    branches: list[Branch] = Field(min_length=1)
    otherwise: list[Step] = Field(default_factory=list)


class Variant(_Strict):
    name: str = Field(pattern=STEP_ID)
    weight: float = Field(gt=0, description="Relative weight; need not add up to 100.")
    steps: list[Step] = Field(default_factory=list)


class SplitStep(StepBase):
    type: Literal["split"]
    variants: list[Variant] = Field(min_length=2)

    @model_validator(mode="after")
    def _unique_names(self) -> SplitStep:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique; got {names}")
        return self


class UpdateProfileStep(StepBase):
    type: Literal["update_profile"]
    set: dict[str, Any] = Field(
        default_factory=dict,
        description="Traits to set; a dotted name sets one field of an object trait and keeps "
        "its others (preferences.frequency: monthly).",
    )
    unset: list[str] = Field(
        default_factory=list, description="Traits to remove (dotted names as in 'set')."
    )

    @model_validator(mode="after")
    def _something(self) -> UpdateProfileStep:
        if not self.set and not self.unset:
            raise ValueError("update_profile needs 'set' or 'unset'")
        return self


class HandoffStep(StepBase):
    type: Literal["handoff"]
    team: Literal["sales", "support"]
    skills: list[str] = Field(default_factory=list)
    note: str = Field(min_length=1, description="What the agent should know (Liquid).")
    priority: Literal["low", "normal", "high", "urgent"] = "normal"


class ExitStep(StepBase):
    type: Literal["exit"]
    reason: str = "exit step"


def _step_type(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("type")
    return getattr(value, "type", None)


Step = Annotated[
    Annotated[SendStep, Tag("send")]
    | Annotated[WaitStep, Tag("wait")]
    | Annotated[WaitForStep, Tag("wait_for")]
    | Annotated[BranchStep, Tag("branch")]
    | Annotated[SplitStep, Tag("split")]
    | Annotated[UpdateProfileStep, Tag("update_profile")]
    | Annotated[HandoffStep, Tag("handoff")]
    | Annotated[ExitStep, Tag("exit")],
    Discriminator(
        _step_type,
        custom_error_type="unknown_step_type",
        custom_error_message=f"unknown step type; 'type' must be one of {', '.join(STEP_TYPES)}",
    ),
]
AnyStep = (
    SendStep
    | WaitStep
    | WaitForStep
    | BranchStep
    | SplitStep
    | UpdateProfileStep
    | HandoffStep
    | ExitStep
)


class Sample(_Strict):
    """A sample customer used to render every template at publish."""

    profile: dict[str, Any] = Field(default_factory=dict)
    trigger: dict[str, Any] = Field(default_factory=dict)


class JourneyDefinition(_Strict):
    """A journey as its author wrote it."""

    key: str = Field(pattern=JOURNEY_KEY, examples=["abandoned_cart"])
    name: str = Field(min_length=1, max_length=200)
    description: str | None = None
    trigger: Trigger
    entry: Entry = Field(default_factory=lambda: Entry())
    exit: list[ExitRule] = Field(default_factory=list)
    goal: Goal | None = None
    steps: list[Step] = Field(min_length=1)
    sample: Sample | None = Field(
        None, description="When given, templates must render strictly with it at publish."
    )

    @field_validator("key")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_KEYS:
            raise ValueError(
                f"'{value}' is reserved by the API (/journeys/{value}); pick another key"
            )
        return value

    def listens_to(self) -> set[str]:
        """Event names a running instance reacts to (exit, goal, wait_for)."""
        names = {rule.event for rule in self.exit}
        if self.goal:
            names.add(self.goal.event)
        for step, _ in walk_steps(self.steps):
            if isinstance(step, WaitForStep):
                names.update(outcome.event for outcome in step.events)
        return names

    def checksum(self) -> str:
        # Defaults left out: a field added to the grammar later does not make every
        # unchanged journey look changed (and republish as a new version).
        canonical = json.dumps(self.model_dump(mode="json", exclude_defaults=True), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


Outcome.model_rebuild()
Branch.model_rebuild()
Variant.model_rebuild()
WaitForStep.model_rebuild()
BranchStep.model_rebuild()
SplitStep.model_rebuild()
JourneyDefinition.model_rebuild()


class PublishedJourney(_Strict):
    """An immutable published version: what a running instance carries with it."""

    key: str
    version: int = Field(ge=1)
    definition: JourneyDefinition


# ---------------------------------------------------------------- walking and checking


def walk_steps(steps: Sequence[AnyStep], path: str = "steps") -> Iterator[tuple[AnyStep, str]]:
    """Every step with its path, depth first, in the order an author reads them.

    A nested step's path names its parents as problems do:
    ``steps[3] (consent_check).branches[0].steps[0]``.
    """
    for index, step in enumerate(steps):
        here = f"{path}[{index}]"
        yield step, here
        yield from walk_steps_within(step, f"{here} ({step.id})")


def walk_steps_within(step: AnyStep, here: str) -> Iterator[tuple[AnyStep, str]]:
    for label, children in child_lists(step):
        yield from walk_steps(children, f"{here}.{label}")


def child_lists(step: AnyStep) -> list[tuple[str, list[AnyStep]]]:
    """The nested step lists of a step, labelled as their path segment."""
    if isinstance(step, WaitForStep):
        lists = [(f"events[{i}].steps", o.steps) for i, o in enumerate(step.events)]
        return [*lists, ("on_timeout", step.on_timeout)]
    if isinstance(step, BranchStep):
        lists = [(f"branches[{i}].steps", b.steps) for i, b in enumerate(step.branches)]
        return [*lists, ("otherwise", step.otherwise)]
    if isinstance(step, SplitStep):
        return [(f"variants[{i}].steps", v.steps) for i, v in enumerate(step.variants)]
    return []


# The interpreter's map of a definition. It lives here, outside the workflow's module, because
# the workflow sandbox re-runs that module for every instance: a class defined there is built
# again each time.
@dataclass(frozen=True)
class Node:
    step: AnyStep
    next: str | None


def compile_steps(steps: list[AnyStep]) -> dict[str, Node]:
    """Link every step to the one that follows it, nested lists included."""
    nodes: dict[str, Node] = {}

    def link(items: list[AnyStep], after: str | None) -> None:
        for index, step in enumerate(items):
            following = items[index + 1].id if index + 1 < len(items) else after
            nodes[step.id] = Node(step, following)
            for _label, children in child_lists(step):
                link(children, following)

    link(steps, None)
    return nodes


def first_of(steps: list[AnyStep], otherwise: str | None) -> str | None:
    return steps[0].id if steps else otherwise


class JourneyProblem(BaseModel):
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class JourneyInvalid(InvalidInput):
    """A definition that must not be published, with every problem found."""

    def __init__(self, problems: list[JourneyProblem], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{where}journey definition is invalid:\n{lines}")


def journey_json_schema() -> dict[str, Any]:
    """The published JSON Schema, so editors can autocomplete definitions."""
    schema = JourneyDefinition.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Hilo journey definition"
    return schema
