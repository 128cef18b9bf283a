"""Every table Hilo keeps, on one SQLModel metadata: what Alembic compares and migrates.

The tables come from the Alembic migrations (``hilo/db/migrations``); ``create_all`` is for
tests only. Grouped by the context that owns them: journeys, customers, intake, the message
ledger and its feedback, the contact policy, promotions.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from hilo.clock import utcnow
from hilo.ids import MAX_ID_CHARS


class Journey(SQLModel, table=True):
    __tablename__ = "journeys"

    key: str = Field(primary_key=True, max_length=63)
    name: str = Field(max_length=200)
    status: str = Field(default="active", max_length=20)  # active | paused | archived
    latest_version: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class JourneyVersion(SQLModel, table=True):
    __tablename__ = "journey_versions"
    __table_args__ = (UniqueConstraint("journey_key", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    journey_key: str = Field(foreign_key="journeys.key", index=True, max_length=63)
    version: int
    checksum: str = Field(max_length=64)
    definition: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    published_at: datetime = Field(default_factory=utcnow)


class Profile(SQLModel, table=True):
    """One customer. An anonymous visitor's profile is keyed by its anonymousId until an
    identify or alias merges it into the known customer (``merged_into``)."""

    __tablename__ = "profiles"

    customer_id: str = Field(primary_key=True, max_length=MAX_ID_CHARS)
    traits: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    consent: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    timezone: str | None = Field(default=None, max_length=64)
    locale: str | None = Field(default=None, max_length=35)
    anonymous: bool = False
    merged_into: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Identity(SQLModel, table=True):
    """An id a source knows the customer by (userId, anonymousId, email, phone)."""

    __tablename__ = "identities"

    kind: str = Field(primary_key=True, max_length=20)
    value: str = Field(primary_key=True, max_length=320)
    customer_id: str = Field(index=True, max_length=200)
    source: str = Field(default="api", max_length=100)
    created_at: datetime = Field(default_factory=utcnow)


class ConsentChange(SQLModel, table=True):
    """Every consent change, with where it came from and when: the audit behind
    ``Profile.consent``."""

    __tablename__ = "consent_changes"

    id: int | None = Field(default=None, primary_key=True)
    customer_id: str = Field(index=True, max_length=200)
    channel: str = Field(max_length=20)
    granted: bool
    topic: str | None = Field(default=None, max_length=100)
    source: str = Field(max_length=100)
    detail: str | None = Field(default=None, max_length=500)
    changed_at: datetime = Field(default_factory=utcnow)


class ProfileChange(SQLModel, table=True):
    """A change to who a customer is that a source asked for — a merge of two known
    customers, a new email or phone, a device taken from another customer, a consent grant —
    with that source, and whether it was applied (``reason`` says why not): the audit behind
    the trust each source kind has. Applied consent changes are in ``consent_changes``."""

    __tablename__ = "profile_changes"

    id: int | None = Field(default=None, primary_key=True)
    customer_id: str = Field(index=True, max_length=200)
    kind: str = Field(max_length=20)  # merge | email | phone | device | consent
    applied: bool
    summary: str = Field(max_length=500)
    source: str = Field(max_length=100)
    message_id: str | None = Field(default=None, max_length=200)  # the call that asked
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    changed_at: datetime = Field(default_factory=utcnow)


class Device(SQLModel, table=True):
    """A push token or web-push subscription of a customer."""

    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("kind", "address"),)

    id: int | None = Field(default=None, primary_key=True)
    customer_id: str = Field(index=True, max_length=200)
    kind: str = Field(max_length=20)  # push | webpush
    address: str = Field(max_length=2000)  # FCM token, or the subscription's endpoint
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    platform: str | None = Field(default=None, max_length=40)
    active: bool = True
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class OutboxEntry(SQLModel, table=True):
    """Work the dispatcher owes Temporal, committed with what caused it.

    ``event``: route a stored event (start and signal); ``merge``: tell the running
    instances of a merged anonymous profile who their customer is now; ``audiences``: take a
    customer who withdrew consent out of every ad audience.
    """

    __tablename__ = "outbox"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(default="event", max_length=20)
    message_id: str = Field(max_length=200)
    customer_id: str = Field(index=True, max_length=200)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    available_at: datetime = Field(default_factory=utcnow)
    attempts: int = 0
    last_error: str | None = Field(default=None, max_length=1000)
    # A dead letter: delivery failed for good (``last_error`` says why) and the customer's
    # later entries went on without it, until ``hilo events retry`` or ``drop``.
    parked_at: datetime | None = None
    dropped_at: datetime | None = None  # kept as the record of what was never delivered


class DispatcherLease(SQLModel, table=True):
    """Which process dispatches: one at a time, so each customer's events stay in order."""

    __tablename__ = "dispatcher_lease"

    name: str = Field(primary_key=True, max_length=40)
    owner: str = Field(max_length=100)
    expires_at: datetime


