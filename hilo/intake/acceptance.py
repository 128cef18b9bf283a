"""Acceptance: every call a source sends lands on one profile, committed before we answer.

One transaction per request stores the events, the identities, the profile changes, the
consent changes and the outbox rows that the dispatcher turns into Temporal starts and
signals. So an event Hilo acknowledged is never lost, whatever Temporal is doing, and a
repeated ``messageId`` is stored and routed once.

Identity: a ``userId`` is the customer. An ``anonymousId`` alone is an anonymous profile
keyed by that id; when an ``identify`` (or ``alias``) ties it to a ``userId``, the
anonymous profile is merged into the known one: events, journey entries, messages,
consent and devices move, traits merge (the known profile's win), and the running journey
instances are told who their customer is now.

Trust: a client source's write key is public (it ships in a page or an app), so its calls
may create and enrich anonymous profiles and the profile a call names, but not merge two
known customers, change an identified customer's email or phone, take a device from
another known customer, or grant consent. A server source may; consent the customer
withdrew anywhere but in a Segment trait (an unsubscribe link, the preference page, a
complaint, a STOP reply, the consent API) comes back only with the proof the source states
in ``context.consent.source``. Each such change, applied or not, is a
:class:`ProfileChange` on the customer's timeline; the call itself is stored either way,
so one refused change never costs a batch its page views.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from hilo.clock import utcnow
from hilo.customers.consent import CONSENT_CHANNELS
from hilo.db.consent import change_consent
from hilo.db.models import (
    LIVE_STATUSES,
    ConsentChange,
    Device,
    Identity,
    JourneyInstance,
    Message,
    OutboxEntry,
    Profile,
    ProfileChange,
    StoredEvent,
)
from hilo.db.outbox import append_events, event_row, queue
from hilo.db.store import Store
from hilo.db.writers import writer_turn
from hilo.events import PAGE_VIEWED, SCREEN_VIEWED, CustomerEvent
from hilo.intake.sources import WriteKeySource

# Segment's page and screen calls reach journeys under the names its destinations use.
EVENT_NAMES = {"page": PAGE_VIEWED, "screen": SCREEN_VIEWED}
# Calls that journeys can trigger on or listen to; identify, group and alias change the
# profile and are kept on its timeline, but start nothing.
ROUTED_TYPES = frozenset({"track", "page", "screen"})
# Traits that are also ways to find the customer.
ADDRESS_IDENTITIES = {"email": "email", "phone": "phone"}
# The identity and device columns' sizes: a longer trait is no address (it stays a trait)
# and a longer token no device, rather than a failed request.
MAX_ADDRESS_CHARS = 320
MAX_DEVICE_TOKEN_CHARS = 2000
CONFLICT_ATTEMPTS = 5  # each lost race means another request stored what it raced for
# The detail of a consent change a Segment trait stated without proof: a withdrawal with
# this detail is the only one a plain trait may undo.
PLAIN_TRAIT = "identify traits"
MAX_PROOF_CHARS = 500  # ConsentChange.detail
NEEDS_SERVER = "needs a server source"

# Built once, the ids bound on each run (building them per request cost more than the
# queries themselves), over the tables rather than the models: plain statements, which the
# ORM need not compile.
_identity_table = Identity.__table__  # type: ignore[attr-defined]
_profile_table = Profile.__table__  # type: ignore[attr-defined]
_device_table = Device.__table__  # type: ignore[attr-defined]
_IDENTITIES = select(_identity_table.c.value, _identity_table.c.customer_id).where(
    _identity_table.c.kind == bindparam("kind"),
    _identity_table.c.value.in_(bindparam("values", expanding=True)),
)
_STORED_PROFILES = select(
    _profile_table.c.customer_id,
    _profile_table.c.anonymous,
    _profile_table.c.timezone,
    _profile_table.c.locale,
).where(_profile_table.c.customer_id.in_(bindparam("customers", expanding=True)))


class IncomingCall(Protocol):
    """What ingestion needs of a call: a Segment call, or Hilo's own event."""

    @property
    def type(self) -> str: ...
    @property
    def message_id(self) -> str: ...
    @property
    def user_id(self) -> str | None: ...
    @property
    def anonymous_id(self) -> str | None: ...
    @property
    def previous_id(self) -> str | None: ...
    @property
    def event(self) -> str | None: ...
    @property
    def properties(self) -> dict[str, Any]: ...
    @property
    def traits(self) -> dict[str, Any]: ...
    @property
    def context(self) -> dict[str, Any]: ...
    @property
    def timestamp(self) -> datetime: ...
    @property
    def sent_at(self) -> datetime | None: ...
    @property
    def timezone(self) -> str | None: ...
    @property
    def locale(self) -> str | None: ...


