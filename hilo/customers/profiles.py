"""The profile read model: who a customer is, what they agreed to, and what happened to them.

* :func:`profile_view`: traits, identities, consent with its history, devices. An anonymous
  id merged into a known customer (or only ever linked to one) leads to that customer.
* :func:`timeline`: events, journey entries and exits, messages, consent changes, the
  identity changes sources asked for (applied or not, and why), the contact policy's
  decisions and the deliveries parked as dead letters, newest first, across the ids merged
  into the customer.
* :func:`record_consent`: one consent statement from any source (a preference centre, a
  support agent, an import), kept with its source and time; a push token or a web-push
  subscription given with it becomes one of the customer's devices.

Consent is per channel (``Profile.consent``: ``{"email": true, "sms": false}``). A change
for a ``topic`` (a newsletter, a category of offers) is kept in the history and shown under
``ProfileView.topics``, and leaves the channel's own consent as it is.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field
from sqlalchemy import DateTime, Integer, String, bindparam, inspect, text
from sqlmodel import Session, col, select

from hilo.clock import as_utc, utcnow
from hilo.customers.consent import CONSENT_CHANNELS
from hilo.customers.identity import merged_from, resolve_profile
from hilo.db.consent import change_consent
from hilo.db.models import (
    ConsentChange,
    Device,
    Identity,
    JourneyInstance,
    JourneyNote,
    Message,
    OutboxEntry,
    Profile,
    ProfileChange,
    StoredEvent,
)
from hilo.db.store import Store
from hilo.errors import InvalidInput
from hilo.ids import MAX_ID_CHARS

__all__ = [
    "CONSENT_CHANNELS",
    "MAX_TIMELINE",
    "ConsentChangeView",
    "ConsentError",
    "DeviceView",
    "IdentityView",
    "ProfileView",
    "TimelineEntry",
    "TimelineKind",
    "profile_view",
    "record_consent",
    "timeline",
]

MAX_TIMELINE = 1000
# Merges chain at most a few times (anonymous -> known -> alias); never loop on bad data.
# RFC 8291: an uncompressed P-256 public key and a 16-byte authentication secret.
_P256DH_BYTES = 65
_AUTH_BYTES = 16

TimelineKind = Literal[
    "event",
    "identify",
    "journey_entry",
    "journey_exit",
    "journey_note",
    "message",
    "consent",
    "profile_change",
    "policy_decision",
    "dead_letter",
]


class ConsentError(InvalidInput):
    """A consent change that cannot be recorded; ``field`` is the request's field at fault
    (``channel``, ``token``, ``subscription.keys.p256dh`` ...)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class IdentityView(BaseModel):
    kind: str = Field(examples=["email"], description="user_id, anonymous_id, email or phone")
    value: str
    source: str = Field(description="The source that first sent this id.")
    created_at: datetime


class ConsentChangeView(BaseModel):
    channel: str
    granted: bool
    topic: str | None
    source: str = Field(examples=["web"], description="Who said so: a source or an API caller.")
    detail: str | None
    changed_at: datetime


class DeviceView(BaseModel):
    kind: str = Field(description="push (an FCM token) or webpush (a browser subscription)")
    address: str = Field(description="The FCM token, or the subscription's endpoint.")
    platform: str | None
    active: bool
    updated_at: datetime


class ProfileView(BaseModel):
    customer_id: str
    anonymous: bool
    merged_from: list[str] = Field(description="Anonymous ids merged into this customer.")
    traits: dict[str, Any]
    identities: list[IdentityView]
    consent: dict[str, bool] = Field(description="By channel, e.g. {email: true, sms: false}.")
    topics: dict[str, dict[str, bool]] = Field(
        default_factory=dict,
        description="By channel, the latest consent for each topic, e.g. {email: {news: false}}.",
    )
    consent_history: list[ConsentChangeView] = Field(description="Oldest first.")
    devices: list[DeviceView]
    timezone: str | None
    locale: str | None
    created_at: datetime
    updated_at: datetime


class TimelineEntry(BaseModel):
    kind: TimelineKind
    at: datetime
    summary: str = Field(examples=["Cart Abandoned"])
    data: dict[str, Any] = Field(default_factory=dict)
    source: str | None = Field(
        None,
        description="The source of an event, consent change or profile change; None for "
        "Hilo's own.",
    )


# ---------------------------------------------------------------- finding the customer


# ---------------------------------------------------------------- the profile


