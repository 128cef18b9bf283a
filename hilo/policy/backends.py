"""How a decision reads and writes the database in one transaction that holds the customer's
lock: SQLite (``BEGIN IMMEDIATE`` in the writer turn) and PostgreSQL (an advisory lock, two
round trips of statements prepared once per connection, on a pool of bare driver
connections). The decision path talks to the driver directly; its ``:name`` SQL becomes the
driver's through :mod:`hilo.db.fastpath`, the one module that rewrites SQL for the driver.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import make_url

from hilo.clock import as_utc
from hilo.db.fastpath import POLICY_PARAMETER_TYPES, pyformat, server_prepared
from hilo.db.store import Store
from hilo.db.writers import writer_turn
from hilo.policy.document import ContactPolicy, SendIntent
from hilo.policy.rules import Scope, Sent, Timing, scopes_for, timings_of

_MARK_USED_SQL = """
    UPDATE contact_reservations SET status = 'used', updated_at = :now
    WHERE message_id = :message_id AND status IN ('reserved', 'used')
"""


_HISTORY_SQL = """
    SELECT reserved_at, channel, category, journey_key FROM contact_reservations
    WHERE customer_id = :customer AND counted AND status IN ('reserved', 'used')
      AND reserved_at > :since
"""
# The address a send's suppression is looked up by: the one it names, else the profile's
# trait, cleaned as normalise_address does (the decision checks that they agree).
_LOOKUP = """coalesce(:address, CASE WHEN :channel = 'email' THEN lower(trim({trait}))
                    ELSE trim({trait}) END)"""
# Everything a decision needs to know first, in one round trip; the history is read for the
# cached policy's horizons (read again on its own when the policy changed meanwhile).
_SNAPSHOT_SQL = """
    SELECT v.policy_version, p.consent, p.timezone, p.traits,
           d.decision, d.reason, d.rule, d.reservation_id, d.decided_at,
           d.policy_version, d.timezone,
           r.id, r.status, {lookup},
           (SELECT s.reason FROM suppressions AS s
            WHERE s.channel = :channel AND s.address = {lookup}),
           (SELECT {aggregate} FROM contact_reservations AS h
            WHERE h.customer_id = :customer AND h.counted AND h.status IN ('reserved', 'used')
              AND h.reserved_at > :since),
           (SELECT max(w.priority) FROM policy_decisions AS w
            WHERE w.customer_id = :customer AND w.defer_until >= :waiting_since)
    FROM (SELECT max(version) AS policy_version FROM contact_policy_versions) AS v
    LEFT JOIN profiles AS p ON p.customer_id = :customer
    LEFT JOIN policy_decisions AS d
           ON d.id = (SELECT max(id) FROM policy_decisions WHERE message_id = :message)
    LEFT JOIN contact_reservations AS r ON r.message_id = :message
"""
_SUPPRESSED_SQL = "SELECT reason FROM suppressions WHERE channel = :channel AND address = :address"
_POLICY_SQL = "SELECT document FROM contact_policy_versions WHERE version = :version"
# The customer's latest marketing message on a channel still counted, for "less often".
_LAST_MARKETING_SQL = """
    SELECT max(reserved_at) FROM contact_reservations
    WHERE customer_id = :customer AND channel = :channel AND category = 'marketing'
      AND status IN ('reserved', 'used') AND reserved_at > :since
"""
# Higher-priority sends still waiting on a DEFER (no later decision for their message).
_WAITING_SQL = """
    SELECT d.journey_key, d.channel, d.category, d.priority, d.defer_until
    FROM policy_decisions AS d
    WHERE d.customer_id = :customer AND d.decision = 'defer' AND d.priority > :priority
      AND d.message_id <> :message AND d.defer_until >= :low AND d.defer_until < :high
      AND d.id = (SELECT max(id) FROM policy_decisions AS l WHERE l.message_id = d.message_id)
    ORDER BY d.priority DESC, d.defer_until
"""
# {guard}: nothing, or the optimistic write's condition (below).
_RESERVATION_INSERT_GUARDED = """
    INSERT INTO contact_reservations (message_id, customer_id, journey_key, channel, category,
        priority, counted, reserved_at, status, release_reason, updated_at)
    SELECT :message_id, :customer_id, :journey_key, :channel, :category,
        :priority, :counted, :decided_at, 'reserved', NULL, :decided_at
    {guard}
    RETURNING id