@dataclass(frozen=True)
class OwnEvent:
    """A :class:`CustomerEvent` (the ``/events`` API, ``hilo send-event``) as a track call."""

    message_id: str
    user_id: str
    event: str
    properties: dict[str, Any]
    timestamp: datetime
    type: str = "track"
    anonymous_id: str | None = None
    previous_id: str | None = None
    traits: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    sent_at: datetime | None = None
    timezone: str | None = None
    locale: str | None = None

    @classmethod
    def of(cls, event: CustomerEvent) -> OwnEvent:
        return cls(
            message_id=event.message_id,
            user_id=event.customer_id,
            event=event.name,
            properties=event.properties,
            timestamp=event.timestamp,
        )


@dataclass
class Accepted:
    stored: list[str] = field(default_factory=list)  # message ids new to Hilo
    duplicates: list[str] = field(default_factory=list)
    routed: list[str] = field(default_factory=list)  # of the stored, those queued for routing
    customers: dict[str, str] = field(default_factory=dict)  # message id -> customer id
    merges: list[tuple[str, str]] = field(default_factory=list)  # (anonymous, known)


@dataclass(frozen=True)
class _StoredProfile:
    """What most calls need of a stored profile, read as a plain row: building the ORM
    object (its traits and consent too) costs several times as much, and most calls
    change nothing."""

    anonymous: bool
    timezone: str | None
    locale: str | None


@dataclass
class _Batch:
    """The request's view of the database, loaded once and written back once."""

    session: Session
    source: WriteKeySource
    identities: dict[tuple[str, str], str] = field(default_factory=dict)
    new_identities: dict[tuple[str, str], str] = field(default_factory=dict)
    stored: dict[str, _StoredProfile] = field(default_factory=dict)
    profiles: dict[str, Profile] = field(default_factory=dict)  # to change (or created)
    looked_up: set[str] = field(default_factory=set)  # customers read, with a profile or not
    changed: set[str] = field(default_factory=set)
    consent: list[ConsentChange] = field(default_factory=list)
    devices: dict[tuple[str, str], Device] = field(default_factory=dict)
    device_owners: dict[tuple[str, str], str | None] = field(default_factory=dict)
    audit: list[ProfileChange] = field(default_factory=list)


