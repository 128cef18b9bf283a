"""What happened after a send, written down once: provider callbacks, our tracked opens and
clicks, unsubscribes and the preference page.

:func:`record_delivery_events` takes verified :class:`~hilo.feedback.webhooks.DeliveryEvent`
objects and, in one transaction per call:

* stores each in ``delivery_events`` once (by ``raw_id``): a replayed callback changes nothing;
* moves the message's ledger row forward only (:data:`~hilo.db.store.MESSAGE_PROGRESS`), so a
  late "delivered" never hides an "opened", while bounced and complained always win;
* suppresses the address of a hard bounce or a complaint and revokes the channel's consent,
  with a :class:`~hilo.db.store.ConsentChange` saying which provider told us;
* revokes the channel's consent when the provider says the customer unsubscribed there;
* stores what the customer did or met as their event (and queues it for the journeys):
  opens and clicks, which Envío Inteligente learns the customer's best hour from, and
  email deliveries, bounces, spam reports and unsubscribes, under Segment's Email spec
  names (:data:`~hilo.events.EMITTED_EVENTS` lists every event Hilo emits).

:func:`unsubscribe` and :func:`apply_preferences` are what the signed links lead to; they
emit ``Unsubscribed`` and ``Preferences Updated``. The preferences live on the profile
under ``traits["preferences"]`` (frequency, pause_until, topics); a customer who never
chose hears about every topic.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from hilo.clock import utcnow
from hilo.customers.consent import PREFERENCE_CHANNEL, PREFERENCES_TRAIT
from hilo.db.consent import change_consent
from hilo.db.models import (
    MESSAGE_PROGRESS,
    DeliveryEventRow,
    Message,
    Profile,
    Suppression,
)
from hilo.db.outbox import append_events, event_row
from hilo.db.store import Store
from hilo.events import (
    EMAIL_BOUNCED,
    EMAIL_DELIVERED,
    EMAIL_LINK_CLICKED,
    EMAIL_MARKED_AS_SPAM,
    EMAIL_OPENED,
    MESSAGE_LINK_CLICKED,
    MESSAGE_OPENED,
    PREFERENCES_UPDATED,
    SMS_LINK_CLICKED,
    SMS_READ,
    UNSUBSCRIBED,
    WHATSAPP_LINK_CLICKED,
    WHATSAPP_MESSAGE_READ,
)
from hilo.feedback.links import LinkClaims
from hilo.feedback.preferences import PreferenceChange, PreferenceState
from hilo.feedback.webhooks import DeliveryEvent
from hilo.merges import follow_merges

__all__ = [
    "ENGAGEMENT_EVENTS",
    "PREFERENCES_TRAIT",
    "FeedbackOutcome",
    "apply_preferences",
    "current_preferences",
    "record_delivery_events",
    "tracked_click",
    "tracked_open",
    "unsubscribe",
]

# The event each engagement becomes, by (channel, status): names Envío Inteligente weighs.
ENGAGEMENT_EVENTS: dict[tuple[str, str], str] = {
    ("email", "opened"): EMAIL_OPENED,
    ("email", "clicked"): EMAIL_LINK_CLICKED,
    ("sms", "opened"): SMS_READ,
    ("sms", "clicked"): SMS_LINK_CLICKED,
    ("whatsapp", "opened"): WHATSAPP_MESSAGE_READ,
    ("whatsapp", "clicked"): WHATSAPP_LINK_CLICKED,
}
ENGAGEMENT_FALLBACK = {"opened": MESSAGE_OPENED, "clicked": MESSAGE_LINK_CLICKED}
# What else a provider tells us becomes the customer's event too, so a journey can wait for
# it or exit on it (Segment's Email spec has these; other channels' deliveries are many and
# tell a journey little).
DELIVERY_EVENTS: dict[tuple[str, str], str] = {
    ("email", "delivered"): EMAIL_DELIVERED,
    ("email", "bounced"): EMAIL_BOUNCED,
    ("email", "complained"): EMAIL_MARKED_AS_SPAM,
}
# Where a callback whose message we cannot find still tells us the channel.
PROVIDER_CHANNELS = {"sendgrid": "email", "smtp": "email", "twilio": "sms", "whatsapp": "whatsapp"}
ROWS_PER_INSERT = 500  # keeps a multi-row INSERT under SQLite's bound-parameter limit
_DELIVERED = MESSAGE_PROGRESS["delivered"]


@dataclass
class FeedbackOutcome:
    """What one call of :func:`record_delivery_events` changed."""

    recorded: list[str] = field(default_factory=list)  # raw ids new to Hilo
    duplicates: list[str] = field(default_factory=list)  # seen before: nothing changed
    unmatched: list[str] = field(default_factory=list)  # recorded; no ledger row found
    moved: dict[str, str] = field(default_factory=dict)  # message id -> its new status
    suppressed: list[tuple[str, str]] = field(default_factory=list)  # (channel, address)
    consent_revoked: list[tuple[str, str]] = field(default_factory=list)  # (customer, channel)
    engagement: list[str] = field(default_factory=list)  # ids of the events emitted


# ================================================================ our own tracking


def tracked_open(message_id: str, now: datetime | None = None) -> DeliveryEvent:
    """The open pixel of ``message_id`` was loaded; the first load counts."""
    return DeliveryEvent(
        message_id=message_id,
        provider="tracking",
        provider_message_id=None,
        status="opened",
        occurred_at=now or utcnow(),
        address=None,
        reason=None,
        hard_bounce=False,
        url=None,
        # One open per message: a pixel fetched again (or by a proxy) adds nothing.
        raw_id=f"tracking:open:{message_id}",
    )


def tracked_click(claims: LinkClaims, now: datetime | None = None) -> DeliveryEvent:
    """A verified click link was followed; the first click of each link counts."""
    if claims.message_id is None or claims.target_url is None:
        raise ValueError("claims: a click link carries message_id and target_url")
    link = hashlib.sha256(claims.target_url.encode()).hexdigest()[:16]
    return DeliveryEvent(
        message_id=claims.message_id,
        provider="tracking",
        provider_message_id=None,
        status="clicked",
        occurred_at=now or utcnow(),
        address=None,
        reason=None,
        hard_bounce=False,
        url=claims.target_url,
        raw_id=f"tracking:click:{claims.message_id}:{link}",
    )


# ================================================================ provider feedback


def _insert_for(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def _bounded(value: str | None, limit: int) -> str | None:
    return value[:limit] if value else None


def _raw_key(raw_id: str) -> str:
    # The column holds 300 characters; a longer id (never seen yet) still dedupes by its hash.
    return raw_id if len(raw_id) <= 300 else "sha256:" + hashlib.sha256(raw_id.encode()).hexdigest()


def _chunks(rows: Sequence[dict[str, Any]]) -> Iterable[Sequence[dict[str, Any]]]:
    for start in range(0, len(rows), ROWS_PER_INSERT):
        yield rows[start : start + ROWS_PER_INSERT]


def _normalised_address(channel: str, address: str) -> str:
    # As the contact policy looks addresses up: trimmed, and lower-case for email.
    cleaned = address.strip()
    return cleaned.lower() if channel == "email" else cleaned


def record_delivery_events(
    store: Store, events: Sequence[DeliveryEvent], *, now: datetime | None = None
) -> FeedbackOutcome:
    """Store verified events once and apply what they say; one transaction per call."""
    outcome = FeedbackOutcome()
    unique: dict[str, DeliveryEvent] = {}
    for event in events:
        key = _raw_key(event.raw_id)
        if key in unique:
            outcome.duplicates.append(key)
        else:
            unique[key] = event
    if not unique:
        return outcome
    received = now or utcnow()
    with store.session() as session:
        insert = _insert_for(session)
        rows = [
            {
                "raw_id": key,
                # Ours are at most 80 characters; anything longer is not one of ours.
                "message_id": event.message_id
                if event.message_id and len(event.message_id) <= 80
                else None,
                "provider": event.provider[:40],
                "status": event.status,
                "address": _bounded(event.address, 320),
                "reason": _bounded(event.reason, 500),
                "url": _bounded(event.url, 2000),
                "occurred_at": event.occurred_at,
                "received_at": received,
            }
            # Sorted: two overlapping batches then wait on each other in one order, never both.
            for key, event in sorted(unique.items())
        ]
        # Insert first: on SQLite this takes the write lock before anything is read.
        new: set[str] = set()
        for chunk in _chunks(rows):
            statement = (
                insert(DeliveryEventRow)
                .values(list(chunk))
                .on_conflict_do_nothing(index_elements=["raw_id"])
                .returning(col(DeliveryEventRow.raw_id))
            )
            new.update(session.execute(statement).scalars())
        outcome.duplicates.extend(key for key in unique if key not in new)
        fresh = sorted(
            ((key, event) for key, event in unique.items() if key in new),
            key=lambda pair: pair[1].occurred_at,
        )
        outcome.recorded = [key for key, _event in fresh]
        if fresh:
            _apply(session, fresh, outcome, received)
        session.commit()
    return outcome


def _ledger_rows(
    session: Session, events: Sequence[tuple[str, DeliveryEvent]]
) -> tuple[dict[str, Message], dict[str, Message]]:
    """The ledger rows the events are about, locked, by message id and by provider's id."""
    ids = sorted({e.message_id for _key, e in events if e.message_id})
    provider_ids = sorted({e.provider_message_id for _key, e in events if e.provider_message_id})
    by_id: dict[str, Message] = {}
    by_provider: dict[str, Message] = {}
    conditions = []
    if ids:
        conditions.append(col(Message.message_id).in_(ids))
    if provider_ids:
        conditions.append(col(Message.provider_message_id).in_(provider_ids))
    if not conditions:
        return by_id, by_provider
    found = session.exec(
        select(Message)
        .where(or_(*conditions))
        .order_by(col(Message.message_id))  # one lock order: concurrent callbacks never deadlock
        .with_for_update()
    )
    for message in found:
        by_id[message.message_id] = message
        if message.provider_message_id:
            by_provider[message.provider_message_id] = message
    return by_id, by_provider


