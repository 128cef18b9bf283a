"""The send path's reads and writes on SQLite's own driver connection.

Every message runs these (its ledger row, the profile, the devices, the trigger; the queued
row, the capture, the outcome), each a statement or two that SQLite answers in tens of
microseconds. SQLAlchemy's execution around each (pool, context, result processing) cost
more than the statement; here they are plain ``sqlite3`` calls on a pooled connection.

Values are written as SQLAlchemy writes them on SQLite (JSON as text, a moment as its UTC
wall time ``YYYY-MM-DD HH:MM:SS.ffffff``), so both read each other's rows. PostgreSQL keeps
the SQLAlchemy statements of :class:`hilo.storage.SendStatements`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine

from hilo.storage import DeviceRow, EventRow, LedgerRow, ProfileRow

_MOMENT = "%Y-%m-%d %H:%M:%S.%f"

_LEDGER_SQL = (
    "SELECT message_id, status, reason, provider_message_id, content FROM messages "
    "WHERE message_id = ?"
)
_PROFILE_SQL = (
    "SELECT customer_id, traits, consent, timezone, locale, merged_into FROM profiles "
    "WHERE customer_id = ?"
)
_EVENT_SQL = (
    "SELECT message_id, customer_id, name, properties, timestamp FROM events WHERE message_id = ?"
)
_DEVICES_SQL = (
    "SELECT address, data FROM devices WHERE customer_id = ? AND kind = ? AND active = 1 "
    "ORDER BY updated_at DESC"
)
_LEDGER_COLUMNS = (
    "message_id, workflow_id, run_id, journey_key, journey_version, customer_id, step_id, "
    "iteration, channel, template, category, content, status, reason, provider, "
    "provider_message_id, recipient, attempts, scheduled_at, created_at, sent_at, "
    "delivered_at, opened_at, clicked_at, updated_at"
)
_QUEUE_SQL = f"""
    INSERT INTO messages ({_LEDGER_COLUMNS})
    VALUES ({", ".join(":" + name for name in _LEDGER_COLUMNS.split(", "))})
    ON CONFLICT (message_id) DO NOTHING
    RETURNING message_id
"""
_COUNT_ATTEMPT_SQL = (
    "UPDATE messages SET attempts = attempts + 1, updated_at = ? WHERE message_id = ?"
)
_CONTENT_SQL = "SELECT content FROM messages WHERE message_id = ?"
# As SendStatements.outcome: feedback that moved the row on keeps its status, and a provider
# id or a sent time already there is kept.
_OUTCOME_SQL = """
    UPDATE messages SET
        status = CASE WHEN status = 'queued' THEN :status ELSE status END,
        reason = :reason,
        provider_message_id = coalesce(:provider_message_id, provider_message_id),
        sent_at = coalesce(:sent_at, sent_at),
        updated_at = :now
    WHERE message_id = :message_id
"""
_CAPTURE_COLUMNS = (
    "message_id, channel, template, customer_id, journey_key, step_id, recipient, content, "
    "captured_at"
)
_CAPTURE_SQL = f"""
    INSERT INTO captured_messages ({_CAPTURE_COLUMNS})
    VALUES ({", ".join(":" + name for name in _CAPTURE_COLUMNS.split(", "))})
    ON CONFLICT (message_id) DO NOTHING
    RETURNING id
"""
_CAPTURED_ID_SQL = "SELECT id FROM captured_messages WHERE message_id = ?"


def stored(value: Any) -> Any:
    """A parameter as SQLAlchemy stores it on SQLite."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.strftime(_MOMENT)
    if isinstance(value, dict | list):
        return json.dumps(value)
    return value


class SQLiteSends:
    """:class:`hilo.storage.Store`'s send path on SQLite (see the module's docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def _cursor(self, write: bool) -> Iterator[Any]:
        """A cursor on a pooled connection; ``write``: in a transaction committed at the end."""
        proxied = self.engine.raw_connection()
        connection: Any = proxied.driver_connection
        previous = connection.isolation_level
        connection.isolation_level = None  # our BEGIN, not the driver's
        cursor = connection.cursor()
        try:
            if not write:
                yield cursor
                return
            cursor.execute("BEGIN")
            try:
                yield cursor
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")
        finally:
            cursor.close()
            connection.isolation_level = previous
            proxied.close()

    def _profile(self, cursor: Any, customer_id: str) -> ProfileRow | None:
        found = None
        wanted = customer_id
        for _hop in range(5):  # merges chain at most a few times; never loop on bad data
            row = cursor.execute(_PROFILE_SQL, (wanted,)).fetchone()
            if row is None:
                return None
            customer, traits, consent, timezone, locale, merged_into = row
            found = ProfileRow(
                customer, json.loads(traits), json.loads(consent), timezone, locale, merged_into
            )
            if found.merged_into is None:
                break
            wanted = found.merged_into
        return found

    def profile_row(self, customer_id: str) -> ProfileRow | None:
        with self._cursor(write=False) as cursor:
            return self._profile(cursor, customer_id)

    def message_and_profile(
        self, message_id: str, customer_id: str, device_kind: str | None, event_id: str | None
    ) -> tuple[LedgerRow | None, ProfileRow | None, list[DeviceRow], EventRow | None]:
        with self._cursor(write=False) as cursor:
            row = cursor.execute(_LEDGER_SQL, (message_id,)).fetchone()
            message = None
            if row is not None:
                message = LedgerRow(row[0], row[1], row[2], row[3], json.loads(row[4]))
            profile = self._profile(cursor, customer_id)
            event = None
            if event_id:
                row = cursor.execute(_EVENT_SQL, (event_id,)).fetchone()
                if row is not None:
                    moment = datetime.fromisoformat(row[4])  # naive, as SQLAlchemy reads it
                    event = EventRow(row[0], row[1], row[2], json.loads(row[3]), moment)
            devices: list[DeviceRow] = []
            if device_kind is not None:
                owner = profile.customer_id if profile else customer_id
                devices = [
                    DeviceRow(address, json.loads(data))
                    for address, data in cursor.execute(_DEVICES_SQL, (owner, device_kind))
                ]
        return message, profile, devices, event

    def queue_message(self, message: Mapping[str, Any]) -> dict[str, Any]:
        with self._cursor(write=True) as cursor:
            values = {name: stored(value) for name, value in message.items()}
            if cursor.execute(_QUEUE_SQL, values).fetchone() is not None:
                return dict(message["content"])
            cursor.execute(_COUNT_ATTEMPT_SQL, (values["updated_at"], values["message_id"]))
            content = cursor.execute(_CONTENT_SQL, (values["message_id"],)).fetchone()[0]
        return dict(json.loads(content))

    def message_outcome(
        self,
        values: Mapping[str, Any],
        also: Sequence[tuple[str, Mapping[str, Any]]],
    ) -> None:
        with self._cursor(write=True) as cursor:
            cursor.execute(_OUTCOME_SQL, {name: stored(value) for name, value in values.items()})
            for sql, parameters in also:
                cursor.execute(sql, {name: stored(value) for name, value in parameters.items()})

    def capture(self, message: Mapping[str, Any]) -> int:
        with self._cursor(write=True) as cursor:
            values = {name: stored(value) for name, value in message.items()}
            inserted = cursor.execute(_CAPTURE_SQL, values).fetchone()
            if inserted is not None:
                return int(inserted[0])
            return int(cursor.execute(_CAPTURED_ID_SQL, (values["message_id"],)).fetchone()[0])
