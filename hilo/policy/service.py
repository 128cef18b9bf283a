"""Política de Contacto: one service decides, for every send, ALLOW, DEFER or SKIP.

The policy is one versioned document (:class:`ContactPolicy`) with four scopes of rules —
``global``, ``channels.<channel>``, ``categories.<category>``, ``journeys.<journey>`` — each
able to say: caps (``count`` messages per rolling ``window`` such as ``24h``, or per
``calendar_day`` / ``calendar_week`` in the customer's time zone), ``min_gap`` between
messages, ``quiet_hours`` and ``allowed_days`` in the customer's time zone. Journey rules also
carry a ``priority``. Every scope that matches a send applies: a send must fit every cap, gap,
quiet window and day list of ``global``, its channel, its category and its journey.

Decision order for one send (:meth:`ContactPolicyService.decide`), first match wins::

    1  consent       SKIP  no consent for the channel (opt-in channels need it even for
                           transactional messages; an email opt-out does not stop them)
    2  suppressions  SKIP  the address is suppressed (hard bounce, complaint ...)
    3  preferences   SKIP  the customer's own choices, for marketing: the send's ``topic`` is
                           one they left on the preference page ("left topic: promotions",
                           any channel); on email, a pause or "less often". No
                           ignore_policy and no exempt category overrides them
    4  ignore_policy ALLOW the step ignores the policy explicitly; the send still counts
    5  exempt        ALLOW exempt_categories (default: transactional); not counted
    6  timing        DEFER min_gap, then quiet_hours and allowed_days: to the first allowed
                           minute in the customer's zone (correct across DST)
    7  caps          SKIP  a cap is full at the time the send could go out
    8  priority      SKIP  taking the last slot of a cap that a higher-priority journey is
                           waiting for (see below)
    9                ALLOW with a reservation that counts towards every cap until released

Priority. Two journeys compete when both want the last free slot of a cap that counts them
both. The service can only arbitrate between sends it knows about, so it defines:

* A send that is ready now takes a free slot unless a *higher-priority* journey is waiting
  for that slot: its latest decision was a DEFER (quiet hours, allowed days, min gap) due
  within the cap window the slot belongs to (the same calendar day/week, or before the slot
  would free again in a rolling window), and not overdue by more than
  :data:`WAITING_GRACE`. The lower-priority send is then **skipped** with reason
  ``lower priority``: caps drop what does not fit (a deferral would only queue it behind the
  same cap and deliver it stale), and the slot stays free for the journey due there.
* Otherwise the first send to ask takes the slot, whatever its priority: a message already
  reserved or sent is never taken back (it may be on its way to the customer). A
  higher-priority send that finds the cap full is skipped with ``cap reached``.
* Equal priorities: first come, first served.

Typical case: at 21:30 both ``welcome`` (priority 10) and ``win_back`` (0) are deferred by
quiet hours to 08:00; whichever workflow wakes first, ``welcome`` gets the day's last slot.

Reservations. An ALLOW reserves a slot (``contact_reservations``, one row per message id);
the send then calls :meth:`~ContactPolicyService.mark_used` after the provider accepted it,
or :meth:`~ContactPolicyService.release` when it failed permanently, which frees the slot.
A reservation never marked either way still counts: the message may have gone out.

Atomicity. Each decision runs in one transaction that holds the customer's lock: SQLite
``BEGIN IMMEDIATE`` (the database's single writer lock), PostgreSQL
``pg_advisory_xact_lock`` on a 64-bit hash of the customer id. Fifty sends racing for the
last slot get exactly one ALLOW on both databases. The decision path talks to the driver
directly, with few statements: on PostgreSQL two round trips (BEGIN, the lock and one read
of everything the decision needs; the writes with COMMIT) of statements prepared once per
connection, on a small pool of its own. On SQLite a process's decisions queue for the
writer in the order they came, in turn with its other writers (ingestion, the dispatcher).

Idempotence. Asking again for the same message id returns the stored ALLOW (while its
reservation is held or used) or the stored SKIP; a DEFER, or an ALLOW whose reservation was
released, is decided afresh. Every decision is stored in ``policy_decisions``.

Envío Inteligente (:meth:`~ContactPolicyService.best_send_time`): the customer's best hour
of the week, learned from their own engagement events (:data:`ENGAGEMENT_WEIGHTS`) of the
last :data:`ENGAGEMENT_LOOKBACK` in their time zone, within a maximum delay and outside the
global quiet hours, with a fallback hour when there is too little data. The message ledger
has no open/click status yet, so only events are read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select, update

from hilo.clock import as_utc, utcnow
from hilo.customers.consent import (
    ADDRESS_TRAITS,
    CONSENT_DEFAULTS,
    FREQUENCY_SPACING_DAYS,
    PREFERENCE_CHANNEL,
    PREFERENCES_TRAIT,
)
from hilo.db.models import (
    ContactPolicyVersion,
    ContactReservation,
    PolicyDecisionRecord,
    Suppression,
)
from hilo.db.store import Store
from hilo.journeys.durations import format_duration
from hilo.policy.audit import diff, summary
from hilo.policy.backends import (
    _MARK_USED_SQL,
    _Backend,
    _Plan,
    _PostgresBackend,
    _Snapshot,
    _SQLiteBackend,
    _Stale,
)
from hilo.policy.document import (
    ENGAGEMENT_WEIGHTS,
    MIN_ENGAGEMENT_SAMPLES,
    TRANSACTIONAL,
    WAITING_GRACE,
    Cap,
    ContactPolicy,
    CurrentPolicy,
    PolicyDecision,
    PolicyInvalid,
    PolicyProblem,
    SendIntent,
    parse_policy,
    zone_or_none,
)
from hilo.policy.rules import (
    Scope,
    Sent,
    Verdict,
    cap_full,
    left_topic,
    local_label,
    lock_key,
    moment_or_none,
    next_allowed,
    normalise_address,
    period,
    priority_of,
)
from hilo.policy.send_time import BestSendTime

__all__ = ["ContactPolicyService"]


class ContactPolicyService(BestSendTime):
    """Decides every send under the current contact policy; stores every answer."""

    def __init__(
        self,
        store: Store,
        engagement_weights: Mapping[str, float] | None = None,
        min_engagement_samples: int = MIN_ENGAGEMENT_SAMPLES,
    ) -> None:
        self.store = store
        self.consent_defaults: dict[str, bool] = dict(CONSENT_DEFAULTS)
        self.address_traits: dict[str, str] = dict(ADDRESS_TRAITS)
        # Channels nothing may reach without an explicit opt-in, transactional or not.
        self.opt_in_channels = frozenset(
            channel for channel, default in CONSENT_DEFAULTS.items() if not default
        )
        self.engagement_weights = dict(engagement_weights or ENGAGEMENT_WEIGHTS)
        self.min_engagement_samples = min_engagement_samples
        dialect = store.engine.dialect.name
        self._backend: _Backend
        if dialect == "sqlite":
            self._backend = _SQLiteBackend(store)
        elif dialect == "postgresql":
            self._backend = _PostgresBackend(store.url)
        else:
            raise ValueError(f"the contact policy supports SQLite and PostgreSQL, not {dialect}")
        self._policy: tuple[int, ContactPolicy] = (0, ContactPolicy())
        self._plans: dict[tuple[int, str, str, str], _Plan] = {}

    def close(self) -> None:
        """Give back the connections of the decision path (PostgreSQL keeps its own pool)."""
        self._backend.close()

    # ------------------------------------------------------------ the policy document

    def _plan(self, version: int, policy: ContactPolicy, intent: SendIntent) -> _Plan:
        key = (version, intent.channel, intent.category, intent.journey_key)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 10_000:
                self._plans.clear()
            plan = self._plans[key] = _Plan.of(policy, intent)
        return plan

    def _policy_version(self, cursor: Any, version: int) -> ContactPolicy:
        cached_version, cached = self._policy
        if cached_version == version:
            return cached
        if version == 0:
            policy = ContactPolicy()
        else:
            cursor.execute(self._backend.policy_sql, {"version": version})
            policy = ContactPolicy.model_validate(self._backend.json(cursor.fetchone()[0]))
        self._policy = (version, policy)
        return policy

    def get_policy(self) -> CurrentPolicy:
        """The policy in force and its version (0 and the defaults when never set)."""
        with self.store.session() as session:
            row = session.exec(
                select(ContactPolicyVersion)
                .order_by(col(ContactPolicyVersion.version).desc())
                .limit(1)
            ).first()
        if row is None:
            return CurrentPolicy(version=0, policy=ContactPolicy())
        return CurrentPolicy(
            version=row.version,
            policy=ContactPolicy.model_validate(row.document),
            actor=row.actor,
            note=row.note,
            created_at=as_utc(row.created_at),
        )

    def set_policy(
        self,
        document: Mapping[str, Any] | ContactPolicy,
        actor: str,
        note: str | None = None,
    ) -> ContactPolicyVersion:
        """Replace the policy; the new version records who, when, why and what changed."""
        policy = parse_policy(document)
        if not actor or not actor.strip():
            raise PolicyInvalid(
                [PolicyProblem(field="actor", problem="say who changes the policy, e.g. 'ana'")]
            )
        for _attempt in range(5):
            current = self.get_policy()
            changes = diff(current.policy.document(), policy.document())
            row = ContactPolicyVersion(
                version=current.version + 1,
                document=policy.document(),
                actor=actor.strip()[:200],
                note=note[:1000] if note else None,
                changes=changes,
                summary=summary(changes)[:2000],
            )
            with self.store.session() as session:
                session.add(row)
                try:
                    session.commit()
                except IntegrityError:
                    session.rollback()  # another change took this number: diff against it
                    continue
                return row
        raise RuntimeError("the contact policy is changing too fast to record a new version")

    def history(self, limit: int = 100) -> list[ContactPolicyVersion]:
        """Every version, newest first."""
        with self.store.session() as session:
            return list(
                session.exec(
                    select(ContactPolicyVersion)
                    .order_by(col(ContactPolicyVersion.version).desc())
                    .limit(limit)
                )
            )

    # ------------------------------------------------------------ decisions

    def decide(self, intent: SendIntent, now: datetime) -> PolicyDecision:
        """ALLOW (with a reservation), DEFER until a time, or SKIP; stored, atomic, idempotent."""
        return self._decide(intent, as_utc(now), persist=True)

    def preview(self, intent: SendIntent, now: datetime) -> PolicyDecision:
        """What :meth:`decide` would answer, without reserving or storing anything."""
        return self._decide(intent, as_utc(now), persist=False)

    def _decide(self, intent: SendIntent, now: datetime, persist: bool) -> PolicyDecision:
        if persist and self._backend.optimistic:
            # First without the customer's lock: a SKIP or DEFER never needs it, and an ALLOW
            # checks at its write that its snapshot still stands. So one customer's decisions
            # wait for each other only when they would ALLOW at the same moment.
            try:
                return self._decide_once(intent, now, persist, optimistic=True)
            except _Stale:
                pass
        return self._decide_once(intent, now, persist, optimistic=False)

    def _decide_once(
        self, intent: SendIntent, now: datetime, persist: bool, optimistic: bool
    ) -> PolicyDecision:
        backend = self._backend
        address = normalise_address(intent.channel, intent.address)
        trait = self.address_traits.get(intent.channel)
        cached_version, cached_policy = self._policy
        since = self._plan(cached_version, cached_policy, intent).since(now)
        params = {
            "customer": intent.customer_id,
            "message": intent.message_id,
            "channel": intent.channel,
            "address": address,
            "trait": trait,
            "since": backend.when(since),
            "waiting_since": backend.when(now - WAITING_GRACE),
        }
        lock = lock_key(intent.customer_id)
        with backend.transaction(lock, params, persist, optimistic) as tx:
            cursor = tx.cursor
            snapshot = self._snapshot(tx.snapshot)
            tx.fingerprint = snapshot.fingerprint
            replay = self._replay(intent, snapshot)
            if replay is not None:
                return replay
            version = snapshot.policy_version
            policy = self._policy_version(cursor, version)
            history = snapshot.history
            plan = self._plan(version, policy, intent)
            if version != cached_version:
                if optimistic:  # the snapshot's history is the old plan's: decide locked
                    raise _Stale("the policy changed")
                history = self._history(cursor, intent, plan.since(now))
            zone = (
                zone_or_none(intent.timezone)
                or zone_or_none(snapshot.profile_timezone)
                or ZoneInfo(policy.default_timezone)
            )
            if address is None and trait:
                found = snapshot.traits.get(trait)
                address = normalise_address(intent.channel, str(found) if found else None)
            suppressed = None
            if address is not None and address == snapshot.suppression_address:
                suppressed = snapshot.suppressed_because
            elif address is not None:  # the snapshot looked up another spelling: ask again
                cursor.execute(
                    backend.suppressed_sql, {"channel": intent.channel, "address": address}
                )
                found_row = cursor.fetchone()
                suppressed = found_row[0] if found_row else None
            priority = priority_of(policy, intent)
            verdict = self._evaluate(
                cursor,
                intent,
                now,
                policy,
                plan,
                zone,
                history,
                consent=snapshot.consent,
                preferences=snapshot.traits.get(PREFERENCES_TRAIT),
                suppressed=suppressed,
                address=address,
                priority=priority,
                waiting_priority=snapshot.waiting_priority,
            )
            reservation_id: int | None = None
            if persist:
                reservation_id = backend.write(
                    tx,
                    reserve=verdict.outcome == "allow",
                    renew=snapshot.reservation_row is not None,
                    values={
                        "message_id": intent.message_id,
                        "customer_id": intent.customer_id,
                        "journey_key": intent.journey_key,
                        "channel": intent.channel,
                        "category": intent.category,
                        "priority": priority,
                        "counted": verdict.counted,
                        "decision": verdict.outcome,
                        "reason": verdict.reason[:500],
                        "rule": verdict.rule,
                        "defer_until": backend.when(verdict.defer_until),
                        "policy_version": version,
                        "timezone": zone.key,
                        "decided_at": backend.when(now),
                    },
                )
            return PolicyDecision(
                message_id=intent.message_id,
                outcome=verdict.outcome,
                reason=verdict.reason,
                rule=verdict.rule,
                defer_until=verdict.defer_until,
                reservation_id=reservation_id,
                decided_at=now,
                policy_version=version,
                timezone=zone.key,
            )

    def _snapshot(self, row: Sequence[Any]) -> _Snapshot:
        backend = self._backend
        counted = backend.json(row[15]) or ()
        history = [
            Sent(as_utc(datetime.fromisoformat(at)), channel, category, journey_key)
            for at, channel, category, journey_key, _id in counted
        ]
        return _Snapshot(
            policy_version=row[0] or 0,
            consent=backend.json(row[1]) or {},
            profile_timezone=row[2],
            traits=backend.json(row[3]) or {},
            decision=row[4],
            reason=row[5],
            rule=row[6],
            reservation_id=row[7],
            decided_at=backend.moment(row[8]),
            decided_version=row[9],
            decided_timezone=row[10],
            reservation_row=row[11],
            reservation_status=row[12],
            suppression_address=row[13],
            suppressed_because=row[14],
            history=history,
            fingerprint=(len(counted), sum(int(entry[4]) for entry in counted)),
            waiting_priority=row[16],
        )

    def _history(self, cursor: Any, intent: SendIntent, since: datetime | None) -> list[Sent]:
        if since is None:
            return []
        backend = self._backend
        cursor.execute(
            backend.history_sql, {"customer": intent.customer_id, "since": backend.when(since)}
        )
        return [
            Sent(as_utc(backend.moment(at) or since), channel, category, journey_key)
            for at, channel, category, journey_key in cursor.fetchall()
        ]

    def _replay(self, intent: SendIntent, snapshot: _Snapshot) -> PolicyDecision | None:
        """The stored answer when it still stands: an ALLOW whose slot is held, or a SKIP."""
        held = snapshot.decision == "allow" and snapshot.reservation_status in ("reserved", "used")
        if not held and snapshot.decision != "skip":
            return None
        assert snapshot.decided_at is not None
        return PolicyDecision(
            message_id=intent.message_id,
            outcome="allow" if held else "skip",
            reason=snapshot.reason or "",
            rule=snapshot.rule,
            reservation_id=snapshot.reservation_id,
            decided_at=snapshot.decided_at,
            policy_version=snapshot.decided_version or 0,
            timezone=snapshot.decided_timezone,
            replayed=True,
        )

    def _evaluate(
        self,
        cursor: Any,
        intent: SendIntent,
        now: datetime,
        policy: ContactPolicy,
        plan: _Plan,
        zone: ZoneInfo,
        history: Sequence[Sent],
        consent: Mapping[str, Any],
        preferences: Any,
        suppressed: str | None,
        address: str | None,
        priority: int,
        waiting_priority: int | None,
    ) -> Verdict:
        channel, category = intent.channel, intent.category
        if channel in self.consent_defaults:
            needed = category != TRANSACTIONAL or channel in self.opt_in_channels
            if needed and consent.get(channel, self.consent_defaults[channel]) is not True:
                return Verdict("skip", f"no consent: {channel}", "consent")
        if suppressed is not None:
            return Verdict(
                "skip", f"suppressed: {address} on {channel} ({suppressed})", "suppressions"
            )
        topic = intent.topic
        if topic is not None and category != TRANSACTIONAL and left_topic(preferences, topic):
            return Verdict("skip", f"left topic: {topic}", "preferences.topics")
        if channel == PREFERENCE_CHANNEL and category != TRANSACTIONAL:
            chosen = self._customer_choice(cursor, intent, now, zone, preferences)
            if chosen is not None:
                return chosen
        exempt = category in policy.exempt_categories
        if intent.ignore_policy:
            return Verdict(
                "allow",
                "the step ignores the contact policy (consent, suppressions and the "
                "customer's own pause and frequency still apply)",
                "ignore_policy",
                counted=not exempt,
            )
        if exempt:
            return Verdict(
                "allow",
                f"{category} messages are exempt from caps, gaps, quiet hours and priority",
                "exempt_categories",
                counted=False,
            )
        scopes = plan.scopes
        # Timing: the earliest moment every gap, quiet window and day list allows.
        at, rule, reason = now, None, ""
        for scope in scopes:
            gap = scope.rules.min_gap
            if gap is None:
                continue
            last = max(
                (s.at for s in history if scope.counts(s.channel, s.category, s.journey_key)),
                default=None,
            )
            if last is not None and last + gap > at:
                at, rule = last + gap, f"{scope.path}.min_gap"
                reason = (
                    f"min gap {format_duration(gap)} between {scope.label()}: "
                    f"the last went out {local_label(last, zone)}"
                )
        timings = plan.timings
        blocking = [timing for timing in timings if timing.blocks(at, zone)]
        if blocking:
            opening = next_allowed(at, zone, timings)
            if opening is None:
                return Verdict(
                    "skip",
                    "the quiet hours and allowed days together leave no time to send",
                    blocking[0].path,
                )
            described = blocking[0].describe(zone)
            reason = f"{reason}; then {described}" if reason else described
            at, rule = opening, blocking[0].path
        # Caps, counted at the moment the send could go out.
        for scope in scopes:
            for index, cap in enumerate(scope.rules.caps):
                full = cap_full(cap, scope, intent, history, at, zone)
                if full is not None:
                    counted, frees = full
                    return Verdict(
                        "skip",
                        f"cap reached: {counted} {scope.label()} of {cap.describe()}"
                        f" ({zone.key}); a slot frees {local_label(frees, zone)}",
                        f"{scope.path}.caps[{index}]",
                    )
        if at > now:
            return Verdict(
                "defer", f"{reason}: wait until {local_label(at, zone)}", rule, defer_until=at
            )
        if waiting_priority is None or waiting_priority <= priority:
            return Verdict("allow", "within the contact policy")  # nobody of higher rank waits
        competitor = self._higher_priority_waiting(
            cursor, intent, now, zone, scopes, history, priority
        )
        if competitor is not None:
            return competitor
        return Verdict("allow", "within the contact policy")

    def _customer_choice(
        self,
        cursor: Any,
        intent: SendIntent,
        now: datetime,
        zone: ZoneInfo,
        preferences: Any,
    ) -> Verdict | None:
        """What the customer chose on the preference page: a pause, or less often.

        Like consent, these are the customer's word, not the brand's rules: no step's
        ``ignore_policy`` and no exempt category overrides them (transactional mail aside).
        A journey message is skipped, not deferred: it would be stale weeks later.
        """
        if not isinstance(preferences, Mapping):
            return None
        pause_until = moment_or_none(preferences.get("pause_until"))
        if pause_until is not None and pause_until > now:
            return Verdict(
                "skip",
                f"paused by the customer until {local_label(pause_until, zone)}",
                "preferences.pause",
            )
        frequency = preferences.get("frequency")
        days = FREQUENCY_SPACING_DAYS.get(frequency) if isinstance(frequency, str) else None
        if days is None:
            return None
        backend = self._backend
        cursor.execute(
            backend.last_marketing_sql,
            {
                "customer": intent.customer_id,
                "channel": intent.channel,
                "since": backend.when(now - timedelta(days=days)),
            },
        )
        row = cursor.fetchone()
        last = backend.moment(row[0]) if row else None
        if last is None:
            return None
        following = last + timedelta(days=days)
        return Verdict(
            "skip",
            f"the customer chose {frequency} {intent.channel}: the last went out "
            f"{local_label(last, zone)}, the next may from {local_label(following, zone)}",
            "preferences.frequency",
        )

    def _higher_priority_waiting(
        self,
        cursor: Any,
        intent: SendIntent,
        now: datetime,
        zone: ZoneInfo,
        scopes: Sequence[Scope],
        history: Sequence[Sent],
        priority: int,
    ) -> Verdict | None:
        """SKIP when this send would take the last slot a higher-priority journey waits for."""
        last_slots: list[tuple[Scope, int, Cap, datetime]] = []
        for scope in scopes:
            for index, cap in enumerate(scope.rules.caps):
                counted = [
                    s.at for s in history if scope.counts(s.channel, s.category, s.journey_key)
                ]
                rolling = cap.rolling
                if rolling is not None:
                    used = sum(1 for moment in counted if moment > now - rolling)
                    window_end = now + rolling
                else:
                    start, window_end = period(cap.window, now, zone)
                    used = sum(1 for moment in counted if start <= moment < window_end)
                if used == cap.count - 1:
                    last_slots.append((scope, index, cap, window_end))
        if not last_slots:
            return None
        high = max(end for *_rest, end in last_slots)
        backend = self._backend
        cursor.execute(
            backend.waiting_sql,
            {
                "customer": intent.customer_id,
                "priority": priority,
                "message": intent.message_id,
                "low": backend.when(now - WAITING_GRACE),
                "high": backend.when(high),
            },
        )
        for journey_key, channel, category, their_priority, due in cursor.fetchall():
            due_at = backend.moment(due)
            if journey_key == intent.journey_key or due_at is None:
                continue
            for scope, index, cap, window_end in last_slots:
                if due_at < window_end and scope.counts(channel, category, journey_key):
                    return Verdict(
                        "skip",
                        f"lower priority: journey {journey_key} (priority {their_priority} > "
                        f"{priority}) is due {local_label(due_at, zone)} for the last slot of "
                        f"{scope.path} cap {cap.describe()}",
                        f"{scope.path}.caps[{index}]",
                    )
        return None

    # ------------------------------------------------------------ reservations

    def used_statement(self, message_id: str) -> tuple[str, dict[str, Any]]:
        """:meth:`mark_used` as SQL with ``:name`` parameters, and their values, for the
        caller's own transaction (the send runs it with the ledger update on the driver's
        connection, saving a commit a message)."""
        return _MARK_USED_SQL, {"message_id": message_id, "now": utcnow()}

    def mark_used(self, message_id: str) -> bool:
        """The provider took the message: its slot stays counted. False if not reserved."""
        return self._set_status(message_id, ("reserved", "used"), status="used")

    def release(self, message_id: str, reason: str) -> bool:
        """The send failed for good: free its slot. False when nothing was reserved."""
        return self._set_status(
            message_id, ("reserved",), status="released", release_reason=reason[:500]
        )

    def _set_status(self, message_id: str, current: tuple[str, ...], **values: Any) -> bool:
        with self.store.session() as session:
            result = session.exec(
                update(ContactReservation)
                .where(
                    col(ContactReservation.message_id) == message_id,
                    col(ContactReservation.status).in_(current),
                )
                .values(updated_at=utcnow(), **values)
            )
            session.commit()
            return bool(result.rowcount)

    def reservation(self, message_id: str) -> ContactReservation | None:
        with self.store.session() as session:
            return session.exec(
                select(ContactReservation).where(ContactReservation.message_id == message_id)
            ).first()

    def decisions(
        self, customer_id: str | None = None, message_id: str | None = None, limit: int = 100
    ) -> list[PolicyDecisionRecord]:
        """Stored decisions, newest first."""
        with self.store.session() as session:
            query = select(PolicyDecisionRecord)
            if customer_id is not None:
                query = query.where(PolicyDecisionRecord.customer_id == customer_id)
            if message_id is not None:
                query = query.where(PolicyDecisionRecord.message_id == message_id)
            rows = session.exec(query.order_by(col(PolicyDecisionRecord.id).desc()).limit(limit))
            return list(rows)

    # ------------------------------------------------------------ suppressions

    def suppress(self, channel: str, address: str, reason: str, source: str) -> Suppression:
        """Stop every send to ``address`` on ``channel``; the first record of it is kept."""
        cleaned = normalise_address(channel, address)
        if cleaned is None:
            raise ValueError("address: give the address to suppress, e.g. ana@example.com")
        with self.store.session() as session:
            row = Suppression(
                channel=channel, address=cleaned, reason=reason[:500], source=source[:100]
            )
            session.add(row)
            try:
                session.commit()
                return row
            except IntegrityError:
                session.rollback()
            stored = session.exec(
                select(Suppression).where(
                    Suppression.channel == channel, Suppression.address == cleaned
                )
            ).one()
            return stored

    def unsuppress(self, channel: str, address: str) -> bool:
        cleaned = normalise_address(channel, address)
        with self.store.session() as session:
            row = session.exec(
                select(Suppression).where(
                    Suppression.channel == channel, Suppression.address == cleaned
                )
            ).first()
            if row is None:
                return False
            session.delete(row)
            session.commit()
            return True

    def suppressions(
        self, channel: str | None = None, address: str | None = None, limit: int = 100
    ) -> list[Suppression]:
        with self.store.session() as session:
            query = select(Suppression)
            if channel is not None:
                query = query.where(Suppression.channel == channel)
            if address is not None:
                cleaned = normalise_address(channel or "", address)
                query = query.where(Suppression.address == cleaned)
            return list(session.exec(query.order_by(col(Suppression.id).desc()).limit(limit)))