class StoredEvent(SQLModel, table=True):
    __tablename__ = "events"

    message_id: str = Field(primary_key=True, max_length=200)
    customer_id: str = Field(index=True, max_length=200)
    type: str = Field(default="track", max_length=20)  # Segment call type
    name: str = Field(max_length=200)
    properties: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    context: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    user_id: str | None = Field(default=None, max_length=200)
    anonymous_id: str | None = Field(default=None, max_length=200)
    source: str = Field(default="api", max_length=100)
    timestamp: datetime
    sent_at: datetime | None = None
    received_at: datetime = Field(default_factory=utcnow)
    routed_at: datetime | None = None


# An entry recorded before its workflow starts, and a started one: both hear their events.
ENTRY_STARTING = "starting"
LIVE_STATUSES = (ENTRY_STARTING, "active")


class JourneyInstance(SQLModel, table=True):
    """One entry of a customer into a journey: the router's map of running workflows.

    Recorded (``starting``) before its workflow starts and ``active`` once the start is
    known, so no workflow runs without its row. An entry is its workflow id and number (a
    customer who re-enters gets the next number, and the earlier entry keeps its history)
    and, as one event makes one entry at most, its workflow id and triggering event: the
    workflow's end finds its own entry that way, whenever it comes.
    """

    __tablename__ = "journey_instances"
    __table_args__ = (
        UniqueConstraint("workflow_id", "trigger_message_id", name="uq_journey_instances_trigger"),
    )

    workflow_id: str = Field(primary_key=True, max_length=1000)
    entry: int = Field(default=1, primary_key=True)
    # The first run's id, once the start (or the workflow's end) has told it.
    run_id: str | None = Field(default=None, max_length=64, unique=True, index=True)
    journey_key: str = Field(index=True, max_length=63)
    version: int
    customer_id: str = Field(index=True, max_length=200)
    instance_key: str | None = Field(default=None, max_length=200)
    trigger_message_id: str | None = Field(default=None, max_length=200, index=True)
    # starting | active | the end the workflow recorded (completed, exited, holdout, archived)
    # | how Temporal closed a workflow that recorded none (terminated, failed, ...)
    status: str = Field(default="active", max_length=20, index=True)
    holdout: bool = False
    started_at: datetime = Field(default_factory=utcnow)
    ended_at: datetime | None = None
    exit_reason: str | None = Field(default=None, max_length=200)
    converted_at: datetime | None = None
    revenue: float | None = None


class JourneyNote(SQLModel, table=True):
    """What a running instance noticed that left no other trace, for the customer's
    timeline: an event that almost ended it or answered its wait ("Order Completed did not
    end the journey: cart_id c2 ≠ trigger's c1"). One per instance run and event."""

    __tablename__ = "journey_notes"
    __table_args__ = (UniqueConstraint("run_id", "event_message_id"),)

    id: int | None = Field(default=None, primary_key=True)
    workflow_id: str = Field(max_length=1000)
    run_id: str = Field(max_length=64)
    journey_key: str = Field(max_length=63)
    customer_id: str = Field(index=True, max_length=200)
    step_id: str | None = Field(default=None, max_length=63)
    event_message_id: str = Field(max_length=200)
    summary: str = Field(max_length=500)
    noted_at: datetime


class Message(SQLModel, table=True):
    """The message ledger: one row per deterministic message id."""

    __tablename__ = "messages"

    message_id: str = Field(primary_key=True, max_length=80)
    workflow_id: str = Field(index=True, max_length=1000)
    run_id: str = Field(max_length=64)
    journey_key: str = Field(index=True, max_length=63)
    journey_version: int
    customer_id: str = Field(index=True, max_length=200)
    step_id: str = Field(max_length=63)
    iteration: int = 1
    channel: str = Field(max_length=20)
    template: str = Field(max_length=200)
    category: str = Field(max_length=20)
    content: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # queued (handed to the provider, answer not recorded yet) | sent | skipped | failed, then
    # from the provider's feedback: delivered | opened | clicked | bounced | complained
    status: str = Field(max_length=20, index=True)
    reason: str | None = Field(default=None, max_length=500)
    provider: str = Field(default="capture", max_length=40)
    provider_message_id: str | None = Field(default=None, max_length=200, index=True)
    recipient: str | None = Field(default=None, max_length=2000)
    attempts: int = 0
    scheduled_at: datetime
    created_at: datetime = Field(default_factory=utcnow)
    sent_at: datetime | None = None
    delivered_at: datetime | None = None
    opened_at: datetime | None = None
    clicked_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)


# How far a message got: feedback never moves a message back (a late "delivered" after an
# "opened" keeps "opened"); bounced and complained end it whatever came before.
MESSAGE_PROGRESS = {
    "queued": 0,
    "failed": 1,
    "skipped": 1,
    "sent": 2,
    "deferred": 2,
    "delivered": 3,
    "opened": 4,
    "clicked": 5,
    "unsubscribed": 6,
    "bounced": 7,
    "complained": 8,
}