def profile_view(store: Store, customer_id: str) -> ProfileView | None:
    """The customer's profile; a merged or linked anonymous id gives the known one."""
    with store.session() as session:
        profile = resolve_profile(session, customer_id)
        if profile is None:
            return None
        return _view(session, profile)


def _view(session: Session, profile: Profile) -> ProfileView:
    customer = profile.customer_id
    identities = session.exec(
        select(Identity)
        .where(Identity.customer_id == customer)
        .order_by(col(Identity.created_at), col(Identity.kind), col(Identity.value))
    )
    changes = list(
        session.exec(
            select(ConsentChange)
            .where(ConsentChange.customer_id == customer)
            .order_by(col(ConsentChange.changed_at), col(ConsentChange.id))
        )
    )
    devices = session.exec(
        select(Device).where(Device.customer_id == customer).order_by(col(Device.id))
    )
    topics: dict[str, dict[str, bool]] = {}
    for change in changes:
        if change.topic is not None:
            topics.setdefault(change.channel, {})[change.topic] = change.granted
    return ProfileView(
        customer_id=customer,
        anonymous=profile.anonymous,
        merged_from=merged_from(session, customer),
        traits=profile.traits,
        identities=[
            IdentityView(
                kind=row.kind,
                value=row.value,
                source=row.source,
                created_at=as_utc(row.created_at),
            )
            for row in identities
        ],
        consent={
            channel: granted
            for channel, granted in profile.consent.items()
            if isinstance(granted, bool)
        },
        topics=topics,
        consent_history=[_change_view(change) for change in changes],
        devices=[
            DeviceView(
                kind=row.kind,
                address=row.address,
                platform=row.platform,
                active=row.active,
                updated_at=as_utc(row.updated_at),
            )
            for row in devices
        ],
        timezone=profile.timezone,
        locale=profile.locale,
        created_at=as_utc(profile.created_at),
        updated_at=as_utc(profile.updated_at),
    )


def _change_view(change: ConsentChange) -> ConsentChangeView:
    return ConsentChangeView(
        channel=change.channel,
        granted=change.granted,
        topic=change.topic,
        source=change.source,
        detail=change.detail,
        changed_at=as_utc(change.changed_at),
    )


# ---------------------------------------------------------------- the timeline


def timeline(
    store: Store, customer_id: str, limit: int = 200, before: datetime | None = None
) -> list[TimelineEntry]:
    """What happened to the customer, newest first: at most ``limit`` entries, all before
    ``before`` when given (pass the last entry's ``at`` to read the next page)."""
    if not 1 <= limit <= MAX_TIMELINE:
        raise ValueError(f"limit must be between 1 and {MAX_TIMELINE}, not {limit}")
    until = as_utc(before) if before is not None else None
    with store.session() as session:
        profile = resolve_profile(session, customer_id)
        ids = [customer_id]
        if profile is not None:
            ids = [profile.customer_id, *merged_from(session, profile.customer_id)]
        entries = [
            *_events(session, ids, limit, until),
            *_journey_entries(session, ids, limit, until),
            *_journey_exits(session, ids, limit, until),
            *_journey_notes(session, ids, limit, until),
            *_messages(session, ids, limit, until),
            *_consent_changes(session, ids, limit, until),
            *_profile_changes(session, ids, limit, until),
            *_policy_decisions(session, ids, limit, until),
            *_dead_letters(session, ids, limit, until),
        ]
    entries.sort(key=lambda entry: entry.at, reverse=True)
    return entries[:limit]


def _latest(session: Session, query: Any, moment: Any, limit: int, before: datetime | None) -> Any:
    """One timeline source's page: the newest ``limit`` rows of ``query`` by ``moment``,
    older than ``before`` when it is given."""
    if before is not None:
        query = query.where(moment < before)
    return session.exec(query.order_by(moment.desc()).limit(limit))


def _events(
    session: Session, ids: Sequence[str], limit: int, before: datetime | None
) -> list[TimelineEntry]:
    query = select(StoredEvent).where(col(StoredEvent.customer_id).in_(ids))
    rows = _latest(session, query, col(StoredEvent.timestamp), limit, before)
    entries = []
    for row in rows:
        identify = row.type == "identify"
        if identify:
            names = ", ".join(sorted(row.properties)) or "no traits"
            summary = f"identify: {names}"
        elif row.type in ("track", "page", "screen"):
            summary = row.name
        else:
            summary = row.type  # group, alias
        entries.append(
            TimelineEntry(
                kind="identify" if identify else "event",
                at=as_utc(row.timestamp),
                summary=summary,
                data={
                    "message_id": row.message_id,
                    "type": row.type,
                    "name": row.name,
                    "properties": row.properties,
                    "user_id": row.user_id,
                    "anonymous_id": row.anonymous_id,
                    "received_at": as_utc(row.received_at).isoformat(),
                },
                source=row.source,
            )
        )
    return entries