def _match(
    event: DeliveryEvent, by_id: dict[str, Message], by_provider: dict[str, Message]
) -> Message | None:
    return (by_id.get(event.message_id) if event.message_id else None) or (
        by_provider.get(event.provider_message_id) if event.provider_message_id else None
    )


def _apply(
    session: Session,
    events: Sequence[tuple[str, DeliveryEvent]],
    outcome: FeedbackOutcome,
    now: datetime,
) -> None:
    by_id, by_provider = _ledger_rows(session, events)
    insert = _insert_for(session)
    # Lock the profiles consent may change in one order, so concurrent batches never deadlock.
    for consent_owner in sorted(
        {
            message.customer_id
            for _key, event in events
            if event.hard_bounce or event.status in ("complained", "unsubscribed")
            for message in [_match(event, by_id, by_provider)]
            if message is not None
        }
    ):
        _profile(session, consent_owner)
    for key, event in events:
        message = _match(event, by_id, by_provider)
        moved = False
        if message is None:
            outcome.unmatched.append(key)
        else:
            if event.message_id != message.message_id:
                session.execute(
                    update(DeliveryEventRow)
                    .where(col(DeliveryEventRow.raw_id) == key)
                    .values(message_id=message.message_id)
                )
            moved = _advance(message, event, now)
            if moved:
                outcome.moved[message.message_id] = message.status
            session.add(message)
        channel = message.channel if message else PROVIDER_CHANNELS.get(event.provider)
        customer_id = message.customer_id if message else None
        if channel and (event.hard_bounce or event.status == "complained"):
            what = "spam complaint" if event.status == "complained" else "hard bounce"
            address = event.address or (message.recipient if message else None)
            if address and address.strip():
                cleaned = _normalised_address(channel, address)[:320]
                session.execute(
                    insert(Suppression)
                    .values(
                        channel=channel,
                        address=cleaned,
                        reason=f"{what}: {event.reason or event.status}"[:500],
                        source=event.provider[:100],
                        created_at=now,
                    )
                    .on_conflict_do_nothing(index_elements=["channel", "address"])
                )
                outcome.suppressed.append((channel, cleaned))
            if customer_id:
                detail = f"{what} reported by {event.provider}" + (
                    f": {event.reason}" if event.reason else ""
                )
                if _revoke(session, customer_id, channel, event.provider, detail, now):
                    outcome.consent_revoked.append((customer_id, channel))
        elif channel and customer_id and event.status == "unsubscribed":
            detail = f"unsubscribed at {event.provider}" + (
                f": {event.reason}" if event.reason else ""
            )
            if _revoke(session, customer_id, channel, event.provider, detail, now):
                outcome.consent_revoked.append((customer_id, channel))
        # Every open and click counts (Envío Inteligente weighs them); a delivery, bounce,
        # complaint or unsubscribe is the customer's event once, when it moves the message.
        if message is not None and (event.status in ("opened", "clicked") or moved):
            stored = _engagement(session, insert, key, event, message, now)
            if stored is not None:
                outcome.engagement.append(stored)


