"""Inputs and results of the journey workflow and its activities (one model each).

Adding a field with a default never breaks a running journey: the models travel in
Temporal histories through the pydantic data converter.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from hilo.events import CustomerEvent
from hilo.journeys.definitions import (
    BranchStep,
    EventMatch,
    Goal,
    JourneyDefinition,
    PublishedJourney,
    TimeWindow,
    WaitForStep,
    walk_steps,
)

# Activity names: the workflow calls them by name so it imports no I/O code.
FINISH = "finish"
LOAD_PROFILE = "load_profile"
SEND_MESSAGE = "send_message"
UPDATE_PROFILE = "update_profile"
NEXT_WINDOW_OPENING = "next_window_opening"
BEST_SEND_TIME = "best_send_time"
NOTE = "note"
LEAVE_AUDIENCES = "leave_audiences"
# The workflow that takes a customer out of every ad audience after they unsubscribed.
# Workflow type names as Temporal knows them: recorded histories name these.
JOURNEY_WORKFLOW = "Journey"
LEAVE_AUDIENCES_WORKFLOW = "LeaveAudiences"

SIGNAL_EVENT = "event"
SIGNAL_STOP = "stop"
SIGNAL_IDENTIFIED = "identified"

# The memo key naming the event that started an instance: a start retried after a crash
# recognises its own workflow by it.
TRIGGER_MEMO = "trigger_message_id"

InstanceStatus = Literal["completed", "exited", "holdout", "archived"]


class JourneyState(BaseModel):
    """Where an instance is; carried across continue-as-new."""

    cursor: str | None = None
    started_at: datetime | None = None
    step_counts: dict[str, int] = Field(default_factory=dict)
    sent: int = 0
    exit_reason: str | None = None
    converted_at: datetime | None = None
    revenue: float | None = None
    enrollment_run_id: str | None = None
    # Set when the anonymous visitor who entered was identified as a known customer.
    customer_id: str | None = None


class JourneyInput(BaseModel):
    journey: PublishedJourney
    customer_id: str
    instance_key: str | None = None
    trigger: CustomerEvent
    state: JourneyState | None = None
    # Continue-as-new after this many steps in one run, or when Temporal suggests it.
    max_steps_per_run: int = 500
    search_attributes: bool = True
    # How long one attempt of a send may take before Temporal tries again elsewhere.
    send_timeout_seconds: float = 60.0


class JourneyResult(BaseModel):
    status: InstanceStatus
    reason: str | None = None
    sent: int = 0
    steps: int = 0
    converted: bool = False


class StopRequest(BaseModel):
    reason: str = "stopped"
    status: InstanceStatus = "exited"


class IdentifiedSignal(BaseModel):
    """The anonymous profile an instance was started for is now this known customer."""

    customer_id: str
    previous_id: str


class JourneyProgress(BaseModel):
    journey: str
    version: int
    customer_id: str
    step: str | None
    status: str
    # What it listens for now (its wait_for's and its exit rules'), as HiloWaitingFor says.
    waiting_for: list[str]
    sent: int
    exit_reason: str | None


class FinishRequest(BaseModel):
    workflow_id: str
    run_id: str
    status: InstanceStatus
    reason: str | None = None
    ended_at: datetime
    converted_at: datetime | None = None
    revenue: float | None = None
    holdout: bool = False
    # The event that made this entry: the end is recorded on that entry alone.
    trigger_message_id: str | None = None


class NoteRequest(BaseModel):
    """A line for the customer's timeline about one event an instance heard."""

    workflow_id: str
    run_id: str
    journey_key: str
    customer_id: str
    step_id: str | None = None
    event_message_id: str
    summary: str
    noted_at: datetime


class ProfileRequest(BaseModel):
    customer_id: str
    # The snapshot paths the journey's conditions read (``traits.vip``, ``consent.push``):
    # only those come back into the history. None, as instances started before send it:
    # the whole snapshot.
    paths: list[str] | None = None