def _instance_data(row: JourneyInstance) -> dict[str, Any]:
    return {
        "journey_key": row.journey_key,
        "version": row.version,
        "workflow_id": row.workflow_id,
        "entry": row.entry,
        "instance_key": row.instance_key,
        "holdout": row.holdout,
        "trigger_message_id": row.trigger_message_id,
    }


def _journey_entries(
    session: Session, ids: Sequence[str], limit: int, before: datetime | None
) -> list[TimelineEntry]:
    query = select(JourneyInstance).where(col(JourneyInstance.customer_id).in_(ids))
    rows = _latest(session, query, col(JourneyInstance.started_at), limit, before)
    return [
        TimelineEntry(
            kind="journey_entry",
            at=as_utc(row.started_at),
            summary=f"entered {row.journey_key} v{row.version}"
            + (f" ({row.instance_key})" if row.instance_key else "")
            + (" as holdout" if row.holdout else ""),
            data=_instance_data(row),
        )
        for row in rows
    ]


def _journey_exits(
    session: Session, ids: Sequence[str], limit: int, before: datetime | None
) -> list[TimelineEntry]:
    query = select(JourneyInstance).where(
        col(JourneyInstance.customer_id).in_(ids), col(JourneyInstance.ended_at).is_not(None)
    )
    rows = _latest(session, query, col(JourneyInstance.ended_at), limit, before)
    entries = []
    for row in rows:
        assert row.ended_at is not None
        summary = f"left {row.journey_key}: {row.status}"
        if row.exit_reason:
            summary += f" ({row.exit_reason})"
        entries.append(
            TimelineEntry(
                kind="journey_exit",
                at=as_utc(row.ended_at),
                summary=summary,
                data={
                    **_instance_data(row),
                    "status": row.status,
                    "reason": row.exit_reason,
                    "converted_at": _iso(row.converted_at),
                    "revenue": row.revenue,
                },
            )
        )
    return entries


def _journey_notes(
    session: Session, ids: Sequence[str], limit: int, before: datetime | None
) -> list[TimelineEntry]:
    query = select(JourneyNote).where(col(JourneyNote.customer_id).in_(ids))
    rows = _latest(session, query, col(JourneyNote.noted_at), limit, before)
    return [
        TimelineEntry(
            kind="journey_note",
            at=as_utc(row.noted_at),
            summary=row.summary,
            data={
                "journey_key": row.journey_key,
                "workflow_id": row.workflow_id,
                "step_id": row.step_id,
                "event_message_id": row.event_message_id,
            },
        )
        for row in rows
    ]


def _messages(
    session: Session, ids: Sequence[str], limit: int, before: datetime | None
) -> list[TimelineEntry]:
    query = select(Message).where(col(Message.customer_id).in_(ids))
    rows = _latest(session, query, col(Message.scheduled_at), limit, before)
    entries = []
    for row in rows:
        summary = f"{row.channel} {row.template} {row.status}"
        if row.reason:
            summary += f" ({row.reason})"
        entries.append(
            TimelineEntry(
                kind="message",
                at=as_utc(row.scheduled_at),
                summary=summary,
                data={
                    "message_id": row.message_id,
                    "journey_key": row.journey_key,
                    "step_id": row.step_id,
                    "channel": row.channel,
                    "template": row.template,
                    "category": row.category,
                    "status": row.status,
                    "reason": row.reason,
                    "recipient": row.recipient,
                    "provider": row.provider,
                    "sent_at": _iso(row.sent_at),
                },
            )
        )
    return entries


def _consent_changes(
    session: Session, ids: Sequence[str], limit: int, before: datetime | None
) -> list[TimelineEntry]:
    query = select(ConsentChange).where(col(ConsentChange.customer_id).in_(ids))
    rows = _latest(session, query, col(ConsentChange.changed_at), limit, before)
    entries = []
    for row in rows:
        what = f"{row.channel} {row.topic}" if row.topic else row.channel
        entries.append(
            TimelineEntry(
                kind="consent",
                at=as_utc(row.changed_at),
                summary=f"{what} consent {'granted' if row.granted else 'withdrawn'}",
                data={
                    "channel": row.channel,
                    "granted": row.granted,
                    "topic": row.topic,
                    "detail": row.detail,
                },
                source=row.source,
            )
        )
    return entries