def _advance(message: Message, event: DeliveryEvent, now: datetime) -> bool:
    """Move the ledger row as far as the event says; True when its status changed."""
    if event.status == "delivered" and message.delivered_at is None:
        message.delivered_at = event.occurred_at
    elif event.status == "opened" and message.opened_at is None:
        message.opened_at = event.occurred_at
    elif event.status == "clicked" and message.clicked_at is None:
        message.clicked_at = event.occurred_at
    current = MESSAGE_PROGRESS.get(message.status, 0)
    if event.status == "failed":
        # The send "failed" ranks below "sent"; a provider's failure ends a sent message.
        moves = message.status != "failed" and current < _DELIVERED
    else:
        moves = MESSAGE_PROGRESS[event.status] > current
    if moves:
        message.status = event.status
        if event.status in ("bounced", "complained", "failed", "unsubscribed", "deferred"):
            message.reason = _bounded(event.reason, 500) or message.reason
    message.updated_at = now
    return moves


def _profile(session: Session, customer_id: str) -> Profile:
    """The customer's profile, locked, following merges; created when missing."""

    def locked(customer: str) -> Profile | None:
        return session.exec(
            select(Profile).where(col(Profile.customer_id) == customer).with_for_update()
        ).first()

    profile = follow_merges(customer_id, locked, lambda row: row.merged_into)
    if profile is None:
        profile = Profile(customer_id=customer_id)
        session.add(profile)
    return profile


