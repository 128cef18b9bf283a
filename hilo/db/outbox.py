"""The one writer of events and their outbox rows.

Everything Hilo stores as an event (what a source sent, what Hilo itself emits: Email
Delivered, Unsubscribed ...) goes through :func:`append_events`: each event once by its
message id, and each newly stored one that journeys hear queued in the outbox, in the
caller's transaction, so an event is never routed without being stored nor stored without
its delivery queued. Outbox entries that carry no event (a merge of two profiles, leaving
ad audiences) are queued by :func:`queue`. The dispatcher reads them in order.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlmodel import Session, col, select

from hilo.db.models import Message, OutboxEntry, StoredEvent

__all__ = ["EVENT_COLUMNS", "append_events", "event_row", "queue", "queue_audience_exit"]

_EVENTS = StoredEvent.__table__  # type: ignore[attr-defined]
_OUTBOX = OutboxEntry.__table__  # type: ignore[attr-defined]
EVENT_COLUMNS = tuple(column.name for column in _EVENTS.columns)


@cache
def _insert_new_events(dialect: str) -> Any:
    # One statement with parameter sets, not a VALUES list: SQLAlchemy caches its compiled
    # form and pages the rows itself ("insertmanyvalues"), within SQLite's parameter limit.
    dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        dialect_insert(_EVENTS)
        .on_conflict_do_nothing(index_elements=["message_id"])
        .returning(_EVENTS.c.message_id)
    )


def event_row(
    message_id: str,
    customer_id: str,
    name: str,
    properties: dict[str, Any],
    *,
    source: str,
    timestamp: datetime,
    received_at: datetime,
    type: str = "track",
    context: dict[str, Any] | None = None,
    user_id: str | None = None,
    anonymous_id: str | None = None,
    sent_at: datetime | None = None,
) -> dict[str, Any]:
    """A whole row of the events table, as :func:`append_events` takes it."""
    return {
        "message_id": message_id,
        "customer_id": customer_id,
        "type": type,
        "name": name,
        "properties": properties,
        "context": context or {},
        "user_id": user_id,
        "anonymous_id": anonymous_id,
        "source": source[:100],
        "timestamp": timestamp,
        "sent_at": sent_at,
        "received_at": received_at,
        "routed_at": None,
    }


def append_events(
    connection: Connection,
    rows: Sequence[Mapping[str, Any]],
    *,
    heard: Callable[[Mapping[str, Any]], bool] = lambda _row: True,
) -> list[Mapping[str, Any]]:
    """Store ``rows`` (whole rows of the events table) once by message id, and queue each
    newly stored one that ``heard`` says journeys listen to; the rows stored now, in order.
    A message id stored before is a duplicate: stored once, queued once."""
    if not rows:
        return []
    stored = set(connection.execute(_insert_new_events(connection.dialect.name), rows).scalars())
    new = [row for row in rows if row["message_id"] in stored]
    routed = [row for row in new if heard(row)]
    if routed:
        # The table, not the model: a plain executemany, without the ORM's bulk path.
        connection.execute(
            insert(_OUTBOX),
            [
                {
                    "kind": "event",
                    "message_id": row["message_id"],
                    "customer_id": row["customer_id"],
                    "payload": {},
                    "created_at": row["received_at"],
                    "available_at": row["received_at"],
                    "attempts": 0,
                }
                for row in routed
            ],
        )
    return new


def queue(
    session: Session,
    kind: str,
    message_id: str,
    customer_id: str,
    payload: dict[str, Any],
    now: datetime | None = None,
) -> None:
    """Queue an outbox entry that carries no event (``merge``, ``audiences``), in the
    session's transaction."""
    entry = OutboxEntry(kind=kind, message_id=message_id, customer_id=customer_id, payload=payload)
    if now is not None:
        entry.created_at = entry.available_at = now
    session.add(entry)


def queue_audience_exit(session: Session, customer_id: str, reason: str, now: datetime) -> None:
    """On a consent withdrawal, in its transaction: an ``audiences`` outbox entry that takes
    the customer out of the ad audiences journeys added them to, when any audience message
    ever went out for them (most customers were never in one)."""
    in_audiences = session.exec(
        select(Message.message_id)
        .where(
            col(Message.customer_id) == customer_id,
            col(Message.channel) == "audience",
            col(Message.status) == "sent",
        )
        .limit(1)
    ).first()
    if in_audiences is None:
        return
    queue(
        session,
        "audiences",
        f"leave-{uuid.uuid4().hex}",
        customer_id,
        {"reason": reason[:300]},
        now,
    )