def _profile_changes(
    session: Session, ids: Sequence[str], limit: int, before: datetime | None
) -> list[TimelineEntry]:
    query = select(ProfileChange).where(col(ProfileChange.customer_id).in_(ids))
    rows = _latest(session, query, col(ProfileChange.changed_at), limit, before)
    return [
        TimelineEntry(
            kind="profile_change",
            at=as_utc(row.changed_at),
            summary=row.summary,
            data={
                **row.data,
                "change": row.kind,
                "applied": row.applied,
                "message_id": row.message_id,
            },
            source=row.source,
        )
        for row in rows
    ]


def _dead_letters(
    session: Session, ids: Sequence[str], limit: int, before: datetime | None
) -> list[TimelineEntry]:
    query = (
        select(OutboxEntry, StoredEvent.name)
        .join(StoredEvent, col(StoredEvent.message_id) == col(OutboxEntry.message_id), isouter=True)
        .where(col(OutboxEntry.customer_id).in_(ids), col(OutboxEntry.parked_at).is_not(None))
    )
    rows = _latest(session, query, col(OutboxEntry.parked_at), limit, before)
    entries = []
    for row, name in rows:
        assert row.parked_at is not None
        what = name if row.kind == "event" and name else row.kind
        summary = f"{what} not delivered: {row.last_error}"
        if row.dropped_at is not None:
            summary += " (dropped)"
        entries.append(
            TimelineEntry(
                kind="dead_letter",
                at=as_utc(row.parked_at),
                summary=summary,
                data={
                    "message_id": row.message_id,
                    "kind": row.kind,
                    "reason": row.last_error,
                    "attempts": row.attempts,
                    "dropped_at": _iso(row.dropped_at),
                },
            )
        )
    return entries


_DECISIONS_SQL = """
    SELECT message_id, journey_key, channel, category, decision, reason, rule, defer_until,
           policy_version, decided_at
    FROM policy_decisions
    WHERE customer_id IN :ids {before}
    ORDER BY decided_at DESC, id DESC
    LIMIT :limit
"""


def _policy_decisions(
    session: Session, ids: Sequence[str], limit: int, before: datetime | None
) -> list[TimelineEntry]:
    connection = session.connection()
    # The contact policy's table comes with its own migration: a database without it
    # simply has no decisions to show.
    if not inspect(connection).has_table("policy_decisions"):
        return []
    statement = (
        text(_DECISIONS_SQL.format(before="AND decided_at < :before" if before else ""))
        .bindparams(bindparam("ids", expanding=True), bindparam("limit", type_=Integer()))
        .columns(
            message_id=String(),
            journey_key=String(),
            channel=String(),
            category=String(),
            decision=String(),
            reason=String(),
            rule=String(),
            defer_until=DateTime(timezone=True),
            policy_version=Integer(),
            decided_at=DateTime(timezone=True),
        )
    )
    parameters: dict[str, Any] = {"ids": list(ids), "limit": limit}
    if before is not None:
        # Typed, so that SQLite gets the same text SQLAlchemy stores for a DateTime.
        statement = statement.bindparams(bindparam("before", type_=DateTime(timezone=True)))
        parameters["before"] = before
    entries = []
    for row in connection.execute(statement, parameters).mappings():
        summary = f"{row['decision']} {row['channel']} for {row['journey_key']}: {row['reason']}"
        entries.append(
            TimelineEntry(
                kind="policy_decision",
                at=as_utc(row["decided_at"]),
                summary=summary,
                data={
                    "message_id": row["message_id"],
                    "journey_key": row["journey_key"],
                    "channel": row["channel"],
                    "category": row["category"],
                    "decision": row["decision"],
                    "reason": row["reason"],
                    "rule": row["rule"],
                    "defer_until": _iso(row["defer_until"]),
                    "policy_version": row["policy_version"],
                },
            )
        )
    return entries


# ---------------------------------------------------------------- consent