def _set_consent(
    session: Session,
    profile: Profile,
    channel: str,
    granted: bool,
    source: str,
    detail: str,
    now: datetime,
) -> bool:
    """Record a consent change; False when the profile already said so.

    A withdrawal also queues the customer's removal from the ad audiences journeys added them
    to (an ``audiences`` outbox entry, committed with the change): the worker does the
    platforms' calls.
    """
    if profile.consent.get(channel) is granted:
        return False
    change = change_consent(
        session, profile, channel, granted, source=source, detail=detail, at=now
    )
    profile.updated_at = now
    session.add(profile)
    session.add(change)
    return True


def _revoke(
    session: Session, customer_id: str, channel: str, source: str, detail: str, now: datetime
) -> bool:
    return _set_consent(
        session, _profile(session, customer_id), channel, False, source, detail, now
    )


def _engagement(
    session: Session,
    insert: Any,
    key: str,
    event: DeliveryEvent,
    message: Message,
    now: datetime,
) -> str | None:
    """Store what a provider or our tracking said as the customer's event, and queue it for
    their journeys; None when it is not one of the events Hilo emits."""
    name = (
        ENGAGEMENT_EVENTS.get((message.channel, event.status))
        or ENGAGEMENT_FALLBACK.get(event.status)
        or DELIVERY_EVENTS.get((message.channel, event.status))
        or (UNSUBSCRIBED if event.status == "unsubscribed" else None)
    )
    if name is None:
        return None
    event_id = f"fb:{key}"
    if len(event_id) > 200:
        event_id = "fb:sha256:" + hashlib.sha256(key.encode()).hexdigest()
    properties: dict[str, Any] = {
        "message_id": message.message_id,
        "journey_key": message.journey_key,
        "step_id": message.step_id,
        "channel": message.channel,
        "template": message.template,
        "provider": event.provider,
    }
    if event.url:
        properties["url"] = event.url
    if event.status in ("bounced", "complained", "unsubscribed") and event.reason:
        properties["reason"] = event.reason[:500]
    if event.status == "bounced":
        properties["hard_bounce"] = event.hard_bounce
    return _emit(
        session,
        event_id,
        message.customer_id,
        name,
        properties,
        source=event.provider,
        occurred_at=event.occurred_at,
        now=now,
        insert=insert,
    )