"""
_RESERVATION_RENEW_GUARDED = """
    UPDATE contact_reservations SET status = 'reserved', release_reason = NULL,
        reserved_at = :decided_at, updated_at = :decided_at, counted = :counted,
        priority = :priority, journey_key = :journey_key, channel = :channel,
        category = :category
    WHERE message_id = :message_id {guard}
    RETURNING id
"""
_RESERVATION_INSERT = _RESERVATION_INSERT_GUARDED.format(guard="")
_RESERVATION_RENEW = _RESERVATION_RENEW_GUARDED.format(guard="")
_DECISION_COLUMNS = (
    "message_id, customer_id, journey_key, channel, category, priority, decision, reason, "
    "rule, defer_until, reservation_id, policy_version, timezone, decided_at"
)
_DECISION_INSERT = f"""
    INSERT INTO policy_decisions ({_DECISION_COLUMNS})
    VALUES (:message_id, :customer_id, :journey_key, :channel, :category, :priority,
        :decision, :reason, :rule, :defer_until, :reservation_id, :policy_version, :timezone,
        :decided_at)
"""
# PostgreSQL: the reservation and its decision in one statement.
_ALLOW_WITH = f"""
    WITH r AS ({{reservation}})
    INSERT INTO policy_decisions ({_DECISION_COLUMNS})
    VALUES (:message_id, :customer_id, :journey_key, :channel, :category, :priority,
        :decision, :reason, :rule, NULL, (SELECT id FROM r), :policy_version, :timezone,
        :decided_at)
    RETURNING reservation_id
"""
# PostgreSQL, optimistic: the ALLOW is written only if nothing it was decided on changed since
# the snapshot: the policy version, and the customer's counted reservations (their number
# and ids; a new one, a renewed one or a release all change them).
_UNCHANGED = """
    SELECT 1 WHERE
      (SELECT coalesce(max(version), 0) FROM contact_policy_versions) = :policy_version
      AND (SELECT count(*) = :seen_count AND coalesce(sum(h.id), 0) = :seen_sum
           FROM contact_reservations AS h
           WHERE h.customer_id = :customer_id AND h.counted
             AND h.status IN ('reserved', 'used') AND h.reserved_at > :since)
"""
_CHECKED_RESERVATION_INSERT = _RESERVATION_INSERT_GUARDED.format(
    guard="WHERE EXISTS (SELECT 1 FROM unchanged)"
)
_CHECKED_RESERVATION_RENEW = _RESERVATION_RENEW_GUARDED.format(
    guard="AND EXISTS (SELECT 1 FROM unchanged)"
)
_CHECKED_ALLOW = f"""
    WITH unchanged AS ({_UNCHANGED}), r AS ({{reservation}})
    INSERT INTO policy_decisions ({_DECISION_COLUMNS})
    SELECT :message_id, :customer_id, :journey_key, :channel, :category, :priority,
        :decision, :reason, :rule, NULL, r.id, :policy_version, :timezone, :decided_at
    FROM r
    RETURNING reservation_id
"""
# The PostgreSQL type of every parameter of the statements prepared on the server.


@dataclass
class _Snapshot:
    policy_version: int
    consent: dict[str, Any]
    profile_timezone: str | None
    traits: dict[str, Any]
    decision: str | None
    reason: str | None
    rule: str | None
    reservation_id: int | None
    decided_at: datetime | None
    decided_version: int | None
    decided_timezone: str | None
    reservation_row: int | None
    reservation_status: str | None
    # The address the suppression below was looked up by, and what it found.
    suppression_address: str | None
    suppressed_because: str | None
    history: list[Sent]
    # How many counted reservations the history holds and the sum of their ids: an optimistic
    # ALLOW is written only if the customer's still match (_UNCHANGED).
    fingerprint: tuple[int, int]
    # The highest priority among this customer's recent DEFERs (some maybe decided since).
    waiting_priority: int | None


class _Transaction:
    """A decision's transaction: its cursor, and the snapshot read under the lock.

    Optimistic (PostgreSQL): the snapshot was read without the lock, outside any
    transaction; the write checks it still stands, or raises :class:`_Stale`.
    """

    def __init__(
        self,
        cursor: Any,
        snapshot: Sequence[Any],
        optimistic: bool = False,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        self.cursor = cursor
        self.snapshot = snapshot
        self.committed = False  # the write committed it
        self.optimistic = optimistic
        self.params = params or {}
        self.fingerprint = (0, 0)  # of the snapshot's counted reservations, once parsed


class _Stale(Exception):
    """What an optimistic decision was based on changed before its write: decide again,
    under the customer's lock."""


