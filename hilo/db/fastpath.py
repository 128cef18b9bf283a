"""The fast path: the one module where SQL is written for the database driver itself rather
than through SQLAlchemy, and why.

Everything else uses SQLModel/SQLAlchemy (Core where a statement is hot). Two paths run often
enough that SQLAlchemy's execution around each statement (context, compiled parameters,
result processing, pool events) cost more than the statement, measured when they moved here:

* the send path (:class:`DriverSends`: its ledger row, the profile, the devices, the trigger;
  the queued row, the capture, the outcome): one send alone went from 1,098 to 760 us of CPU
  on SQLite and from 3.4 to 2.3-2.8 ms on PostgreSQL (``bench/send_throughput.py``);
* the contact policy's decision on PostgreSQL (:mod:`hilo.policy.backends`): two round trips
  of statements prepared once per connection (:func:`server_prepared`), on bare connections
  from psycopg's pool.

Their SQL is written with ``:name`` parameters; :func:`pyformat` and :func:`server_prepared`
are the only code that rewrites them for the driver. Values are written as SQLAlchemy writes
them, so both read each other's rows: on SQLite JSON as text and a moment as its UTC wall
time ``YYYY-MM-DD HH:MM:SS.ffffff``; on PostgreSQL JSON as text the server casts, and moments
as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine

from hilo.db.rows import DeviceRow, EventRow, LedgerRow, ProfileRow
from hilo.merges import follow_merges

_MOMENT = "%Y-%m-%d %H:%M:%S.%f"

_LEDGER_SQL = (
    "SELECT message_id, status, reason, provider_message_id, content FROM messages "
    "WHERE message_id = :message_id"
)
_PROFILE_SQL = (
    "SELECT customer_id, traits, consent, timezone, locale, merged_into FROM profiles "
    "WHERE customer_id = :customer_id"
)
_EVENT_SQL = (
    "SELECT message_id, customer_id, name, properties, timestamp FROM events "
    "WHERE message_id = :message_id"
)
_DEVICES_SQL = (
    "SELECT address, data FROM devices WHERE customer_id = :customer_id AND kind = :kind "
    "AND active ORDER BY updated_at DESC"
)

# A ``:name`` parameter of driver-level SQL (not a ``::type`` cast, nor the minutes of a time).
NAMED_PARAMETER = re.compile(r"(?<![:\w]):([a-z_]+)")


def pyformat(sql: str) -> str:
    """Driver-level SQL's ``:name`` parameters as psycopg takes them (``%(name)s``)."""
    return NAMED_PARAMETER.sub(r"%(\1)s", sql)