def _emit(
    session: Session,
    event_id: str,
    customer_id: str,
    name: str,
    properties: dict[str, Any],
    *,
    source: str,
    occurred_at: datetime,
    now: datetime,
    insert: Any = None,
) -> str | None:
    """Store one of the events Hilo emits, once by id, and queue it for the journeys, in the
    caller's transaction; None when an event of that id was stored before."""
    row = event_row(
        event_id,
        customer_id,
        name,
        properties,
        source=source,
        timestamp=occurred_at,
        received_at=now,
    )
    return event_id if append_events(session.connection(), [row]) else None


# ================================================================ unsubscribe and preferences


def _state(profile: Profile | None, known_topics: Collection[str]) -> PreferenceState:
    stored = (profile.traits.get(PREFERENCES_TRAIT) if profile else None) or {}
    if not isinstance(stored, dict):
        stored = {}
    topics = stored.get("topics")
    try:
        return PreferenceState(
            frequency=stored.get("frequency") or "normal",
            pause_until=stored.get("pause_until"),
            # Never chosen: every topic, as before the customer had a say.
            topics=sorted(known_topics) if topics is None else topics,
            opt_out=bool(profile and profile.consent.get(PREFERENCE_CHANNEL) is False),
        )
    except ValueError:
        # Someone wrote traits.preferences by hand; the page still opens on the defaults.
        return PreferenceState(
            topics=sorted(known_topics),
            opt_out=bool(profile and profile.consent.get(PREFERENCE_CHANNEL) is False),
        )


def current_preferences(
    store: Store, customer_id: str, known_topics: Collection[str] = ()
) -> PreferenceState:
    """What the preference page shows: the stored choices, or everything when none."""
    return _state(store.get_profile(customer_id), known_topics)


def _write_preferences(profile: Profile, state: PreferenceState, now: datetime) -> None:
    stored = {
        "frequency": state.frequency,
        "pause_until": state.pause_until.astimezone(UTC).isoformat() if state.pause_until else None,
        "topics": sorted(state.topics),
        "updated_at": now.astimezone(UTC).isoformat(),
    }
    profile.traits = {**profile.traits, PREFERENCES_TRAIT: stored}
    profile.updated_at = now