class Ingestor:
    def __init__(self, store: Store) -> None:
        self.store = store
        dialect = store.engine.dialect.name
        self._insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self._writer = writer_turn(store.engine)

    def accept_events(self, events: Sequence[CustomerEvent], source: str = "api") -> Accepted:
        # The caller holds the admin token: a server source (its name checked with the event).
        server = WriteKeySource.model_construct(name=source, kind="server")
        return self.accept([OwnEvent.of(event) for event in events], server)

    def accept(self, calls: Sequence[IncomingCall], source: WriteKeySource) -> Accepted:
        """Store ``calls`` in one transaction; nothing is stored if anything fails."""
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                with self._writer:
                    return self._accept_once(calls, source)
            except IntegrityError:
                # A concurrent request (another process, or any on PostgreSQL) created the
                # same profile first: read it and go again.
                if attempt == CONFLICT_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _accept_once(self, calls: Sequence[IncomingCall], source: WriteKeySource) -> Accepted:
        result = Accepted()
        unique: dict[str, IncomingCall] = {}
        for call in calls:
            if call.message_id in unique:
                result.duplicates.append(call.message_id)
            else:
                unique[call.message_id] = call
        if not unique:
            return result
        with self.store.session() as session:
            batch = _Batch(session=session, source=source)
            self._load(batch, unique.values())
            rows: list[dict[str, Any]] = []
            for call in unique.values():
                customer = self._customer_of(batch, call, result)
                self._apply_profile(batch, call, customer)
                result.customers[call.message_id] = customer
                rows.append(self._event_row(call, customer, source.name))
            self._write_profiles(batch)
            new = append_events(
                session.connection(), rows, heard=lambda row: row["type"] in ROUTED_TYPES
            )
            stored = {row["message_id"] for row in new}
            for row in rows:
                if row["message_id"] in stored:
                    result.stored.append(row["message_id"])
                else:
                    result.duplicates.append(row["message_id"])
            result.routed = [row["message_id"] for row in new if row["type"] in ROUTED_TYPES]
            session.commit()
        return result

    # ------------------------------------------------------------ loading

    def _load(self, batch: _Batch, calls: Iterable[IncomingCall]) -> None:
        keys: set[tuple[str, str]] = set()
        for call in calls:
            if call.user_id:
                keys.add(("user_id", call.user_id))
            if call.anonymous_id:
                keys.add(("anonymous_id", call.anonymous_id))
            if call.previous_id:
                keys.add(("user_id", call.previous_id))
                keys.add(("anonymous_id", call.previous_id))
        # One query per kind: SQLite answers ``(kind, value) IN (...)`` by scanning the whole
        # table, ``kind = ? AND value IN (...)`` from the primary key.
        for kind in sorted({kind for kind, _value in keys}):
            values = sorted(value for k, value in keys if k == kind)
            found = batch.session.connection().execute(
                _IDENTITIES, {"kind": kind, "values": values}
            )
            batch.identities.update(((kind, value), customer) for value, customer in found)
        customers = set(batch.identities.values())
        customers.update(value for _kind, value in keys)
        self._load_profiles(batch, customers)

    def _load_profiles(self, batch: _Batch, customers: set[str]) -> None:
        wanted = sorted(customers - batch.profiles.keys() - batch.looked_up)
        if not wanted:
            return
        batch.looked_up.update(wanted)
        # A profile created in this request is in batch.profiles, not yet in the table.
        for customer, anonymous, timezone, locale in batch.session.connection().execute(
            _STORED_PROFILES, {"customers": wanted}
        ):
            batch.stored[customer] = _StoredProfile(anonymous, timezone, locale)

    def _view(self, batch: _Batch, customer: str) -> Profile | _StoredProfile | None:
        """The customer's profile as this request has it, to read; None if there is none."""
        if customer not in batch.looked_up and customer not in batch.profiles:
            self._load_profiles(batch, {customer})
        return self._read(batch, customer)

    def _read(self, batch: _Batch, customer: str) -> Profile | _StoredProfile | None:
        profile = batch.profiles.get(customer)
        return profile if profile is not None else batch.stored.get(customer)

    # ------------------------------------------------------------ identity

    def _customer_of(self, batch: _Batch, call: IncomingCall, result: Accepted) -> str:
        anonymous = call.anonymous_id
        if call.type == "alias" and call.previous_id and call.user_id:
            earlier = self._known(batch, "user_id", call.previous_id) or self._known(
                batch, "anonymous_id", call.previous_id
            )
            self._identify(batch, call.user_id)
            if earlier and earlier != call.user_id:
                if self._may_merge(batch, call, earlier, call.user_id):
                    self._merge(batch, earlier, call.user_id, result)
            elif not earlier:
                self._link(batch, "anonymous_id", call.previous_id, call.user_id)
            return call.user_id
        if call.user_id:
            self._identify(batch, call.user_id)
            if anonymous:
                earlier = self._known(batch, "anonymous_id", anonymous)
                if earlier is None:
                    self._link(batch, "anonymous_id", anonymous, call.user_id)
                elif earlier != call.user_id and self._is_anonymous(batch, earlier):
                    self._merge(batch, earlier, call.user_id, result)
                # An anonymous id already tied to another known customer stays theirs: a
                # shared device does not merge two people.
            return call.user_id
        assert anonymous, "the parser requires userId or anonymousId"
        known = self._known(batch, "anonymous_id", anonymous)
        if known is not None:
            return known
        self._link(batch, "anonymous_id", anonymous, anonymous)
        self._profile(batch, anonymous, anonymous=True)
        return anonymous

    def _may_merge(self, batch: _Batch, call: IncomingCall, earlier: str, known: str) -> bool:
        """Whether ``earlier`` may be folded into ``known``: always when it is an anonymous
        visitor; a known customer only by a server source, and either way on the record."""
        if self._is_anonymous(batch, earlier):
            return True
        what = f"merge of known customer '{earlier}' into '{known}'"
        return self._record(batch, call, earlier, "merge", what, {"from": earlier, "to": known})

    def _record(
        self,
        batch: _Batch,
        call: IncomingCall,
        customer: str,
        kind: str,
        what: str,
        data: dict[str, Any],
        refusal: str | None = None,
    ) -> bool:
        """Put a trust-bound change on ``customer``'s timeline: applied (True) when the source
        is a server source and no ``refusal`` is given, else not, with the reason."""
        source = batch.source
        if refusal is None and source.kind != "server":
            refusal = NEEDS_SERVER
        if refusal is None:
            summary = f"{what} by {source.kind} source '{source.name}'"
        else:
            summary = f"{what} from {source.kind} source '{source.name}' not applied: {refusal}"
        batch.audit.append(
            ProfileChange(
                customer_id=customer,
                kind=kind,
                applied=refusal is None,
                summary=summary[:500],
                source=source.name,
                message_id=call.message_id,
                data=data,
                changed_at=utcnow(),
            )
        )
        return refusal is None

    def _known(self, batch: _Batch, kind: str, value: str) -> str | None:
        return batch.new_identities.get((kind, value)) or batch.identities.get((kind, value))

    def _identify(self, batch: _Batch, user_id: str) -> None:
        if self._known(batch, "user_id", user_id) is None:
            self._link(batch, "user_id", user_id, user_id)
        view = self._view(batch, user_id)
        if view is None or view.anonymous:
            profile = self._profile(batch, user_id)
            if profile.anonymous:
                profile.anonymous = False
                batch.changed.add(user_id)

    def _link(self, batch: _Batch, kind: str, value: str, customer: str) -> None:
        if batch.identities.get((kind, value)) == customer:
            return
        batch.new_identities[(kind, value)] = customer

    def _is_anonymous(self, batch: _Batch, customer: str) -> bool:
        view = self._read(batch, customer)
        return view is None or view.anonymous

    def _profile(self, batch: _Batch, customer: str, anonymous: bool = False) -> Profile:
        """The customer's profile to change: loaded whole, or created."""
        profile = batch.profiles.get(customer)
        if profile is not None:
            return profile
        if self._view(batch, customer) is not None:
            profile = batch.session.get(Profile, customer)
        if profile is None:
            profile = Profile(customer_id=customer, anonymous=anonymous)
            batch.session.add(profile)
        batch.profiles[customer] = profile
        return profile

    def _merge(self, batch: _Batch, anonymous: str, known: str, result: Accepted) -> None:
        """Fold the anonymous profile into the known one, inside this transaction."""
        session = batch.session
        session.flush()  # pending rows of either customer are written before they move
        source = self._profile(batch, anonymous, anonymous=True)
        target = self._profile(batch, known)
        target.traits = {**source.traits, **target.traits}
        target.consent = {**source.consent, **target.consent}
        target.timezone = target.timezone or source.timezone
        target.locale = target.locale or source.locale
        source.merged_into = known
        source.updated_at = target.updated_at = utcnow()
        batch.changed.update({anonymous, known})
        moved = list(
            session.scalars(
                select(col(JourneyInstance.workflow_id)).where(
                    col(JourneyInstance.customer_id) == anonymous,
                    col(JourneyInstance.status).in_(LIVE_STATUSES),
                )
            )
        )
        for model in (
            StoredEvent,
            JourneyInstance,
            Message,
            ConsentChange,
            ProfileChange,
            Device,
            Identity,
            OutboxEntry,
        ):
            table = model.__table__  # type: ignore[union-attr]
            session.execute(
                update(table).where(table.c.customer_id == anonymous).values(customer_id=known)
            )
        for key, customer in list(batch.identities.items()):
            if customer == anonymous:
                batch.identities[key] = known
        for key, customer in list(batch.new_identities.items()):
            if customer == anonymous:
                batch.new_identities[key] = known
        for device in batch.devices.values():
            if device.customer_id == anonymous:
                device.customer_id = known
        for change in batch.consent:
            if change.customer_id == anonymous:
                change.customer_id = known
        for audited in batch.audit:
            if audited.customer_id == anonymous:
                audited.customer_id = known
        for key, owner in batch.device_owners.items():
            if owner == anonymous:
                batch.device_owners[key] = known
        batch.new_identities[("anonymous_id", anonymous)] = known
        if moved:
            queue(
                session,
                "merge",
                f"merge:{anonymous}:{known}",
                known,
                {"from": anonymous, "to": known, "workflow_ids": moved},
            )
        result.merges.append((anonymous, known))

    # ------------------------------------------------------------ profile

    def _apply_profile(self, batch: _Batch, call: IncomingCall, customer: str) -> None:
        traits = call.traits if call.type == "identify" else {}
        zone = _zone(call.timezone) or _zone(traits.get("timezone"))
        locale = call.locale or traits.get("locale")
        device = (call.context or {}).get("device") or {}
        token = device.get("token") if isinstance(device, dict) else None
        if not traits and not zone and not locale and not token:
            return
        if not traits and not token:
            # Most calls repeat the zone and locale the profile holds: read, not loaded.
            view = self._view(batch, customer)
            if (
                view is not None
                and (not zone or view.timezone == zone)
                and not (isinstance(locale, str) and locale and view.locale != locale[:35])
            ):
                return
        profile = self._profile(batch, customer)
        before = (profile.traits, profile.consent, profile.timezone, profile.locale)
        if traits:
            # Consent is kept apart from the traits, each change with its source and time.
            plain = {name: value for name, value in traits.items() if name != "consent"}
            for trait in ADDRESS_IDENTITIES.values():
                if trait in plain and not self._may_readdress(batch, call, profile, trait):
                    del plain[trait]
            if plain:
                profile.traits = {**profile.traits, **plain}
            for kind, trait in ADDRESS_IDENTITIES.items():
                value = plain.get(trait)
                if isinstance(value, str) and value.strip():
                    address = _address(trait, value)
                    if len(address) > MAX_ADDRESS_CHARS:
                        continue
                    if self._known(batch, kind, address) is None:
                        self._link(batch, kind, address, customer)
            consent = traits.get("consent")
            if isinstance(consent, dict):
                self._consent(batch, call, profile, consent)
        if zone and profile.timezone != zone:
            profile.timezone = zone
        if isinstance(locale, str) and locale and profile.locale != locale[:35]:
            profile.locale = locale[:35]
        if isinstance(token, str) and token and len(token) <= MAX_DEVICE_TOKEN_CHARS:
            self._device(batch, call, customer, "push", token, device)
        # A call that repeats what the profile holds (the locale of every page view) writes
        # nothing.
        if (profile.traits, profile.consent, profile.timezone, profile.locale) != before:
            profile.updated_at = utcnow()
            batch.changed.add(customer)

    def _may_readdress(
        self, batch: _Batch, call: IncomingCall, profile: Profile, trait: str
    ) -> bool:
        """Whether ``trait`` (email, phone) may take the call's value: always on an anonymous
        profile, the first time, or when it repeats the address; a change of an identified
        customer's address only from a server source, and either way on the record."""
        current, value = profile.traits.get(trait), call.traits.get(trait)
        if profile.anonymous or not isinstance(current, str) or not current.strip():
            return True
        if isinstance(value, str) and _address(trait, value) == _address(trait, current):
            return True
        what = f"{trait} change"
        data = {"from": current, "to": value}
        return self._record(batch, call, profile.customer_id, trait, what, data)

    def _consent(
        self, batch: _Batch, call: IncomingCall, profile: Profile, consent: dict[str, Any]
    ) -> None:
        """The one consent writer of ingestion. Anyone may withdraw; a grant needs a server
        source, and consent the customer withdrew also the proof the source states."""
        proof = _proof(call) if batch.source.kind == "server" else None
        for channel, granted in consent.items():
            if channel not in CONSENT_CHANNELS or not isinstance(granted, bool):
                continue  # the parser already refused these; identify traits are free-form
            current = profile.consent
            if current.get(channel) is granted:
                continue
            if granted and not self._may_grant(batch, call, profile, channel, current, proof):
                continue
            batch.consent.append(
                change_consent(
                    batch.session,
                    profile,
                    channel,
                    granted,
                    source=batch.source.name,
                    detail=proof or PLAIN_TRAIT,
                    at=call.timestamp,
                    # Ingestion's batch writes in bulk; the ad audiences keep their own
                    # removal paths (unsubscribe, preference page, consent API, feedback).
                    leave_audiences=False,
                )
            )

    def _may_grant(
        self,
        batch: _Batch,
        call: IncomingCall,
        profile: Profile,
        channel: str,
        current: dict[str, Any],
        proof: str | None,
    ) -> bool:
        what = f"{channel} consent grant"
        data = {"channel": channel}
        if batch.source.kind != "server":
            return self._record(batch, call, profile.customer_id, "consent", what, data)
        if proof is not None or current.get(channel) is not False:
            return True
        withdrawal = self._withdrawal(batch, profile.customer_id, channel)
        if withdrawal is None or withdrawal.detail == PLAIN_TRAIT:
            return True  # a trait said no, a trait may say yes
        by = withdrawal.source + (f": {withdrawal.detail}" if withdrawal.detail else "")
        refusal = (
            f"the customer withdrew it ({by[:200]}); state the proof in context.consent.source "
            f"(1 to {MAX_PROOF_CHARS} characters)"
        )
        self._record(batch, call, profile.customer_id, "consent", what, data, refusal)
        return False

    def _withdrawal(self, batch: _Batch, customer: str, channel: str) -> ConsentChange | None:
        """The change that withdrew the channel's consent: of this request, or stored.
        None only when consent was set without a record (``PUT /profiles``)."""
        for change in reversed(batch.consent):
            if change.customer_id == customer and change.channel == channel:
                return change
        with batch.session.no_autoflush:
            # The latest written, as that is what the profile's consent says now.
            return batch.session.scalars(
                select(ConsentChange)
                .where(
                    col(ConsentChange.customer_id) == customer,
                    col(ConsentChange.channel) == channel,
                    col(ConsentChange.topic).is_(None),
                    col(ConsentChange.granted).is_(False),
                )
                .order_by(col(ConsentChange.id).desc())
                .limit(1)
            ).first()

    def _device(
        self,
        batch: _Batch,
        call: IncomingCall,
        customer: str,
        kind: str,
        address: str,
        device: dict[str, Any],
    ) -> None:
        owner = self._device_owner(batch, kind, address)
        if owner is not None and owner != customer and not self._is_anonymous(batch, owner):
            what = f"{kind} device move from '{owner}' to '{customer}'"
            data = {"kind": kind, "from": owner, "to": customer}
            if not self._record(batch, call, owner, "device", what, data):
                return
        at = call.timestamp
        batch.device_owners[(kind, address)] = customer
        batch.devices[(kind, address)] = Device(
            customer_id=customer,
            kind=kind,
            address=address,
            data={k: v for k, v in device.items() if k != "token"},
            platform=str(device.get("type") or "")[:40] or None,
            created_at=at,
            updated_at=at,
        )

    def _device_owner(self, batch: _Batch, kind: str, address: str) -> str | None:
        key = (kind, address)
        if key not in batch.device_owners:
            found = batch.session.connection().execute(
                select(_device_table.c.customer_id).where(
                    _device_table.c.kind == kind, _device_table.c.address == address
                )
            )
            batch.device_owners[key] = found.scalar()
        owner = batch.device_owners[key]
        if owner is not None:
            self._view(batch, owner)  # loaded, so _is_anonymous can tell
        return owner

    # ------------------------------------------------------------ writing

    def _write_profiles(self, batch: _Batch) -> None:
        session = batch.session
        for customer in batch.changed:
            profile = batch.profiles.get(customer)
            if profile is not None:
                session.add(profile)
        fresh = [
            {
                "kind": kind,
                "value": value,
                "customer_id": customer,
                "source": batch.source.name,
                "created_at": utcnow(),
            }
            for (kind, value), customer in batch.new_identities.items()
            if (kind, value) not in batch.identities
        ]
        if fresh:
            # Parameter sets rather than a VALUES list: the statement compiles once, cached.
            session.execute(self._insert(Identity).on_conflict_do_nothing(), fresh)
        for (kind, value), customer in batch.new_identities.items():
            if (kind, value) in batch.identities:  # re-pointed by a merge
                session.execute(
                    update(Identity)
                    .where(col(Identity.kind) == kind, col(Identity.value) == value)
                    .values(customer_id=customer)
                )
        session.add_all(batch.consent)
        session.add_all(batch.audit)
        for (kind, address), device in batch.devices.items():
            existing = session.scalars(
                select(Device).where(col(Device.kind) == kind, col(Device.address) == address)
            ).first()
            if existing is None:
                session.add(device)
            else:
                existing.customer_id = device.customer_id
                existing.data = device.data
                existing.active = True
                existing.updated_at = device.updated_at
                session.add(existing)
        session.flush()

    def _event_row(self, call: IncomingCall, customer: str, source: str) -> dict[str, Any]:
        name = call.event if call.type == "track" else EVENT_NAMES.get(call.type)
        return event_row(
            call.message_id,
            customer,
            (name or call.type.capitalize())[:200],
            call.traits if call.type == "identify" else call.properties,
            type=call.type,
            context=call.context,
            user_id=call.user_id,
            anonymous_id=call.anonymous_id,
            source=source,
            timestamp=call.timestamp,
            sent_at=call.sent_at,
            received_at=utcnow(),
        )


def _address(trait: str, value: str) -> str:
    """The address as its identity keeps it: emails are compared without case."""
    return value.strip().lower() if trait == "email" else value.strip()


def _proof(call: IncomingCall) -> str | None:
    """What a server source states as the customer's consent, ``context.consent.source``."""
    consent = (call.context or {}).get("consent")
    proof = consent.get("source") if isinstance(consent, dict) else None
    if isinstance(proof, str) and proof.strip() and len(proof) <= MAX_PROOF_CHARS:
        return proof.strip()
    return None


def _zone(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        return None  # an unknown zone is ignored, not an error: the default applies
    return value