class DeliveryEventRow(SQLModel, table=True):
    """Each provider callback or tracked open/click once: a replayed callback changes nothing."""

    __tablename__ = "delivery_events"

    id: int | None = Field(default=None, primary_key=True)
    raw_id: str = Field(unique=True, max_length=300)
    message_id: str | None = Field(default=None, index=True, max_length=80)
    provider: str = Field(max_length=40)
    status: str = Field(max_length=20)
    address: str | None = Field(default=None, max_length=320)
    reason: str | None = Field(default=None, max_length=500)
    url: str | None = Field(default=None, max_length=2000)
    occurred_at: datetime
    received_at: datetime = Field(default_factory=utcnow)


class CapturedMessage(SQLModel, table=True):
    """What the capture provider received: stands in for a real channel in development."""

    __tablename__ = "captured_messages"

    id: int | None = Field(default=None, primary_key=True)
    message_id: str = Field(unique=True, max_length=80)
    channel: str = Field(max_length=20)
    template: str = Field(max_length=200)
    customer_id: str = Field(index=True, max_length=200)
    journey_key: str = Field(max_length=63)
    step_id: str = Field(max_length=63)
    recipient: str | None = Field(default=None, max_length=320)
    content: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    captured_at: datetime = Field(default_factory=utcnow)


# The contact policy


class ContactPolicyVersion(SQLModel, table=True):
    """One version of the policy document: the audit of who changed what, when and why."""

    __tablename__ = "contact_policy_versions"

    version: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    document: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    actor: str = Field(max_length=200)
    note: str | None = Field(default=None, max_length=1000)
    changes: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    summary: str = Field(max_length=2000)
    created_at: datetime = Field(default_factory=utcnow)


class ContactReservation(SQLModel, table=True):
    """A slot an ALLOW reserved: counts towards caps while reserved or used."""

    __tablename__ = "contact_reservations"
    __table_args__ = (Index("ix_contact_reservations_customer_time", "customer_id", "reserved_at"),)

    id: int | None = Field(default=None, primary_key=True)
    message_id: str = Field(unique=True, max_length=200)
    customer_id: str = Field(max_length=200)
    journey_key: str = Field(max_length=63)
    channel: str = Field(max_length=20)
    category: str = Field(max_length=20)
    priority: int = 0
    counted: bool = True
    reserved_at: datetime
    status: str = Field(default="reserved", max_length=20)  # reserved | used | released
    release_reason: str | None = Field(default=None, max_length=500)
    updated_at: datetime = Field(default_factory=utcnow)


# The send runs it with the ledger update, on the driver's connection (Store.message_outcome).
class PolicyDecisionRecord(SQLModel, table=True):
    """Every answer the policy gave, for the profile timeline and the operators."""

    __tablename__ = "policy_decisions"
    # A customer's timeline, and the DEFERs still due (defer_until is set on DEFERs only).
    __table_args__ = (Index("ix_policy_decisions_customer_due", "customer_id", "defer_until"),)

    id: int | None = Field(default=None, primary_key=True)
    message_id: str = Field(index=True, max_length=200)
    customer_id: str = Field(max_length=200)
    journey_key: str = Field(max_length=63)
    channel: str = Field(max_length=20)
    category: str = Field(max_length=20)
    priority: int = 0
    decision: str = Field(max_length=10)  # allow | defer | skip
    reason: str = Field(max_length=500)
    rule: str | None = Field(default=None, max_length=200)
    defer_until: datetime | None = None
    reservation_id: int | None = None
    policy_version: int = 0
    timezone: str | None = Field(default=None, max_length=64)
    decided_at: datetime


class Suppression(SQLModel, table=True):
    """An address no message goes to on a channel (hard bounce, complaint, request)."""

    __tablename__ = "suppressions"
    __table_args__ = (UniqueConstraint("channel", "address"),)

    id: int | None = Field(default=None, primary_key=True)
    channel: str = Field(max_length=20)
    address: str = Field(max_length=320)
    reason: str = Field(max_length=500)
    source: str = Field(max_length=100)
    created_at: datetime = Field(default_factory=utcnow)


class SendTimeChoice(SQLModel, table=True):
    """What Envío Inteligente chose for a customer, and why."""

    __tablename__ = "send_time_choices"

    id: int | None = Field(default=None, primary_key=True)
    customer_id: str = Field(index=True, max_length=200)
    message_id: str | None = Field(default=None, max_length=200)
    chosen_at: datetime
    hour_of_week: int
    timezone: str = Field(max_length=64)
    reason: str = Field(max_length=500)
    samples: int
    fallback: bool
    decided_at: datetime


# ================================================================ time in the customer's zone


# Promotions


class Promotion(SQLModel, table=True):
    __tablename__ = "promotions"

    key: str = Field(primary_key=True, max_length=63)
    code: str = Field(max_length=64)
    description: str = Field(default="", max_length=500)
    discount: str = Field(default="", max_length=100)
    valid_from: datetime
    valid_until: datetime
    # Channels the offer may be sent on; empty means every channel.
    channels: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