def unsubscribe(
    store: Store,
    claims: LinkClaims,
    source: str,
    *,
    known_topics: Collection[str] = (),
    now: datetime | None = None,
) -> bool:
    """Act on a verified unsubscribe link; False when the customer had already left.

    A link with a topic leaves that topic only; without one, the link's channel. The
    message's ledger row moves to unsubscribed either way.
    """
    if claims.kind != "unsubscribe" or not claims.customer_id or not claims.channel:
        raise ValueError("claims: expected a verified unsubscribe link with customer and channel")
    at = now or utcnow()
    detail = f"unsubscribe link in message {claims.message_id}"
    with store.session() as session:
        # The ledger row before the profile: the order record_delivery_events locks them in.
        message = (
            session.exec(
                select(Message)
                .where(col(Message.message_id) == claims.message_id)
                .with_for_update()
            ).first()
            if claims.message_id
            else None
        )
        profile = _profile(session, claims.customer_id)
        if claims.topic:
            state = _state(profile, known_topics)
            changed = claims.topic in state.topics
            if changed:
                state.topics = [topic for topic in state.topics if topic != claims.topic]
                _write_preferences(profile, state, at)
                session.add(profile)
                session.add(
                    change_consent(
                        session,
                        profile,
                        claims.channel,
                        False,
                        source=source,
                        detail=detail,
                        at=at,
                        topic=claims.topic,
                    )
                )
        else:
            changed = _set_consent(session, profile, claims.channel, False, source, detail, at)
        if changed:
            properties: dict[str, Any] = {"channel": claims.channel, "source": source}
            if claims.topic:
                properties["topic"] = claims.topic
            if message is not None:
                properties |= {"message_id": message.message_id, "journey_key": message.journey_key}
            _emit(
                session,
                f"unsubscribed:{uuid.uuid4().hex}",
                profile.customer_id,
                UNSUBSCRIBED,
                properties,
                source=source,
                occurred_at=at,
                now=at,
            )
        unsubscribed = MESSAGE_PROGRESS["unsubscribed"]
        if message is not None and unsubscribed > MESSAGE_PROGRESS.get(message.status, 0):
            message.status = "unsubscribed"
            message.reason = source[:400] + (f" (topic {claims.topic})" if claims.topic else "")
            message.updated_at = at
            session.add(message)
        session.commit()
    return changed


def apply_preferences(
    store: Store,
    customer_id: str,
    change: PreferenceChange,
    *,
    source: str = "preference page",
    known_topics: Collection[str] = (),
    now: datetime | None = None,
) -> PreferenceState:
    """Store what the customer chose on the preference page; the new state.

    Opting out revokes email consent and keeps the other choices as they were; saving
    choices while opted out subscribes again, as the page says.
    """
    at = now or utcnow()
    with store.session() as session:
        profile = _profile(session, customer_id)
        before = _state(profile, known_topics)
        if change.opt_out:
            if _set_consent(
                session, profile, PREFERENCE_CHANNEL, False, source, "unsubscribed on the page", at
            ):
                _emit(
                    session,
                    f"unsubscribed:{uuid.uuid4().hex}",
                    profile.customer_id,
                    UNSUBSCRIBED,
                    {"channel": PREFERENCE_CHANNEL, "source": source},
                    source=source,
                    occurred_at=at,
                    now=at,
                )
            session.commit()
            return before.model_copy(update={"opt_out": True})
        if profile.consent.get(PREFERENCE_CHANNEL) is False:
            _set_consent(
                session, profile, PREFERENCE_CHANNEL, True, source, "saved choices on the page", at
            )
        after = PreferenceState(
            frequency=change.frequency,
            pause_until=change.pause_until,
            topics=sorted(change.topics),
            opt_out=False,
        )
        _write_preferences(profile, after, at)
        session.add(profile)
        was, now_chosen = set(before.topics), set(after.topics)
        for topic in sorted(was ^ now_chosen):
            session.add(
                change_consent(
                    session,
                    profile,
                    PREFERENCE_CHANNEL,
                    topic in now_chosen,
                    source=source,
                    detail="topic chosen on the page"
                    if topic in now_chosen
                    else "topic left on the page",
                    at=at,
                    topic=topic,
                )
            )
        # Journeys hear of it: a win-back that offered the page ends on this event.
        _emit(
            session,
            f"preferences:{uuid.uuid4().hex}",
            profile.customer_id,
            PREFERENCES_UPDATED,
            {
                "channel": PREFERENCE_CHANNEL,
                "frequency": after.frequency,
                "pause_until": after.pause_until.astimezone(UTC).isoformat()
                if after.pause_until
                else None,
                "topics": sorted(after.topics),
                "source": source,
            },
            source=source,
            occurred_at=at,
            now=at,
        )
        session.commit()
    return after
