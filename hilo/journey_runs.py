"""Inputs and results of the journey workflow and its activities (one model each).

Adding a field with a default never breaks a running journey: the models travel in
Temporal histories through the pydantic data converter.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from hilo.events import CustomerEvent
from hilo.journeys import PublishedJourney, TimeWindow

# Activity names: the workflow calls them by name so it imports no I/O code.
FINISH = "finish"
LOAD_PROFILE = "load_profile"
SEND_MESSAGE = "send_message"
UPDATE_PROFILE = "update_profile"
NEXT_WINDOW_OPENING = "next_window_opening"
BEST_SEND_TIME = "best_send_time"

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


class ProfileRequest(BaseModel):
    customer_id: str


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