def record_consent(
    store: Store,
    customer_id: str,
    channel: str,
    granted: bool,
    source: str,
    topic: str | None = None,
    detail: str | None = None,
    device: str | Mapping[str, Any] | None = None,
) -> ConsentChangeView:
    """Record one consent statement for the customer ``customer_id`` stands for now.

    ``device`` is the FCM token for ``push`` or the browser's subscription
    (``{endpoint, keys: {p256dh, auth}}``) for ``webpush``: granted, it becomes an active
    device of the customer (taken over from whoever had it); withdrawn, that device is
    switched off. A customer Hilo does not know yet gets a profile.

    Raises :class:`ConsentError` naming the field at fault.
    """
    if not customer_id or len(customer_id) > MAX_ID_CHARS:
        raise ConsentError("customer_id", f"must be 1 to {MAX_ID_CHARS} characters")
    _check_consent(channel, granted, source, topic, detail)
    address, data = _device_address(channel, device)
    now = utcnow()
    with store.session() as session:
        resolved = resolve_profile(session, customer_id)
        customer = resolved.customer_id if resolved is not None else customer_id
        # Locked (on PostgreSQL) and read afresh: a concurrent identify must not overwrite
        # this change, nor this one that identify's.
        profile = session.exec(
            select(Profile)
            .where(Profile.customer_id == customer)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).first() or Profile(customer_id=customer)
        change = change_consent(
            session, profile, channel, granted, source=source, detail=detail, at=now, topic=topic
        )
        profile.updated_at = now
        session.add(profile)
        session.add(change)
        if address is not None:
            existing = session.exec(
                select(Device).where(Device.kind == channel, Device.address == address)
            ).first()
            row = existing or Device(
                customer_id=profile.customer_id, kind=channel, address=address, created_at=now
            )
            row.customer_id = profile.customer_id
            row.data = {**row.data, **data}
            row.active = granted
            row.updated_at = now
            session.add(row)
        session.commit()
        return _change_view(change)


def _check_consent(
    channel: str, granted: bool, source: str, topic: str | None, detail: str | None
) -> None:
    if channel not in CONSENT_CHANNELS:
        raise ConsentError(
            "channel", f"must be one of {', '.join(CONSENT_CHANNELS)}, not {channel!r}"
        )
    if not isinstance(granted, bool):
        raise ConsentError("granted", "must be true or false")
    if not isinstance(source, str) or not source.strip() or len(source) > 100:
        raise ConsentError(
            "source", "must name who recorded the change (1 to 100 characters), e.g. 'web'"
        )
    if topic is not None and (not topic.strip() or len(topic) > 100):
        raise ConsentError("topic", "must be 1 to 100 characters, or left out for the channel")
    if detail is not None and len(detail) > 500:
        raise ConsentError("detail", "must be at most 500 characters")


def _device_address(
    channel: str, device: str | Mapping[str, Any] | None
) -> tuple[str | None, dict[str, Any]]:
    """The device's address and what is kept with it, checked for its channel."""
    if device is None:
        return None, {}
    if channel == "push":
        if not isinstance(device, str) or not device.strip() or len(device) > 2000:
            raise ConsentError("token", "must be the device's FCM token (1 to 2000 characters)")
        if any(character.isspace() for character in device):
            raise ConsentError("token", "must not contain spaces: an FCM token is one word")
        return device, {}
    if channel == "webpush":
        if not isinstance(device, Mapping):
            raise ConsentError(
                "subscription",
                "must be the browser's PushSubscription as JSON: {endpoint, keys: {p256dh, auth}}",
            )
        return _subscription(device)
    field = "token" if isinstance(device, str) else "subscription"
    raise ConsentError(
        field, f"is only for channel push (token) or webpush (subscription), not {channel}"
    )


def _subscription(subscription: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    endpoint = subscription.get("endpoint")
    try:
        parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
    except ValueError:  # e.g. an unclosed [ in the host
        parts = None
    if (
        parts is None
        or parts.scheme != "https"
        or not parts.netloc
        or not isinstance(endpoint, str)
        or len(endpoint) > 2000
    ):
        raise ConsentError(
            "subscription.endpoint",
            "must be the push service's https URL from the browser's PushSubscription",
        )
    keys = subscription.get("keys")
    if not isinstance(keys, Mapping):
        raise ConsentError("subscription.keys", "must be an object with p256dh and auth")
    for name, size in (("p256dh", _P256DH_BYTES), ("auth", _AUTH_BYTES)):
        value = keys.get(name)
        decoded = _base64url(value) if isinstance(value, str) else None
        if decoded is None or len(decoded) != size:
            raise ConsentError(
                f"subscription.keys.{name}",
                f"must be the base64url text of the subscription's {size}-byte {name} key",
            )
    data: dict[str, Any] = {"keys": {"p256dh": keys["p256dh"], "auth": keys["auth"]}}
    if subscription.get("expirationTime") is not None:
        data["expiration_time"] = subscription["expirationTime"]
    return endpoint, data


def _base64url(value: str) -> bytes | None:
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None


# ---------------------------------------------------------------- time


def _iso(moment: datetime | None) -> str | None:
    return as_utc(moment).isoformat() if moment is not None else None