class ProfileSnapshot(BaseModel):
    """What conditions and templates see under ``profile``."""

    customer_id: str
    traits: dict[str, Any] = Field(default_factory=dict)
    consent: dict[str, Any] = Field(default_factory=dict)
    timezone: str | None = None
    locale: str | None = None

    def as_context(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class SendRequest(BaseModel):
    message_id: str
    workflow_id: str
    run_id: str
    journey_key: str
    journey_version: int
    customer_id: str
    step_id: str
    iteration: int = 1
    channel: str
    template: str
    category: Literal["marketing", "transactional"]
    content: dict[str, str]
    # The triggering event is read from the events table by id rather than carried in every
    # send's history; ``trigger`` is for callers that have no stored event.
    trigger_message_id: str | None = None
    trigger: dict[str, Any] | None = None
    ignore_policy: bool = False
    # The preference topic the message is about: the contact policy skips it for a customer
    # who left that topic.
    topic: str | None = None
    # Workflow time of this attempt: the contact policy decides as of then.
    scheduled_at: datetime


class SendResult(BaseModel):
    message_id: str
    # deferred: the contact policy said not yet; ask again at defer_until.
    status: Literal["sent", "skipped", "failed", "deferred"]
    reason: str | None = None
    provider_message_id: str | None = None
    defer_until: datetime | None = None
    rule: str | None = Field(None, description="The contact-policy rule that decided.")


class LeaveAudiencesRequest(BaseModel):
    """Take the customer out of the ad audiences journeys added them to."""

    customer_id: str
    reason: str
    # Only the audiences this instance added (a journey's exit); None: every audience.
    workflow_id: str | None = None
    run_id: str | None = None
    scheduled_at: datetime


class LeaveAudiencesResult(BaseModel):
    removed: list[str] = Field(default_factory=list, description="Audiences left, by name.")
    skipped: list[str] = Field(default_factory=list, description="Why a removal did not go.")


class UpdateProfileRequest(BaseModel):
    customer_id: str
    set: dict[str, Any] = Field(default_factory=dict)
    unset: list[str] = Field(default_factory=list)


class WindowRequest(BaseModel):
    customer_id: str
    window: TimeWindow
    now: datetime


class BestTimeRequest(BaseModel):
    customer_id: str
    key: str  # records the choice under this id
    now: datetime
    fallback_hour: int
    max_delay_seconds: float


class BestTimeAnswer(BaseModel):
    at: datetime
    reason: str
    timezone: str


class WindowOpening(BaseModel):
    at: datetime
    timezone: str


# ---------------------------------------------------------------- what a history may hold
#
# Inputs, signals and activity results are written into the Temporal history in full. An
# instance gets ids and the values its conditions read; templates render in the send
# activity from the stored profile and event.


def _rules(definition: JourneyDefinition) -> list[EventMatch | Goal]:
    """The exit rules, the goal and every wait_for outcome: what matches heard events."""
    rules: list[EventMatch | Goal] = [*definition.exit]
    if definition.goal is not None:
        rules.append(definition.goal)
    for step, _path in walk_steps(definition.steps):
        if isinstance(step, WaitForStep):
            rules += step.events
    return rules


def read_paths(definition: JourneyDefinition) -> list[str]:
    """Every context path a running instance reads (``trigger.properties.cart_value``,
    ``profile.consent.push``, ``event.properties.total``): its conditions' and the goal's
    revenue. ``match_trigger`` properties are keys, not paths: see :func:`workflow_event`.
    The trigger's own filter is not here: the router applies it before the start."""
    paths: set[str] = set()
    for step, _path in walk_steps(definition.steps):
        if isinstance(step, BranchStep):
            for branch in step.branches:
                paths.update(branch.when.paths())
    for rule in _rules(definition):
        if rule.where is not None:
            paths.update(rule.where.paths())
    if definition.goal is not None and definition.goal.revenue:
        paths.add(f"event.{definition.goal.revenue}")
    return sorted(paths)


def profile_paths(definition: JourneyDefinition) -> list[str] | None:
    """The profile snapshot paths the journey reads; None when it reads all of it."""
    paths = read_paths(definition)
    if "profile" in paths:
        return None
    return [path.removeprefix("profile.") for path in paths if path.startswith("profile.")]


def workflow_event(
    definition: JourneyDefinition, event: CustomerEvent, root: Literal["trigger", "event"]
) -> CustomerEvent:
    """``event`` with only the properties the instance reads of it as ``root``: the trigger
    in the start input, or an event the instance hears in a signal."""
    paths = read_paths(definition)
    if root in paths:
        return event
    prefix = f"{root}."
    kept = only_paths(
        event.as_context(), [p.removeprefix(prefix) for p in paths if p.startswith(prefix)]
    )
    properties: dict[str, Any] = dict(kept.get("properties", {}))
    for rule in _rules(definition):
        for key in rule.match_trigger:  # looked up as a key, dots and all
            if key in event.properties:
                properties[key] = event.properties[key]
    return event.model_copy(update={"properties": properties})


def only_paths(data: Mapping[str, Any], paths: list[str]) -> dict[str, Any]:
    """The part of ``data`` the dotted ``paths`` reach, as :func:`hilo.journeys.conditions.lookup`
    follows them: a path that ends on an object keeps it whole; one that finds nothing
    keeps nothing."""
    kept: dict[str, Any] = {}
    whole: list[list[str]] = []
    for parts in sorted(path.split(".") for path in paths):  # a prefix sorts first
        if any(parts[: len(done)] == done for done in whole):
            continue  # inside an object kept whole already
        value: Any = data
        for part in parts:
            if not (isinstance(value, Mapping) and part in value):
                break
            value = value[part]
        else:
            node = kept
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
            whole.append(parts)
    return kept
