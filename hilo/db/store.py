"""The database: journeys and their versions, profiles, events, instances, the message ledger.

SQLite (WAL) is the embedded default and PostgreSQL the production database. Tables come
from the Alembic migrations in ``hilo/db/migrations``; :meth:`Store.migrate` applies them.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    and_,
    bindparam,
    case,
    delete,
    event,
    func,
    or_,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.expression import Executable
from sqlmodel import Session, col, create_engine, select, update

from hilo.clock import utcnow
from hilo.db.consent import change_consent
from hilo.db.models import (
    ENTRY_STARTING,
    LIVE_STATUSES,
    CapturedMessage,
    DeliveryEventRow,
    Device,
    DispatcherLease,
    Journey,
    JourneyInstance,
    JourneyNote,
    JourneyVersion,
    Message,
    OutboxEntry,
    Profile,
    StoredEvent,
)
from hilo.db.outbox import append_events, event_row
from hilo.db.rows import DeviceRow, EventRow, LedgerRow, ProfileRow

if TYPE_CHECKING:
    from hilo.db.fastpath import DriverSends

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
logger = logging.getLogger(__name__)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while the worker writes; busy_timeout waits instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    # The WAL is copied into the database by a thread of its own (WalCheckpointer): left to
    # SQLite, the commit that crosses 1,000 pages does it, and every writer queued behind that
    # commit waits the copy and its fsync. The high threshold stays as a bound if that thread
    # cannot keep up.
    cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    cursor.close()


WAL_AUTOCHECKPOINT_PAGES = 20_000  # about 80 MB of 4 KiB pages


class WalCheckpointer:
    """Copies a SQLite file's WAL into the database every ``interval`` seconds, out of every
    request's way (a PASSIVE checkpoint waits for no reader or writer).

    It holds the engine weakly: a store dropped without :meth:`Store.dispose` ends it too.
    """

    def __init__(self, engine: Engine, interval: float = 0.5) -> None:
        self._engine = weakref.ref(engine)
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hilo-wal-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            engine = self._engine()
            if engine is None:
                return
            try:
                with engine.connect() as connection:
                    connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except Exception:  # a locked or closing database: the next turn tries again
                logger.debug("WAL checkpoint skipped", exc_info=True)
            del engine

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # A pool as large as the worker's activity threads: SQLAlchemy's default (5, plus
        # overflow connections closed on return) would open and set up connections all day.
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 10},
            pool_size=32,
            max_overflow=96,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@dataclass(frozen=True)
class EntryStatements:
    """The statements of an event's way into a journey and out of it (store the event,
    find the last entry, record the new one, mark the event routed, record the end), built
    once with bound parameters: every journey runs each.

    A statement built per call costs its construction and its cache key every time, more
    CPU than SQLite needs to run it; one built once is compiled once and reused.
    """

    stored_event: Executable
    routed: Executable
    latest_entry: Executable
    entry_of_trigger: Executable
    entering: Executable
    started: Executable
    refused: Executable
    ended: Executable

    @classmethod
    def build(cls, insert: Any) -> EntryStatements:
        events = StoredEvent.__table__  # type: ignore[attr-defined]
        instances = JourneyInstance.__table__  # type: ignore[attr-defined]
        entries_so_far = (
            select(func.coalesce(func.max(instances.c.entry), 0) + 1)
            .where(instances.c.workflow_id == bindparam("workflow_id"))
            .scalar_subquery()
        )
        # ``the_`` names: those of columns are the insert's and the update's own.
        this_entry = and_(
            instances.c.workflow_id == bindparam("the_workflow_id"),
            instances.c.trigger_message_id == bindparam("the_trigger_message_id"),
        )
        return cls(
            stored_event=select(events).where(events.c.message_id == bindparam("message_id")),
            routed=update(events)
            .where(events.c.message_id == bindparam("the_message_id"))
            .values(routed_at=bindparam("now")),
            latest_entry=select(instances)
            .where(instances.c.workflow_id == bindparam("workflow_id"))
            .order_by(instances.c.entry.desc())
            .limit(1),
            entry_of_trigger=select(instances).where(this_entry),
            # Nothing when this event made an entry already, or when another entry took
            # the number meanwhile (either unique key): the caller reads which.
            entering=insert(instances)
            .values(
                workflow_id=bindparam("workflow_id"),
                entry=entries_so_far,
                journey_key=bindparam("journey_key"),
                version=bindparam("version"),
                customer_id=bindparam("customer_id"),
                instance_key=bindparam("instance_key"),
                trigger_message_id=bindparam("trigger_message_id"),
                status=ENTRY_STARTING,
                holdout=False,
                started_at=bindparam("started_at"),
            )
            .on_conflict_do_nothing()
            .returning(*instances.c),
            # An end the workflow wrote first stays: only a starting entry becomes active.
            started=update(instances)
            .where(this_entry)
            .values(
                run_id=bindparam("the_run_id"),
                status=case(
                    (instances.c.status == ENTRY_STARTING, "active"),
                    else_=instances.c.status,
                ),
            ),
            refused=delete(instances).where(this_entry, instances.c.status == ENTRY_STARTING),
            # The workflow's own entry, by its trigger (or, for an entry recorded without
            # one, its run id); written once, so a retried or late end changes nothing.
            ended=update(instances)
            .where(
                instances.c.workflow_id == bindparam("the_workflow_id"),
                or_(
                    instances.c.trigger_message_id == bindparam("the_trigger_message_id"),
                    instances.c.run_id == bindparam("the_run_id"),
                ),
                instances.c.status.in_(LIVE_STATUSES),
            )
            .values(
                run_id=bindparam("the_run_id"),
                holdout=bindparam("new_holdout"),
                status=bindparam("new_status"),
                exit_reason=bindparam("new_exit_reason"),
                ended_at=bindparam("new_ended_at"),
                converted_at=bindparam("new_converted_at"),
                revenue=bindparam("new_revenue"),
            ),
        )


def traits_with_paths(
    traits: dict[str, Any], values: dict[str, Any], unset: Sequence[str]
) -> dict[str, Any]:
    """``traits`` with ``values`` set and ``unset`` removed, a dotted name reaching into an
    object trait (a new dict at each level: JSON columns see the change)."""
    merged = dict(traits)
    for name, value in values.items():
        head, dot, rest = name.partition(".")
        if not dot:
            merged[name] = value
            continue
        inner = merged.get(head)
        merged[head] = traits_with_paths(
            inner if isinstance(inner, dict) else {}, {rest: value}, []
        )
    for name in unset:
        head, dot, rest = name.partition(".")
        if not dot:
            merged.pop(name, None)
        elif isinstance(merged.get(head), dict):
            merged[head] = traits_with_paths(merged[head], {}, [rest])
    return merged


class Store:
    """Database access shared by the API, the router and the activities."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._insert = (
            postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        )
        self._checkpointer: WalCheckpointer | None = None
        if self.engine.dialect.name == "sqlite" and self.engine.url.database not in (
            None,
            "",
            ":memory:",
        ):
            self._checkpointer = WalCheckpointer(self.engine)
        # Bumped by every catalog change made through this store, so that in-process caches
        # of the published journeys (the router's) know to read them again.
        self.catalog_generation = 0

    @cached_property
    def entry_sql(self) -> EntryStatements:
        return EntryStatements.build(self._insert)

    @cached_property
    def sends(self) -> DriverSends:
        """The send path, on the driver's connection (:mod:`hilo.db.fastpath`)."""
        from hilo.db.fastpath import DriverSends

        return DriverSends(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def dispose(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.engine.dispose()

    # ------------------------------------------------------------ profiles

    def get_profile(self, customer_id: str) -> Profile | None:
        """The customer's profile; an anonymous id merged into a known one leads there."""
        found = self.profile_row(customer_id)
        if found is None:
            return None
        with self.session() as session:
            return session.get(Profile, found.customer_id)

    def profile_row(self, customer_id: str) -> ProfileRow | None:
        """The fields of the profile :meth:`get_profile` finds that the journeys read,
        without building a model of it: the model costs more than the read."""
        return self.sends.profile_row(customer_id)

    def upsert_profile(
        self,
        customer_id: str,
        traits: dict[str, Any] | None = None,
        consent: dict[str, Any] | None = None,
        timezone: str | None = None,
        locale: str | None = None,
        unset: list[str] | None = None,
        paths: bool = False,
        source: str = "profile",
    ) -> Profile:
        """Merge traits and consent into the profile, creating it when new.

        With ``paths`` (a journey's update_profile), a dotted name sets or unsets one field
        of an object trait and keeps its others: ``preferences.frequency``.
        """
        for _attempt in range(3):
            with self.session() as session:
                profile = session.get(Profile, customer_id) or Profile(customer_id=customer_id)
                if paths:
                    merged = traits_with_paths(profile.traits, traits or {}, unset or [])
                else:
                    merged = {**profile.traits, **(traits or {})}
                    for name in unset or []:
                        merged.pop(name, None)
                profile.traits = merged
                for channel, granted in (consent or {}).items():
                    if profile.consent.get(channel) is not granted:
                        session.add(
                            change_consent(
                                session, profile, channel, granted, source=source, at=utcnow()
                            )
                        )
                profile.timezone = timezone or profile.timezone
                profile.locale = locale or profile.locale
                profile.updated_at = utcnow()
                session.add(profile)
                try:
                    session.commit()
                except IntegrityError:
                    session.rollback()  # created concurrently: merge into that one
                    continue
                return profile
        raise RuntimeError(f"could not update profile {customer_id!r}")

    # ------------------------------------------------------------ events

    def record_event(
        self,
        message_id: str,
        customer_id: str,
        name: str,
        properties: dict[str, Any],
        timestamp: datetime,
        source: str,
    ) -> bool:
        """Store an event once; False when its message_id was already routed.

        An event stored but not yet routed (routing failed midway) counts as new, so that
        the sender's retry routes it: nothing accepted is lost.
        """
        sql = self.entry_sql
        with self.engine.begin() as connection:
            # Insert first: a repeated message_id is the rare case.
            inserted = append_events(
                connection,
                [
                    event_row(
                        message_id,
                        customer_id,
                        name,
                        properties,
                        source=source,
                        timestamp=timestamp,
                        received_at=utcnow(),
                    )
                ],
                heard=lambda _row: False,  # routed by the caller at once, not by the dispatcher
            )
            if inserted:
                return True
            stored = connection.execute(sql.stored_event, {"message_id": message_id}).first()
        return stored is not None and stored.routed_at is None

    def received_event_names(self, names: Sequence[str]) -> set[str]:
        """Which of ``names`` Hilo has ever stored an event of (one look-up a name, at
        publish; each stops at the first event found)."""
        found = set()
        with self.session() as session:
            for name in sorted(set(names)):
                statement = select(StoredEvent.message_id).where(StoredEvent.name == name)
                if session.exec(statement.limit(1)).first() is not None:
                    found.add(name)
        return found

    def event_routed(self, message_id: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                self.entry_sql.routed, {"the_message_id": message_id, "now": utcnow()}
            )

    # ------------------------------------------------------------ outbox

    def outbox_batch(self, limit: int) -> list[Any]:
        """The oldest pending work, one row an entry, in one query: the entry's ``id``,
        ``kind``, ``message_id``, ``customer_id``, ``payload``, ``available_at`` and
        ``attempts``, and the event it routes as ``event_name``, ``event_customer_id``,
        ``event_properties``, ``event_timestamp`` and ``event_source`` (all None when the
        event row is gone).

        Plain rows, not models: building ORM objects was most of the dispatcher's work."""
        entries = OutboxEntry.__table__  # type: ignore[attr-defined]
        events = StoredEvent.__table__  # type: ignore[attr-defined]
        statement = (
            entries.outerjoin(events, events.c.message_id == entries.c.message_id)
            .select()
            .with_only_columns(
                entries.c.id,
                entries.c.kind,
                entries.c.message_id,
                entries.c.customer_id,
                entries.c.payload,
                entries.c.available_at,
                entries.c.attempts,
                events.c.name.label("event_name"),
                events.c.customer_id.label("event_customer_id"),
                events.c.properties.label("event_properties"),
                events.c.timestamp.label("event_timestamp"),
                events.c.source.label("event_source"),
            )
            .where(entries.c.parked_at.is_(None))
            .order_by(entries.c.id)
            .limit(limit)
        )
        with self.engine.connect() as connection:
            return list(connection.execute(statement))

    def outbox_done(self, entries: Sequence[Any]) -> None:
        """Delivered: drop the entries (rows of :meth:`outbox_batch`, or OutboxEntry) and
        mark their events routed, in one transaction."""
        if not entries:
            return
        outbox = OutboxEntry.__table__  # type: ignore[attr-defined]
        events = StoredEvent.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as connection:
            connection.execute(delete(outbox).where(outbox.c.id.in_([e.id for e in entries])))
            routed = [entry.message_id for entry in entries if entry.kind == "event"]
            if routed:
                connection.execute(
                    update(events).where(events.c.message_id.in_(routed)).values(routed_at=utcnow())
                )

    def outbox_retry(self, entry: Any, error: str, available_at: datetime) -> None:
        """Not delivered: ``entry`` (a row of :meth:`outbox_batch`, or an OutboxEntry) waits
        until ``available_at``."""
        outbox = OutboxEntry.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as connection:
            connection.execute(
                update(outbox)
                .where(outbox.c.id == entry.id)
                .values(
                    attempts=outbox.c.attempts + 1,
                    available_at=available_at,
                    last_error=error[:1000],
                )
            )

    def outbox_park(self, entry: Any, reason: str) -> None:
        """Delivery of ``entry`` failed for good: set it aside with ``reason``; the
        customer's later entries no longer wait for it."""
        outbox = OutboxEntry.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as connection:
            connection.execute(
                update(outbox)
                .where(outbox.c.id == entry.id)
                .values(
                    attempts=outbox.c.attempts + 1, last_error=reason[:1000], parked_at=utcnow()
                )
            )

    def outbox_size(self) -> int:
        """Entries waiting for delivery (dead letters are not waiting)."""
        with self.session() as session:
            statement = select(func.count()).where(col(OutboxEntry.parked_at).is_(None))
            return int(session.exec(statement.select_from(OutboxEntry)).one())

    def dead_letters(self, dropped: bool = False) -> list[OutboxEntry]:
        """Parked entries, oldest first; with ``dropped``, those discarded too."""
        statement = select(OutboxEntry).where(col(OutboxEntry.parked_at).is_not(None))
        if not dropped:
            statement = statement.where(col(OutboxEntry.dropped_at).is_(None))
        with self.session() as session:
            return list(session.exec(statement.order_by(col(OutboxEntry.id))))

    def retry_dead_letter(self, message_id: str) -> OutboxEntry | None:
        """Put a parked entry back in its customer's queue, due now, attempts counted from
        zero; None when no entry of ``message_id`` is parked."""
        return self._settle_dead_letter(
            message_id, parked_at=None, available_at=utcnow(), attempts=0
        )

    def drop_dead_letter(self, message_id: str) -> OutboxEntry | None:
        """Give up on a parked entry: it stays, marked dropped, as the record."""
        return self._settle_dead_letter(message_id, dropped_at=utcnow())

    def _settle_dead_letter(self, message_id: str, **values: Any) -> OutboxEntry | None:
        with self.session() as session:
            entry = session.exec(
                select(OutboxEntry).where(
                    col(OutboxEntry.message_id) == message_id,
                    col(OutboxEntry.parked_at).is_not(None),
                    col(OutboxEntry.dropped_at).is_(None),
                )
            ).first()
            if entry is None:
                return None
            for name, value in values.items():
                setattr(entry, name, value)
            session.add(entry)
            session.commit()
            session.refresh(entry)
            return entry

    def hold_lease(self, name: str, owner: str, ttl: timedelta) -> bool:
        """Take or renew the lease ``name`` for ``owner``; False while another holds it."""
        now = utcnow()
        with self.session() as session:
            taken = session.exec(
                update(DispatcherLease)
                .where(
                    col(DispatcherLease.name) == name,
                    or_(
                        col(DispatcherLease.owner) == owner,
                        col(DispatcherLease.expires_at) < now,
                    ),
                )
                .values(owner=owner, expires_at=now + ttl)
            )
            if taken.rowcount == 0:
                session.add(DispatcherLease(name=name, owner=owner, expires_at=now + ttl))
                try:
                    session.commit()
                except IntegrityError:
                    return False  # another process holds it
                return True
            session.commit()
            return True

    def release_lease(self, name: str, owner: str) -> None:
        with self.session() as session:
            session.exec(
                delete(DispatcherLease).where(
                    col(DispatcherLease.name) == name, col(DispatcherLease.owner) == owner
                )
            )
            session.commit()

    # ------------------------------------------------------------ journeys

    def publish(self, key: str, name: str, checksum: str, definition: dict[str, Any]) -> int:
        """Store a new immutable version and return its number."""
        with self.session() as session:
            journey = session.get(Journey, key)
            if journey is None:
                journey = Journey(key=key, name=name)
                session.add(journey)
                session.flush()
            if journey.status == "archived":
                raise ValueError(f"journey '{key}' is archived; publish it under a new key")
            journey.latest_version += 1
            journey.name = name
            journey.updated_at = utcnow()
            session.add(
                JourneyVersion(
                    journey_key=key,
                    version=journey.latest_version,
                    checksum=checksum,
                    definition=definition,
                )
            )
            session.commit()
            self.catalog_generation += 1
            return journey.latest_version

    def latest_version(self, key: str) -> JourneyVersion | None:
        with self.session() as session:
            journey = session.get(Journey, key)
            if journey is None or journey.latest_version == 0:
                return None
            return session.exec(
                select(JourneyVersion).where(
                    JourneyVersion.journey_key == key,
                    JourneyVersion.version == journey.latest_version,
                )
            ).one()

    def get_version(self, key: str, version: int) -> JourneyVersion | None:
        with self.session() as session:
            return session.exec(
                select(JourneyVersion).where(
                    JourneyVersion.journey_key == key, JourneyVersion.version == version
                )
            ).first()

    def get_journey(self, key: str) -> Journey | None:
        with self.session() as session:
            return session.get(Journey, key)

    def list_journeys(self) -> list[Journey]:
        with self.session() as session:
            return list(session.exec(select(Journey).order_by(Journey.key)))

    def set_journey_status(self, key: str, status: str) -> Journey:
        with self.session() as session:
            journey = session.get(Journey, key)
            if journey is None:
                raise KeyError(key)
            if journey.status == "archived" and status != "archived":
                raise ValueError(f"journey '{key}' is archived and cannot be {status}d")
            journey.status = status
            journey.updated_at = utcnow()
            session.add(journey)
            session.commit()
            self.catalog_generation += 1
            return journey

    def published_journeys(self) -> list[tuple[Journey, JourneyVersion]]:
        """Every journey with its latest version, whatever its status: one query."""
        with self.session() as session:
            rows = session.exec(
                select(Journey, JourneyVersion).join(
                    JourneyVersion,
                    and_(
                        col(JourneyVersion.journey_key) == col(Journey.key),
                        col(JourneyVersion.version) == col(Journey.latest_version),
                    ),
                )
            )
            return [(journey, version) for journey, version in rows]

    # ------------------------------------------------------------ instances

    def get_instance(self, workflow_id: str) -> JourneyInstance | None:
        """The latest entry of an instance."""
        with self.engine.connect() as connection:
            row = connection.execute(
                self.entry_sql.latest_entry, {"workflow_id": workflow_id}
            ).first()
        return JourneyInstance.model_validate(dict(row._mapping)) if row else None

    def record_entry(
        self,
        workflow_id: str,
        journey_key: str,
        version: int,
        customer_id: str,
        instance_key: str | None,
        trigger_message_id: str,
    ) -> tuple[JourneyInstance | None, bool]:
        """Record an entry made by an event, ``starting``, before its workflow starts,
        numbered after the instance's earlier ones: (the entry, whether recorded now).

        An entry this event made before comes back as it is; (None, False) when another
        event's entry took the number meanwhile."""
        with self.engine.begin() as connection:
            row = connection.execute(
                self.entry_sql.entering,
                {
                    "workflow_id": workflow_id,
                    "trigger_message_id": trigger_message_id,
                    "journey_key": journey_key,
                    "version": version,
                    "customer_id": customer_id,
                    "instance_key": instance_key,
                    "started_at": utcnow(),
                },
            ).first()
            if row is not None:
                return JourneyInstance.model_validate(dict(row._mapping)), True
            row = connection.execute(
                self.entry_sql.entry_of_trigger,
                {"the_workflow_id": workflow_id, "the_trigger_message_id": trigger_message_id},
            ).first()
        return (JourneyInstance.model_validate(dict(row._mapping)) if row else None), False

    def instance_started(self, workflow_id: str, trigger_message_id: str, run_id: str) -> None:
        """The entry's workflow runs as ``run_id``: a starting entry becomes active (an end
        the workflow recorded already stays)."""
        with self.engine.begin() as connection:
            connection.execute(
                self.entry_sql.started,
                {
                    "the_workflow_id": workflow_id,
                    "the_trigger_message_id": trigger_message_id,
                    "the_run_id": run_id,
                },
            )

    def entry_refused(self, workflow_id: str, trigger_message_id: str) -> None:
        """Temporal refused the start (another entry runs): forget the starting entry."""
        with self.engine.begin() as connection:
            connection.execute(
                self.entry_sql.refused,
                {"the_workflow_id": workflow_id, "the_trigger_message_id": trigger_message_id},
            )

    def instance_ended(
        self,
        workflow_id: str,
        run_id: str,
        status: str,
        reason: str | None,
        ended_at: datetime,
        converted_at: datetime | None,
        revenue: float | None,
        holdout: bool = False,
        trigger_message_id: str | None = None,
    ) -> None:
        """Record the end of the entry ``trigger_message_id`` made (or, without one, of
        the entry of ``run_id``), once: a repeated end changes nothing."""
        with self.engine.begin() as connection:
            connection.execute(
                self.entry_sql.ended,
                {
                    "the_workflow_id": workflow_id,
                    "the_trigger_message_id": trigger_message_id,
                    "the_run_id": run_id,
                    "new_holdout": holdout,
                    "new_status": status,
                    "new_exit_reason": reason,
                    "new_ended_at": ended_at,
                    "new_converted_at": converted_at,
                    "new_revenue": revenue,
                },
            )

    def active_instances(self, customer_id: str, journey_keys: set[str]) -> list[JourneyInstance]:
        if not journey_keys:
            return []
        with self.session() as session:
            return list(
                session.exec(
                    select(JourneyInstance).where(
                        JourneyInstance.customer_id == customer_id,
                        col(JourneyInstance.status).in_(LIVE_STATUSES),
                        JourneyInstance.journey_key.in_(sorted(journey_keys)),  # type: ignore[attr-defined]
                    )
                )
            )

    def active_instances_of(self, journey_key: str) -> list[JourneyInstance]:
        with self.session() as session:
            return list(
                session.exec(
                    select(JourneyInstance).where(
                        JourneyInstance.journey_key == journey_key,
                        col(JourneyInstance.status).in_(LIVE_STATUSES),
                    )
                )
            )

    def add_journey_note(self, note: dict[str, Any]) -> None:
        """Record a note (every column of JourneyNote but its id) once: a retried activity
        writes nothing more."""
        notes = JourneyNote.__table__  # type: ignore[attr-defined]
        statement = self._insert(notes).values(**note)
        with self.engine.begin() as connection:
            connection.execute(
                statement.on_conflict_do_nothing(index_elements=["run_id", "event_message_id"])
            )

    # ------------------------------------------------------------ messages

    def message_and_profile(
        self,
        message_id: str,
        customer_id: str,
        device_kind: str | None = None,
        event_id: str | None = None,
    ) -> tuple[LedgerRow | None, ProfileRow | None, list[DeviceRow], EventRow | None]:
        """What a send needs to know first, on one connection: its ledger row, the profile,
        the customer's active devices of ``device_kind`` and the triggering event.

        Driver calls, no session and no models: this runs before every send, and building
        any of them costs more than the reads.
        """
        return self.sends.message_and_profile(message_id, customer_id, device_kind, event_id)

    def queue_message(self, message: dict[str, Any]) -> dict[str, Any]:
        """Write the ledger row (every column of Message) before the provider is called;
        the content to send: this one's, or the one an earlier attempt queued, whose attempt
        it counts."""
        return self.sends.queue_message(message)

    def message_outcome(
        self,
        message_id: str,
        status: str,
        reason: str | None = None,
        provider_message_id: str | None = None,
        also: Sequence[tuple[str, dict[str, Any]]] = (),
    ) -> None:
        """What the provider answered: sent (with its id) or failed (with the reason); ``also``
        (SQL with ``:name`` parameters, and their values) runs in the same transaction.

        One UPDATE; feedback that already moved the row on (delivered, opened ...) keeps
        its status, and a provider id or a sent time already there is kept.
        """
        now = utcnow()
        self.sends.message_outcome(
            {
                "message_id": message_id,
                "status": status,
                "reason": reason,
                "provider_message_id": provider_message_id,
                "sent_at": now if status == "sent" else None,
                "now": now,
            },
            also,
        )

    def audience_messages(self, customer_id: str) -> list[Message]:
        """The customer's audience adds and removals that went out, oldest first."""
        with self.session() as session:
            return list(
                session.exec(
                    select(Message)
                    .where(
                        col(Message.customer_id) == customer_id,
                        col(Message.channel) == "audience",
                        col(Message.status) == "sent",
                    )
                    .order_by(col(Message.sent_at), col(Message.created_at))
                )
            )

    def devices_reached(self, message_id: str) -> dict[str, str]:
        """The devices a message's provider already accepted, by device key: provider id."""
        prefix = f"device:{message_id}:"
        with self.session() as session:
            rows = session.exec(
                select(DeliveryEventRow).where(
                    col(DeliveryEventRow.message_id) == message_id,
                    col(DeliveryEventRow.raw_id).startswith(prefix),
                )
            )
            return {row.raw_id[len(prefix) :]: row.reason or "" for row in rows}

    def device_reached(
        self, message_id: str, provider: str, device_key: str, provider_message_id: str
    ) -> None:
        """Record that the provider accepted a message for one of the customer's devices, so a
        retry of the send skips that device (kept with the provider's other answers)."""
        with self.session() as session:
            session.add(
                DeliveryEventRow(
                    raw_id=f"device:{message_id}:{device_key}",
                    message_id=message_id,
                    provider=provider[:40],
                    status="sent",
                    reason=provider_message_id[:500],
                    occurred_at=utcnow(),
                )
            )
            try:
                session.commit()
            except IntegrityError:
                session.rollback()  # a retry that got this far already recorded it

    def retire_device(self, kind: str, address: str) -> bool:
        """Switch off a push token or web-push subscription the provider says is gone for
        good, so no send uses it again; False when it was off already."""
        with self.session() as session:
            result = session.exec(
                update(Device)
                .where(col(Device.kind) == kind, col(Device.address) == address, col(Device.active))
                .values(active=False, updated_at=utcnow())
            )
            session.commit()
            return bool(result.rowcount)

    def register_device(
        self, customer_id: str, kind: str, address: str, data: dict[str, Any] | None = None
    ) -> Device:
        """Add or move a push token / web-push subscription to ``customer_id``."""
        with self.session() as session:
            device = session.exec(
                select(Device).where(col(Device.kind) == kind, col(Device.address) == address)
            ).first() or Device(customer_id=customer_id, kind=kind, address=address)
            device.customer_id = customer_id
            device.data = data or device.data
            device.active = True
            device.updated_at = utcnow()
            session.add(device)
            session.commit()
            return device

    def record_message(self, message: Message) -> Message:
        """Insert a ledger row once; a second writer gets the first row back."""
        with self.session() as session:
            session.add(message)  # insert first: a duplicate is the rare case
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                stored = session.get(Message, message.message_id)
                assert stored is not None
                return stored
            return message

    def messages(
        self, customer_id: str | None = None, journey_key: str | None = None
    ) -> list[Message]:
        with self.session() as session:
            query = select(Message)
            if customer_id is not None:
                query = query.where(Message.customer_id == customer_id)
            if journey_key is not None:
                query = query.where(Message.journey_key == journey_key)
            return list(session.exec(query.order_by(Message.scheduled_at)))  # type: ignore[arg-type]

    def captured(self, customer_id: str | None = None) -> list[CapturedMessage]:
        with self.session() as session:
            query = select(CapturedMessage)
            if customer_id is not None:
                query = query.where(CapturedMessage.customer_id == customer_id)
            return list(session.exec(query.order_by(CapturedMessage.id)))  # type: ignore[arg-type]

    def capture(self, message: dict[str, Any]) -> int:
        """Store what the capture provider received (every column of CapturedMessage but
        its id), once per message id; its row id."""
        return self.sends.capture(message)

    def instances_of_customer(self, customer_id: str) -> list[JourneyInstance]:
        with self.session() as session:
            return list(
                session.exec(
                    select(JourneyInstance).where(JourneyInstance.customer_id == customer_id)
                )
            )

    def list_versions(self, key: str) -> list[JourneyVersion]:
        """Every published version of a journey, oldest first."""
        with self.session() as session:
            return list(
                session.exec(
                    select(JourneyVersion)
                    .where(JourneyVersion.journey_key == key)
                    .order_by(JourneyVersion.version)  # type: ignore[arg-type]
                )
            )