def server_prepared(name: str, sql: str, types: Mapping[str, str]) -> tuple[str, str]:
    """``PREPARE name (...) AS`` for ``sql``, and the ``EXECUTE`` that runs it with psycopg's
    placeholders; ``types`` gives each ``:name`` parameter's PostgreSQL type."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    body = NAMED_PARAMETER.sub(number, sql)
    declared = ", ".join(types[parameter] for parameter in names)
    execute = f"EXECUTE {name} ({', '.join(f'%({parameter})s' for parameter in names)})"
    return f"PREPARE {name} ({declared}) AS {body}", execute


# The contact policy's decision statements, prepared once per connection: the type of each
# of their parameters (PREPARE declares them; the values are bound on the client).
POLICY_PARAMETER_TYPES = {
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


def _insert_once(table: str, columns: str, returning: str) -> str:
    """A row unless one with its message_id is there already; ``returning`` of the new row."""
    values = ", ".join(":" + name for name in columns.split(", "))
    return (
        f"INSERT INTO {table} ({columns}) VALUES ({values}) "
        f"ON CONFLICT (message_id) DO NOTHING RETURNING {returning}"
    )


_LEDGER_COLUMNS = (
    "message_id, workflow_id, run_id, journey_key, journey_version, customer_id, step_id, "
    "iteration, channel, template, category, content, status, reason, provider, "
    "provider_message_id, recipient, attempts, scheduled_at, created_at, sent_at, "
    "delivered_at, opened_at, clicked_at, updated_at"
)
_QUEUE_SQL = _insert_once("messages", _LEDGER_COLUMNS, "message_id")
_COUNT_ATTEMPT_SQL = (
    "UPDATE messages SET attempts = attempts + 1, updated_at = :now WHERE message_id = :message_id"
)
_CONTENT_SQL = "SELECT content FROM messages WHERE message_id = :message_id"
# Feedback that moved the row on (delivered, opened ...) keeps its status, and a provider id
# or a sent time already there is kept.
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
_CAPTURE_SQL = _insert_once("captured_messages", _CAPTURE_COLUMNS, "id")
_CAPTURED_ID_SQL = "SELECT id FROM captured_messages WHERE message_id = :message_id"


class DriverSends:
    """:class:`hilo.db.store.Store`'s send path on SQLite or PostgreSQL (see the module)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self._sql: dict[str, str] = {}

    def _prepare(self, sql: str) -> str:
        """``:name`` parameters in the driver's style (psycopg's is ``%(name)s``)."""
        if self.sqlite:
            return sql
        prepared = self._sql.get(sql)
        if prepared is None:
            prepared = self._sql[sql] = pyformat(sql)
        return prepared

    def _value(self, value: Any) -> Any:
        """A parameter as SQLAlchemy writes it on this database."""
        if isinstance(value, dict | list):
            return json.dumps(value)
        if self.sqlite and isinstance(value, datetime):
            if value.tzinfo is not None:
                value = value.astimezone(UTC)
            return value.strftime(_MOMENT)
        return value

    def _values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return {name: self._value(value) for name, value in values.items()}

    @staticmethod
    def _json(value: Any) -> Any:
        # SQLite hands JSON back as text; psycopg has decoded it already.
        return json.loads(value) if isinstance(value, str) else value

    @staticmethod
    def _moment(value: Any) -> datetime:
        # Naive, as SQLAlchemy reads DateTime columns back.
        return datetime.fromisoformat(value) if isinstance(value, str) else value

    @contextmanager
    def _cursor(self, write: bool) -> Iterator[Any]:
        """A cursor on a pooled connection; ``write``: in a transaction committed at the end."""
        proxied = self.engine.raw_connection()
        connection: Any = proxied.driver_connection
        if self.sqlite:
            previous = connection.isolation_level
            connection.isolation_level = None  # our BEGIN, not the driver's
        cursor = connection.cursor()
        try:
            if self.sqlite and write:
                cursor.execute("BEGIN")
            try:
                yield _Cursor(cursor, self._prepare)
            except BaseException:
                if write and self.sqlite:
                    cursor.execute("ROLLBACK")
                elif write:
                    connection.rollback()
                raise
            if write and self.sqlite:
                cursor.execute("COMMIT")
            elif write:
                connection.commit()
        finally:
            cursor.close()
            if self.sqlite:
                connection.isolation_level = previous
            proxied.close()  # back to the pool, which ends any read transaction

    def _profile(self, cursor: _Cursor, customer_id: str) -> ProfileRow | None:
        def read(customer: str) -> ProfileRow | None:
            row = cursor.one(_PROFILE_SQL, {"customer_id": customer})
            if row is None:
                return None
            customer, traits, consent, timezone, locale, merged_into = row
            return ProfileRow(
                customer, self._json(traits), self._json(consent), timezone, locale, merged_into
            )

        return follow_merges(customer_id, read, lambda row: row.merged_into)

    def profile_row(self, customer_id: str) -> ProfileRow | None:
        with self._cursor(write=False) as cursor:
            return self._profile(cursor, customer_id)

    def message_and_profile(
        self, message_id: str, customer_id: str, device_kind: str | None, event_id: str | None
    ) -> tuple[LedgerRow | None, ProfileRow | None, list[DeviceRow], EventRow | None]:
        with self._cursor(write=False) as cursor:
            row = cursor.one(_LEDGER_SQL, {"message_id": message_id})
            message = None
            if row is not None:
                message = LedgerRow(row[0], row[1], row[2], row[3], self._json(row[4]))
            profile = self._profile(cursor, customer_id)
            event = None
            if event_id:
                row = cursor.one(_EVENT_SQL, {"message_id": event_id})
                if row is not None:
                    event = EventRow(
                        row[0], row[1], row[2], self._json(row[3]), self._moment(row[4])
                    )
            devices: list[DeviceRow] = []
            if device_kind is not None:
                owner = profile.customer_id if profile else customer_id
                devices = [
                    DeviceRow(address, self._json(data))
                    for address, data in cursor.all(
                        _DEVICES_SQL, {"customer_id": owner, "kind": device_kind}
                    )
                ]
        return message, profile, devices, event

    def queue_message(self, message: Mapping[str, Any]) -> dict[str, Any]:
        with self._cursor(write=True) as cursor:
            if cursor.one(_QUEUE_SQL, self._values(message)) is not None:
                return dict(message["content"])
            the_message = {"message_id": message["message_id"]}
            cursor.run(
                _COUNT_ATTEMPT_SQL, self._values({**the_message, "now": message["updated_at"]})
            )
            row = cursor.one(_CONTENT_SQL, the_message)
            assert row is not None  # the conflict was this row
        return dict(self._json(row[0]))

    def message_outcome(
        self, values: Mapping[str, Any], also: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> None:
        with self._cursor(write=True) as cursor:
            cursor.run(_OUTCOME_SQL, self._values(values))
            for sql, parameters in also:
                cursor.run(sql, self._values(parameters))

    def capture(self, message: Mapping[str, Any]) -> int:
        with self._cursor(write=True) as cursor:
            inserted = cursor.one(_CAPTURE_SQL, self._values(message))
            if inserted is not None:
                return int(inserted[0])
            row = cursor.one(_CAPTURED_ID_SQL, {"message_id": message["message_id"]})
            assert row is not None  # the conflict was this row
            return int(row[0])


class _Cursor:
    """A driver cursor taking ``:name`` SQL, the same on both databases."""

    def __init__(self, cursor: Any, prepare: Callable[[str], str]) -> None:
        self.cursor = cursor
        self.prepare = prepare

    def run(self, sql: str, parameters: Mapping[str, Any]) -> None:
        self.cursor.execute(self.prepare(sql), parameters)

    def one(self, sql: str, parameters: Mapping[str, Any]) -> Any:
        self.run(sql, parameters)
        return self.cursor.fetchone()

    def all(self, sql: str, parameters: Mapping[str, Any]) -> list[Any]:
        self.run(sql, parameters)
        return list(self.cursor.fetchall())