class _Backend:
    """The decision path's SQL on one database: driver-level, few round trips a decision."""

    aggregate: str
    trait: str  # the profile's trait named :trait, as text

    def __init__(self) -> None:
        lookup = _LOOKUP.format(trait=self.trait)
        self.snapshot_source = _SNAPSHOT_SQL.format(aggregate=self.aggregate, lookup=lookup)
        self.snapshot_sql = self.prepare(self.snapshot_source)
        self.history_sql = self.prepare(_HISTORY_SQL)
        self.suppressed_sql = self.prepare(_SUPPRESSED_SQL)
        self.policy_sql = self.prepare(_POLICY_SQL)
        self.waiting_sql = self.prepare(_WAITING_SQL)
        self.last_marketing_sql = self.prepare(_LAST_MARKETING_SQL)

    def prepare(self, sql: str) -> str:
        return sql

    def when(self, moment: datetime | None) -> Any:
        return moment

    def moment(self, value: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return as_utc(value)

    def json(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value

    # Whether decisions may first be tried without the customer's lock (see _Transaction).
    optimistic = False

    def transaction(
        self, lock_key: int, params: Mapping[str, Any], commit: bool, optimistic: bool = False
    ) -> AbstractContextManager[_Transaction]:
        """The customer's transaction, holding their lock, with the snapshot read in it."""
        raise NotImplementedError

    def write(self, tx: _Transaction, reserve: bool, renew: bool, values: dict[str, Any]) -> Any:
        """Store the decision (and its reservation when ``reserve``); the reservation id.
        The transaction commits with it or when it ends."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _SQLiteBackend(_Backend):
    aggregate = (
        "json_group_array(json_array(h.reserved_at, h.channel, h.category, h.journey_key, h.id))"
    )
    trait = "json_extract(p.traits, '$.' || :trait)"

    def __init__(self, store: Store) -> None:
        # The store's connections: no commit of theirs copies the WAL into the database (the
        # store's own thread does), so no decision waits behind a checkpoint.
        self.engine = store.engine
        # Decisions wait for the database's single writer here, in the order they came, and
        # then in turn with ingestion and the dispatcher; SQLite's busy handler would sleep
        # in steps of up to 100 ms instead.
        self.writer = writer_turn(store.engine)
        super().__init__()
        self.reservation_insert = _RESERVATION_INSERT
        self.reservation_renew = _RESERVATION_RENEW
        self.decision_insert = _DECISION_INSERT

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The turn to write: first among this process's decisions, then among all writers."""
        with self.writer:
            yield

    def when(self, moment: datetime | None) -> Any:
        # The text SQLAlchemy stores for DateTime on SQLite, so both read each other's rows.
        if moment is None:
            return None
        return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")

    @contextmanager
    def transaction(
        self, lock_key: int, params: Mapping[str, Any], commit: bool, optimistic: bool = False
    ) -> Iterator[_Transaction]:
        # SQLite has one writer at a time anyway: no optimistic path.
        # A preview only reads: a deferred transaction, out of the writers' way.
        with self._writing() if commit else nullcontext():
            proxied = self.engine.raw_connection()
            connection: Any = proxied.driver_connection
            previous = connection.isolation_level
            # The driver must not open its own transaction: the BEGIN below is ours.
            connection.isolation_level = None
            cursor = connection.cursor()
            try:
                cursor.execute("BEGIN IMMEDIATE" if commit else "BEGIN")
                try:
                    cursor.execute(self.snapshot_sql, params)
                    yield _Transaction(cursor, cursor.fetchone())
                except BaseException:
                    cursor.execute("ROLLBACK")
                    raise
                cursor.execute("COMMIT" if commit else "ROLLBACK")
            finally:
                cursor.close()
                connection.isolation_level = previous
                proxied.close()

    def write(self, tx: _Transaction, reserve: bool, renew: bool, values: dict[str, Any]) -> Any:
        reservation_id = None
        if reserve:
            tx.cursor.execute(self.reservation_renew if renew else self.reservation_insert, values)
            reservation_id = int(tx.cursor.fetchone()[0])
        tx.cursor.execute(self.decision_insert, {**values, "reservation_id": reservation_id})
        return reservation_id


class _PostgresBackend(_Backend):
    """Two round trips a decision: optimistic first (see _Transaction), else BEGIN, the lock
    and the snapshot; the writes and COMMIT.

    The snapshot and the writes are prepared on the server once per connection (``PREPARE``)
    and run as ``EXECUTE`` with their values bound on the client, so that each round trip is
    one simple query of several statements, with nothing to plan.
    """

    aggregate = (
        "json_agg(json_build_array(h.reserved_at, h.channel, h.category, h.journey_key, h.id))"
    )
    trait = "(p.traits ->> :trait)"
    optimistic = True

    def __init__(self, url: str) -> None:
        import psycopg

        self._client_cursor: Any = psycopg.ClientCursor
        self._failed = psycopg.OperationalError
        self._integrity = psycopg.IntegrityError
        super().__init__()
        # Connections of its own, in autocommit, so BEGIN travels with the snapshot and
        # COMMIT with the write; not pinged when taken, one round trip less (a dead one is
        # retried instead).
        # psycopg's own pool (bare driver connections: SQLAlchemy's pool cost about a tenth
        # of a decision's CPU in events and resets a decision does not need); each new
        # connection prepares the decision statements once.
        from psycopg_pool import ConnectionPool

        self.connections = ConnectionPool(
            _libpq_url(url),
            min_size=1,
            max_size=20,
            kwargs={"autocommit": True},
            configure=self._prepare_connection,
            name="hilo-policy",
            open=True,
        )
        self._prepares: list[str] = []
        snapshot = self._server_prepared("hilo_policy_snapshot", self.snapshot_source)
        # The lock is a statement of its own: the snapshot, the statement after it, sees what
        # the previous holder committed (READ COMMITTED takes a snapshot per statement).
        self.locked_snapshot = (
            "BEGIN ISOLATION LEVEL READ COMMITTED; "
            f"SELECT pg_advisory_xact_lock(%(lock)s); {snapshot}"
        )
        self.unlocked_snapshot = f"BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY; {snapshot}"
        self.decision_insert = self._server_prepared("hilo_policy_decision", _DECISION_INSERT)
        self.allow_insert = self._server_prepared(
            "hilo_policy_allow", _ALLOW_WITH.format(reservation=_RESERVATION_INSERT)
        )
        self.allow_renew = self._server_prepared(
            "hilo_policy_allow_again", _ALLOW_WITH.format(reservation=_RESERVATION_RENEW)
        )
        self.checked_allow_insert = self._server_prepared(
            "hilo_policy_allow_checked",
            _CHECKED_ALLOW.format(reservation=_CHECKED_RESERVATION_INSERT),
        )
        self.checked_allow_renew = self._server_prepared(
            "hilo_policy_allow_again_checked",
            _CHECKED_ALLOW.format(reservation=_CHECKED_RESERVATION_RENEW),
        )
        self.lone_snapshot = snapshot

    def prepare(self, sql: str) -> str:
        return pyformat(sql)

    def _server_prepared(self, name: str, sql: str) -> str:
        """Record ``PREPARE name`` for ``sql``; the ``EXECUTE`` that runs it."""
        prepare, execute = server_prepared(name, sql, POLICY_PARAMETER_TYPES)
        self._prepares.append(prepare)
        return execute

    def _prepare_connection(self, connection: Any) -> None:
        for statement in self._prepares:
            connection.execute(statement)

    @contextmanager
    def transaction(
        self, lock_key: int, params: Mapping[str, Any], commit: bool, optimistic: bool = False
    ) -> Iterator[_Transaction]:
        # A preview only reads: no lock, nobody waits for it. An optimistic decision reads
        # its snapshot alone, in one statement outside any transaction.
        if optimistic:
            sql = self.lone_snapshot
        else:
            sql = self.locked_snapshot if commit else self.unlocked_snapshot
        values = {**params, "lock": lock_key}
        proxied, cursor = self._begin(sql, values)
        try:
            while cursor.nextset():  # to the last statement's result: the snapshot
                pass
            tx = _Transaction(cursor, cursor.fetchone(), optimistic, values)
            yield tx
            if not tx.committed and not optimistic:  # nothing written: end the transaction
                cursor.execute("ROLLBACK")
        except BaseException:
            self._abandon(proxied, cursor)
            raise
        finally:
            cursor.close()
            proxied.close()

    def _begin(self, sql: str, values: Mapping[str, Any]) -> tuple[Any, Any]:
        """A pooled connection and its cursor, ``sql`` run; a connection found dead in the
        pool is replaced once."""
        for attempt in range(2):
            proxied = _Pooled(self.connections.getconn(), self.connections)
            connection: Any = proxied.driver_connection
            cursor = self._client_cursor(connection)
            try:
                cursor.execute(sql, values)
            except self._failed:
                if attempt or not connection.broken:
                    self._abandon(proxied, cursor)
                    cursor.close()
                    proxied.close()
                    raise
                cursor.close()
                proxied.invalidate()
                # The server closed one: the others idle beside it likely went too.
                self.connections.check()
                continue
            except BaseException:
                self._abandon(proxied, cursor)
                cursor.close()
                proxied.close()
                raise
            return proxied, cursor
        raise AssertionError("unreachable")

    def _abandon(self, proxied: Any, cursor: Any) -> None:
        """Roll back what the connection began; a broken connection leaves the pool."""
        try:
            cursor.execute("ROLLBACK")
        except self._failed:
            proxied.invalidate()

    def write(self, tx: _Transaction, reserve: bool, renew: bool, values: dict[str, Any]) -> Any:
        if tx.optimistic:
            return self._write_checked(tx, reserve, renew, values)
        if reserve:
            sql = self.allow_renew if renew else self.allow_insert
        else:
            sql, values = self.decision_insert, {**values, "reservation_id": None}
        tx.cursor.execute(f"{sql}; COMMIT", values)
        tx.committed = True
        return tx.cursor.fetchone()[0] if reserve else None

    def _write_checked(
        self, tx: _Transaction, reserve: bool, renew: bool, values: dict[str, Any]
    ) -> Any:
        """An optimistic decision's write. A SKIP or a DEFER holds nothing back from anyone:
        stored as it is, one statement, no lock. An ALLOW takes the customer's lock and is
        written only if its snapshot still stands; otherwise :class:`_Stale`."""
        cursor = tx.cursor
        if not reserve:
            cursor.execute(self.decision_insert, {**values, "reservation_id": None})
            tx.committed = True
            return None
        sql = self.checked_allow_renew if renew else self.checked_allow_insert
        checked = {
            **values,
            "lock": tx.params["lock"],
            "since": tx.params["since"],
            "seen_count": tx.fingerprint[0],
            "seen_sum": tx.fingerprint[1],
        }
        try:
            cursor.execute(f"BEGIN; SELECT pg_advisory_xact_lock(%(lock)s); {sql}; COMMIT", checked)
        except self._integrity as error:  # the same message decided at the same moment
            cursor.execute("ROLLBACK")
            raise _Stale(str(error)) from error
        row = None
        while True:  # past BEGIN's and the lock's results, to the ALLOW's
            described = cursor.description
            if described is not None and described[0].name == "reservation_id":
                row = cursor.fetchone()
                break
            if not cursor.nextset():
                break
        if row is None:
            raise _Stale("the customer's reservations or the policy changed")
        tx.committed = True
        return row[0]

    def close(self) -> None:
        self.connections.close()


def _libpq_url(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://...``) as libpq reads it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class _Pooled:
    """A connection taken from the pool: ``close`` gives it back, ``invalidate`` discards it."""

    __slots__ = ("_pool", "driver_connection")

    def __init__(self, connection: Any, pool: Any) -> None:
        self.driver_connection = connection
        self._pool: Any = pool

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:  # once: after invalidate() it is gone already
            pool.putconn(self.driver_connection)

    def invalidate(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            self.driver_connection.close()
            pool.putconn(self.driver_connection)  # a closed connection is discarded


@dataclass(frozen=True)
class _Plan:
    """What a policy says for one kind of send (channel, category, journey), worked out once."""

    scopes: list[Scope]
    timings: list[Timing]
    horizon: timedelta | None  # how far back any cap or gap can look, in any time zone

    @classmethod
    def of(cls, policy: ContactPolicy, intent: SendIntent) -> _Plan:
        scopes = scopes_for(policy, intent)
        horizons: list[timedelta] = []
        for scope in scopes:
            if scope.rules.min_gap is not None:
                horizons.append(scope.rules.min_gap)
            for cap in scope.rules.caps:
                rolling = cap.rolling
                # A local day or week started at most this long ago, in any zone.
                horizons.append(
                    rolling
                    if rolling is not None
                    else timedelta(days=2 if cap.window == "calendar_day" else 8)
                )
        horizon = max(horizons) + timedelta(seconds=1) if horizons else None
        return cls(scopes, timings_of(scopes), horizon)

    def since(self, now: datetime) -> datetime | None:
        return None if self.horizon is None else now - self.horizon
