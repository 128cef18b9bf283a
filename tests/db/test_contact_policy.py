"""Política de Contacto and Envío Inteligente, on SQLite and on PostgreSQL."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import text
from sqlmodel import select
from typer.testing import CliRunner

from api.routes.policy import router as policy_router
from hilo.cli.policy import policy_app
from hilo.db.models import ContactReservation, PolicyDecisionRecord, SendTimeChoice
from hilo.db.store import Store
from hilo.devtools.devserver import free_port
from hilo.feedback.deliveries import apply_preferences
from hilo.feedback.preferences import PreferenceChange
from hilo.policy import ContactPolicyService, PolicyInvalid, SendIntent, parse_policy
from hilo.policy.rules import lock_key
from hilo.settings import Settings

NEW_YORK = ZoneInfo("America/New_York")
TOKEN = "policy-token"


def local(*parts: int) -> datetime:
    """A New York wall-clock time, as the UTC instant it is."""
    return datetime(*parts, tzinfo=NEW_YORK).astimezone(UTC)  # type: ignore[misc]


def ask(
    message_id: str,
    customer: str = "ana",
    journey: str = "welcome",
    channel: str = "email",
    **fields: Any,
) -> SendIntent:
    return SendIntent(
        message_id=message_id,
        customer_id=customer,
        journey_key=journey,
        channel=channel,
        **fields,
    )


@pytest.fixture
def policy(any_store: Store) -> Iterator[ContactPolicyService]:
    any_store.upsert_profile(
        "ana",
        traits={"email": "Ana@Example.com", "phone": "+15550001"},
        consent={"email": True, "push": True, "sms": True},
        timezone="America/New_York",
    )
    service = ContactPolicyService(any_store)
    yield service
    service.close()


def set_rules(service: ContactPolicyService, **document: Any) -> None:
    service.set_policy(document, actor="test")


# ---------------------------------------------------------------- caps


def test_rolling_cap_skips_until_the_oldest_send_leaves_the_window(
    policy: ContactPolicyService,
) -> None:
    set_rules(policy, **{"global": {"caps": [{"count": 2, "window": "24h"}]}})
    start = local(2026, 5, 4, 10, 0)
    assert policy.decide(ask("m1"), start).outcome == "allow"
    assert policy.decide(ask("m2", channel="sms"), start + timedelta(hours=1)).outcome == "allow"
    third = policy.decide(ask("m3"), start + timedelta(hours=2))
    assert third.outcome == "skip"
    assert third.rule == "global.caps[0]"
    assert third.reason.startswith("cap reached: 2 messages of 2 per 24h")
    assert "Tue 2026-05-05 10:00 EDT" in third.reason  # when the first send leaves
    assert policy.decide(ask("m4"), start + timedelta(hours=24)).outcome == "allow"


def test_channel_cap_counts_only_its_channel(policy: ContactPolicyService) -> None:
    set_rules(policy, channels={"email": {"caps": [{"count": 1, "window": "7d"}]}})
    now = local(2026, 5, 4, 10, 0)
    assert policy.decide(ask("m1"), now).outcome == "allow"
    assert policy.decide(ask("m2", channel="sms"), now).outcome == "allow"
    capped = policy.decide(ask("m3"), now)
    assert (capped.outcome, capped.rule) == ("skip", "channels.email.caps[0]")


@pytest.mark.parametrize(
    ("first", "same_day", "next_day"),
    [
        # Spring forward: 8 March 2026 has 23 hours; the next local day starts at 04:00 UTC.
        (local(2026, 3, 8, 0, 30), local(2026, 3, 8, 23, 30), local(2026, 3, 9, 0, 10)),
        # Fall back: 1 November 2026 has 25 hours; its 23:30 is already 2 November in UTC.
        (local(2026, 11, 1, 0, 30), local(2026, 11, 1, 23, 30), local(2026, 11, 2, 0, 5)),
    ],
    ids=["spring-forward", "fall-back"],
)
def test_calendar_day_cap_counts_the_customers_local_day_across_dst(
    policy: ContactPolicyService, first: datetime, same_day: datetime, next_day: datetime
) -> None:
    set_rules(policy, **{"global": {"caps": [{"count": 1, "window": "calendar_day"}]}})
    assert policy.decide(ask("m1"), first).outcome == "allow"
    late = policy.decide(ask("m2"), same_day)
    assert (late.outcome, late.rule) == ("skip", "global.caps[0]")
    assert "1 per calendar day" in late.reason
    assert policy.decide(ask("m3"), next_day).outcome == "allow"


def test_calendar_week_cap_resets_on_local_monday(policy: ContactPolicyService) -> None:
    set_rules(policy, **{"global": {"caps": [{"count": 1, "window": "calendar_week"}]}})
    assert policy.decide(ask("m1"), local(2026, 5, 10, 23, 0)).outcome == "allow"  # Sunday
    assert policy.decide(ask("m2"), local(2026, 5, 11, 0, 30)).outcome == "allow"  # Monday
    assert policy.decide(ask("m3"), local(2026, 5, 17, 22, 0)).outcome == "skip"  # Sunday


# ---------------------------------------------------------------- timing


def test_min_gap_defers_and_the_deferred_send_goes_out_when_asked_again(
    policy: ContactPolicyService,
) -> None:
    set_rules(policy, **{"global": {"min_gap": "4h"}})
    sent = local(2026, 5, 4, 10, 0)
    assert policy.decide(ask("m1"), sent).outcome == "allow"
    deferred = policy.decide(ask("m2"), sent + timedelta(hours=1))
    assert deferred.outcome == "defer"
    assert deferred.rule == "global.min_gap"
    assert deferred.defer_until == sent + timedelta(hours=4)
    again = policy.decide(ask("m2"), sent + timedelta(hours=4))
    assert again.outcome == "allow" and not again.replayed


def test_quiet_hours_defer_to_the_next_allowed_minute_in_the_customers_zone(
    policy: ContactPolicyService,
) -> None:
    set_rules(policy, **{"global": {"quiet_hours": {"start": "21:00", "end": "08:00"}}})
    # Saturday 7 March 22:00 EST; the clocks go forward that night.
    deferred = policy.decide(ask("m1"), local(2026, 3, 7, 22, 0))
    assert deferred.outcome == "defer"
    assert deferred.rule == "global.quiet_hours"
    assert deferred.defer_until == datetime(2026, 3, 8, 12, 0, tzinfo=UTC)  # 08:00 EDT
    assert deferred.defer_until.astimezone(NEW_YORK).hour == 8
    # Not dropped: at the opening it goes out.
    assert policy.decide(ask("m1"), deferred.defer_until).outcome == "allow"
    # A customer without a time zone gets the policy's default one.
    set_rules(
        policy,
        default_timezone="Europe/Madrid",
        **{"global": {"quiet_hours": {"start": "22:00", "end": "09:30"}}},
    )
    unknown = policy.decide(ask("m2", customer="nobody"), datetime(2026, 5, 4, 5, 0, tzinfo=UTC))
    assert unknown.timezone == "Europe/Madrid"
    assert unknown.defer_until == datetime(2026, 5, 4, 7, 30, tzinfo=UTC)  # 09:30 CEST


def test_allowed_days_defer_to_the_first_allowed_day(policy: ContactPolicyService) -> None:
    set_rules(
        policy,
        **{
            "global": {"quiet_hours": {"start": "21:00", "end": "08:00"}},
            "journeys": {"win_back": {"allowed_days": ["mon", "tue", "wed", "thu", "fri"]}},
        },
    )
    monday_morning = local(2026, 5, 11, 8, 0)
    saturday = policy.decide(ask("m1", journey="win_back"), local(2026, 5, 9, 10, 0))
    assert (saturday.outcome, saturday.rule) == ("defer", "journeys.win_back.allowed_days")
    assert saturday.defer_until == monday_morning
    friday_night = policy.decide(ask("m2", journey="win_back"), local(2026, 5, 8, 22, 0))
    assert (friday_night.rule, friday_night.defer_until) == ("global.quiet_hours", monday_morning)
    # Another journey is not bound by win_back's days.
    assert policy.decide(ask("m3"), local(2026, 5, 9, 10, 0)).outcome == "allow"


# ---------------------------------------------------------------- consent, suppressions


def test_consent_is_needed_for_marketing_and_for_opt_in_channels(
    policy: ContactPolicyService, any_store: Store
) -> None:
    any_store.upsert_profile("ben", consent={"email": False}, timezone="America/New_York")
    now = local(2026, 5, 4, 10, 0)
    no_email = policy.decide(ask("m1", customer="ben"), now)
    assert (no_email.outcome, no_email.rule, no_email.reason) == (
        "skip",
        "consent",
        "no consent: email",
    )
    # Push needs an opt-in, even for a transactional message.
    push = policy.decide(ask("m2", customer="ben", channel="push", category="transactional"), now)
    assert (push.outcome, push.reason) == ("skip", "no consent: push")
    # An email opt-out does not stop an order confirmation.
    receipt = policy.decide(ask("m3", customer="ben", category="transactional"), now)
    assert receipt.outcome == "allow"
    # ignore_policy never overrides consent.
    forced = policy.decide(ask("m4", customer="ben", ignore_policy=True), now)
    assert forced.rule == "consent"


def test_suppressed_address_is_skipped_whatever_the_category(
    policy: ContactPolicyService,
) -> None:
    stored = policy.suppress("email", " ANA@example.com ", "hard bounce", "sendgrid")
    assert stored.address == "ana@example.com"
    again = policy.suppress("email", "ana@example.com", "complaint", "sendgrid")
    assert again.reason == "hard bounce"  # the first record is kept
    now = local(2026, 5, 4, 10, 0)
    # The address comes from the profile when the send does not give one.
    skipped = policy.decide(ask("m1"), now)
    assert (skipped.outcome, skipped.rule) == ("skip", "suppressions")
    assert "ana@example.com" in skipped.reason and "hard bounce" in skipped.reason
    receipt = policy.decide(ask("m2", category="transactional"), now)
    assert receipt.outcome == "skip"
    other = policy.decide(ask("m3", address="ana.work@example.com"), now)
    assert other.outcome == "allow"
    assert [row.address for row in policy.suppressions(channel="email")] == ["ana@example.com"]
    assert policy.unsuppress("email", "Ana@example.com")
    assert policy.decide(ask("m4"), now).outcome == "allow"


# ---------------------------------------------------------------- exemptions


def test_transactional_bypasses_the_policy_and_ignore_policy_still_counts(
    policy: ContactPolicyService,
) -> None:
    set_rules(
        policy,
        **{
            "global": {
                "caps": [{"count": 1, "window": "24h"}],
                "quiet_hours": {"start": "21:00", "end": "08:00"},
            }
        },
    )
    night = local(2026, 5, 4, 23, 0)
    receipt = policy.decide(ask("r1", category="transactional"), night)
    assert (receipt.outcome, receipt.rule) == ("allow", "exempt_categories")
    forced = policy.decide(ask("m1", ignore_policy=True), night)
    assert (forced.outcome, forced.rule) == ("allow", "ignore_policy")
    # The forced send used the day's slot; the receipt did not.
    morning = policy.decide(ask("m2"), local(2026, 5, 5, 9, 0))
    assert (morning.outcome, morning.rule) == ("skip", "global.caps[0]")
    assert policy.decide(ask("r2", category="transactional"), night).outcome == "allow"


# ---------------------------------------------------------------- priority


PRIORITY_RULES: dict[str, Any] = {
    "global": {
        "caps": [{"count": 1, "window": "calendar_day"}],
        "quiet_hours": {"start": "21:00", "end": "08:00"},
    },
    "journeys": {"welcome": {"priority": 10}, "win_back": {"priority": 0}},
}


def test_higher_priority_journey_waiting_for_the_last_slot_wins_it(
    policy: ContactPolicyService,
) -> None:
    set_rules(policy, **PRIORITY_RULES)
    night = local(2026, 5, 4, 21, 30)
    opening = local(2026, 5, 5, 8, 0)
    welcome = policy.decide(ask("w1", journey="welcome"), night)
    win_back = policy.decide(ask("b1", journey="win_back"), night)
    assert welcome.defer_until == win_back.defer_until == opening
    # win_back's workflow wakes first, but welcome (priority 10) is due for that slot.
    lower = policy.decide(ask("b1", journey="win_back"), opening)
    assert lower.outcome == "skip"
    assert lower.reason.startswith("lower priority: journey welcome (priority 10 > 0)")
    assert lower.rule == "global.caps[0]"
    assert policy.decide(ask("w1", journey="welcome"), opening + timedelta(seconds=5)).outcome == (
        "allow"
    )


def test_priority_without_a_waiting_competitor_is_first_come_first_served(
    policy: ContactPolicyService,
) -> None:
    set_rules(policy, **PRIORITY_RULES)
    noon = local(2026, 5, 4, 12, 0)
    assert policy.decide(ask("b1", journey="win_back"), noon).outcome == "allow"
    later = policy.decide(ask("w1", journey="welcome"), noon + timedelta(minutes=1))
    assert later.reason.startswith("cap reached")


def test_a_waiting_journey_that_never_came_back_stops_holding_the_slot(
    policy: ContactPolicyService,
) -> None:
    set_rules(policy, **PRIORITY_RULES)
    policy.decide(ask("w1", journey="welcome"), local(2026, 5, 4, 21, 30))
    # Its journey ended during the night: long after 08:00 the slot is free for others.
    late = policy.decide(ask("b1", journey="win_back"), local(2026, 5, 5, 8, 30))
    assert late.outcome == "allow"


# ---------------------------------------------------------------- atomicity, reservations


def one_slot_left(policy: ContactPolicyService) -> datetime:
    """A cap of 3 a day with 2 sends allowed already: the moment one slot is left."""
    set_rules(policy, **{"global": {"caps": [{"count": 3, "window": "24h"}]}})
    now = local(2026, 5, 4, 12, 0)
    for index in range(2):
        assert policy.decide(ask(f"early{index}"), now).outcome == "allow"
    return now


def test_fifty_sends_racing_for_the_last_slot_get_exactly_one_allow(
    policy: ContactPolicyService, any_store: Store
) -> None:
    now = one_slot_left(policy)
    racers = 50
    # One service per thread, as fifty workers would have: only the database serialises them.
    services = [ContactPolicyService(any_store) for _ in range(racers)]
    for service in services:  # connected and warm, so that they all start at once
        service.preview(ask("warm-up", customer="someone else"), now)
    barrier = threading.Barrier(racers)
    outcomes: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def race(index: int) -> None:
        barrier.wait()
        try:
            decision = services[index].decide(ask(f"race{index}", journey=f"journey_{index}"), now)
        except BaseException as error:  # reported below: a thread must not swallow it
            with lock:
                errors.append(error)
            return
        with lock:
            outcomes[decision.outcome] += 1

    threads = [threading.Thread(target=race, args=(index,)) for index in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for service in services:
        service.close()
    assert not errors, errors[:3]
    assert outcomes == {"allow": 1, "skip": racers - 1}
    with any_store.session() as session:
        held = session.exec(select(ContactReservation).where(ContactReservation.counted)).all()
    assert len(held) == 3


def race_in_a_process(
    url: str, process: int, racers: int, now: datetime, ready: Any, go: Any, results: Any
) -> None:
    """A worker process of its own (spawned): its store, its service, its racing threads."""
    store = Store(url)
    services = [ContactPolicyService(store) for _ in range(racers)]
    try:
        for service in services:
            service.preview(ask("warm-up", customer="someone else"), now)
        barrier = threading.Barrier(racers)
        outcomes: list[str] = []
        lock = threading.Lock()

        def race(index: int) -> None:
            barrier.wait()
            name = f"p{process}-race{index}"
            try:
                outcome = services[index].decide(ask(name, journey=f"journey_{index}"), now).outcome
            except BaseException as error:  # reported to the test, not lost with the thread
                outcome = f"error: {error!r}"
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=race, args=(index,)) for index in range(racers)]
        ready.wait()
        go.wait()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results.put(outcomes)
    finally:
        for service in services:
            service.close()
        store.dispose()


def test_worker_processes_racing_for_the_last_slot_get_exactly_one_allow(
    policy: ContactPolicyService, any_store: Store
) -> None:
    # Production runs several worker processes; no lock of ours crosses them, the
    # database's must. Four processes of ten threads, released together.
    now = one_slot_left(policy)
    processes, racers = 4, 10
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(processes + 1)
    go = context.Event()
    results = context.Queue()
    children = [
        context.Process(
            target=race_in_a_process,
            args=(any_store.url, process, racers, now, ready, go, results),
        )
        for process in range(processes)
    ]
    for child in children:
        child.start()
    try:
        ready.wait(timeout=120)
        go.set()
        outcomes = Counter(outcome for _child in children for outcome in results.get(timeout=120))
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    assert outcomes == {"allow": 1, "skip": processes * racers - 1}
    with any_store.session() as session:
        held = session.exec(select(ContactReservation).where(ContactReservation.counted)).all()
    assert len(held) == 3


def test_releasing_an_unused_reservation_frees_its_slot(policy: ContactPolicyService) -> None:
    set_rules(policy, **{"global": {"caps": [{"count": 1, "window": "24h"}]}})
    now = local(2026, 5, 4, 12, 0)
    first = policy.decide(ask("m1"), now)
    assert first.outcome == "allow" and first.reservation_id is not None
    assert policy.decide(ask("m2"), now).outcome == "skip"
    assert policy.release("m1", "invalid address")
    assert not policy.release("m1", "twice")
    reservation = policy.reservation("m1")
    assert reservation is not None
    assert (reservation.status, reservation.release_reason) == ("released", "invalid address")
    third = policy.decide(ask("m3"), now)
    assert third.outcome == "allow"
    assert policy.mark_used("m3")
    assert not policy.release("m3", "too late: it was sent")
    # The released message asks again: decided afresh, and the slot is m3's now.
    assert policy.decide(ask("m1"), now).outcome == "skip"


def test_decisions_go_on_after_postgresql_closed_the_decisions_connections(
    pg_store: Store,
) -> None:
    """A connection the server closed while idle (restart, idle timeout, failover) is
    replaced at the next decision, not handed out broken."""
    pg_store.upsert_profile("ana", traits={"email": "ana@example.com"}, consent={"email": True})
    service = ContactPolicyService(pg_store)
    try:
        now = local(2026, 5, 4, 12, 0)
        assert service.decide(ask("m1"), now).outcome == "allow"
        with pg_store.engine.begin() as connection:
            closed = connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND query LIKE '%hilo_policy%'"
                )
            ).scalar_one()
        assert closed >= 1
        assert service.decide(ask("m2"), now + timedelta(hours=1)).outcome == "allow"
        assert service.decide(ask("m1"), now).outcome == "allow"  # answered from the store
    finally:
        service.close()


def test_every_decision_is_stored_and_an_allow_is_answered_again_from_the_store(
    policy: ContactPolicyService,
) -> None:
    set_rules(policy, **{"global": {"quiet_hours": {"start": "21:00", "end": "08:00"}}})
    preview = policy.preview(ask("m1"), local(2026, 5, 4, 12, 0))
    assert preview.outcome == "allow" and preview.reservation_id is None
    assert policy.decisions(message_id="m1") == [] and policy.reservation("m1") is None
    deferred = policy.decide(ask("m1"), local(2026, 5, 4, 22, 0))
    assert deferred.outcome == "defer"
    allowed = policy.decide(ask("m1"), local(2026, 5, 5, 8, 0))
    repeated = policy.decide(ask("m1"), local(2026, 5, 5, 9, 0))
    assert repeated.replayed
    assert (repeated.outcome, repeated.reservation_id) == ("allow", allowed.reservation_id)
    assert repeated.decided_at == allowed.decided_at
    rows = policy.decisions(message_id="m1")
    assert [row.decision for row in rows] == ["allow", "defer"]  # newest first; no third row
    assert rows[1].defer_until == local(2026, 5, 5, 8, 0)
    assert rows[1].rule == "global.quiet_hours" and rows[1].policy_version == 1
    assert rows[1].timezone == "America/New_York" and rows[1].journey_key == "welcome"


# ---------------------------------------------------------------- the document


def test_policy_changes_are_versioned_and_audited(policy: ContactPolicyService) -> None:
    assert policy.get_policy().version == 0
    first = policy.set_policy(
        {"channels": {"email": {"caps": [{"count": 3, "window": "7d"}]}}},
        actor="ana",
        note="weekly email cap",
    )
    second = policy.set_policy(
        {
            "channels": {"email": {"caps": [{"count": 2, "window": "7d"}]}},
            "journeys": {"welcome": {"priority": 5}},
        },
        actor="luis",
    )
    assert (first.version, second.version) == (1, 2)
    current = policy.get_policy()
    assert (current.version, current.actor) == (2, "luis")
    assert current.policy.journeys["welcome"].priority == 5
    history = policy.history()
    assert [(row.version, row.actor, row.note) for row in history] == [
        (2, "luis", None),
        (1, "ana", "weekly email cap"),
    ]
    paths = {change["path"]: change for change in history[0].changes}
    assert paths["channels.email.caps"]["before"] == [{"count": 3, "window": "7d"}]
    assert paths["channels.email.caps"]["after"] == [{"count": 2, "window": "7d"}]
    assert paths["journeys.welcome.priority"] == {
        "path": "journeys.welcome.priority",
        "before": None,
        "after": 5,
    }
    assert "channels.email.caps" in history[0].summary
    with pytest.raises(PolicyInvalid, match="actor"):
        policy.set_policy({}, actor=" ")


@pytest.mark.parametrize(
    ("document", "field", "words"),
    [
        ({"global": {"caps": [{"count": 2, "window": "weekly"}]}}, "global.caps[0].window", "24h"),
        ({"global": {"caps": [{"count": 0, "window": "1d"}]}}, "global.caps[0].count", "at least"),
        ({"global": {"quiet_hours": {"start": "9pm", "end": "08:00"}}}, "start", "HH:MM"),
        ({"channels": {"mail": {}}}, "channels", "channels are email"),
        ({"journeys": {"welcome": {"priorty": 3}}}, "journeys.welcome.priorty", "priority"),
        ({"global": {"allowed_days": []}}, "global.allowed_days", "at least one"),
        ({"global": {"allowed_days": ["monday"]}}, "global.allowed_days[0]", "mon"),
        ({"default_timezone": "Mars/Olympus"}, "default_timezone", "IANA"),
        ({"global": {"min_gap": "soon"}}, "global.min_gap", "duration"),
    ],
)
def test_validation_errors_name_the_field_and_what_would_be_right(
    document: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(PolicyInvalid) as caught:
        parse_policy(document)
    problems = caught.value.problems
    assert any(field in problem.field and words in problem.problem for problem in problems), (
        problems
    )


# ---------------------------------------------------------------- Envío Inteligente


def engaged(store: Store, customer: str, moments: list[datetime], name: str) -> None:
    for index, moment in enumerate(moments):
        store.record_event(f"{customer}-{name}-{index}", customer, name, {}, moment, "test")


def test_best_send_time_learns_the_customers_hour(
    policy: ContactPolicyService, any_store: Store
) -> None:
    # Ana opens and clicks around 19:00 New York time, on many days.
    evenings = [local(2026, 4, day, 19, 20) for day in range(1, 15)]
    engaged(any_store, "ana", evenings[:8], "Email Opened")
    engaged(any_store, "ana", evenings[8:], "Email Link Clicked")
    engaged(any_store, "ana", [local(2026, 4, 3, 7, 0)], "Page Viewed")
    now = local(2026, 5, 4, 9, 15)  # a Monday
    best = policy.best_send_time("ana", now, fallback_hour=10, max_delay=timedelta(hours=24))
    assert best.at == local(2026, 5, 4, 19, 0)
    assert best.hour_of_week == 19  # Monday 19:00
    assert not best.fallback and best.samples == 15
    assert best.reason.startswith("learned: Mon 19:00")
    with any_store.session() as session:
        recorded = session.exec(select(SendTimeChoice)).one()
    assert (recorded.hour_of_week, recorded.fallback, recorded.samples) == (19, False, 15)


def test_best_send_time_falls_back_without_data(policy: ContactPolicyService) -> None:
    now = local(2026, 5, 4, 15, 0)
    best = policy.best_send_time("ana", now, fallback_hour=10, max_delay=timedelta(hours=24))
    assert best.fallback and best.samples == 0
    assert best.at == local(2026, 5, 5, 10, 0)
    assert "fallback hour 10:00" in best.reason and "too little engagement" in best.reason


def test_best_send_time_never_waits_beyond_the_maximum_delay(
    policy: ContactPolicyService, any_store: Store
) -> None:
    engaged(any_store, "ana", [local(2026, 4, day, 19, 5) for day in range(1, 10)], "App Opened")
    now = local(2026, 5, 4, 10, 30)
    best = policy.best_send_time("ana", now, fallback_hour=9, max_delay=timedelta(hours=4))
    assert now <= best.at <= now + timedelta(hours=4)
    assert best.fallback
    assert "beyond the maximum delay of 4h" in best.reason
    assert "not within 4h" in best.reason  # 09:00 tomorrow is out of reach too: send now
    assert best.at == now


def test_best_send_time_avoids_global_quiet_hours(
    policy: ContactPolicyService, any_store: Store
) -> None:
    set_rules(policy, **{"global": {"quiet_hours": {"start": "21:00", "end": "08:00"}}})
    engaged(any_store, "ana", [local(2026, 4, day, 23, 0) for day in range(1, 10)], "Email Opened")
    best = policy.best_send_time("ana", local(2026, 5, 4, 12, 0), max_delay=timedelta(hours=24))
    assert 8 <= best.at.astimezone(NEW_YORK).hour < 21


# ---------------------------------------------------------------- migrations


def test_the_migration_matches_the_tables(any_store: Store) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    ours = {
        "contact_policy_versions",
        "contact_reservations",
        "policy_decisions",
        "suppressions",
        "send_time_choices",
    }
    with any_store.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        differences = [
            difference
            for difference in compare_metadata(context, SQLModel.metadata)
            if any(name in repr(difference) for name in ours)
        ]
    assert differences == []


# ---------------------------------------------------------------- API and CLI


def policy_app_for(store: Store) -> FastAPI:
    app = FastAPI()
    app.state.settings = Settings(admin_token=TOKEN)
    app.state.store = store
    app.include_router(policy_router)
    return app


async def test_the_policy_api(any_store: Store) -> None:
    app = policy_app_for(any_store)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://hilo",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as api:
        assert (await api.get("/policy", headers={"Authorization": "Bearer no"})).status_code == 401
        current = (await api.get("/policy")).json()
        assert current["version"] == 0 and current["policy"]["exempt_categories"] == [
            "transactional"
        ]
        bad = await api.put(
            "/policy",
            json={"policy": {"global": {"caps": [{"count": 1, "window": "fortnight"}]}}},
            headers={"X-Hilo-Actor": "ana"},
        )
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["field"] == "global.caps[0].window"
        anonymous = await api.put("/policy", json={"policy": {}})
        assert anonymous.status_code == 422 and anonymous.json()["detail"][0]["field"] == "actor"
        document = {
            "default_timezone": "America/New_York",
            "global": {"quiet_hours": {"start": "21:00", "end": "08:00"}},
        }
        saved = await api.put(
            "/policy",
            json={"policy": document, "note": "quiet nights"},
            headers={"X-Hilo-Actor": "ana"},
        )
        assert saved.status_code == 200, saved.text
        assert saved.json()["version"] == 1 and saved.json()["actor"] == "ana"
        history = (await api.get("/policy/history")).json()
        assert [(v["version"], v["note"]) for v in history] == [(1, "quiet nights")]
        preview = await api.post(
            "/policy/decisions/preview",
            json={
                "message_id": "m1",
                "customer_id": "ana",
                "journey_key": "welcome",
                "channel": "email",
                "at": "2026-05-05T02:00:00Z",
            },
        )
        assert preview.status_code == 200, preview.text
        assert preview.json()["outcome"] == "defer"
        assert preview.json()["defer_until"].startswith("2026-05-05T12:00:00")
        assert (await api.get("/policy/decisions", params={"customer_id": "ana"})).json() == []
        added = await api.post(
            "/policy/suppressions",
            json={"channel": "email", "address": "Ana@Example.com", "reason": "complaint"},
        )
        assert added.status_code == 201 and added.json()["address"] == "ana@example.com"
        unknown = await api.post(
            "/policy/suppressions", json={"channel": "fax", "address": "1", "reason": "x"}
        )
        assert unknown.status_code == 422 and unknown.json()["detail"][0]["field"] == "channel"
        listed = (await api.get("/policy/suppressions", params={"channel": "email"})).json()
        assert [row["address"] for row in listed] == ["ana@example.com"]
        removed = await api.delete(
            "/policy/suppressions", params={"channel": "email", "address": "ana@example.com"}
        )
        assert removed.status_code == 204
        assert "properties" in (await api.get("/policy/schema")).json()
    service = app.state.contact_policy
    assert isinstance(service, ContactPolicyService)
    service.close()


@pytest.fixture
def api_server(store: Store) -> Iterator[str]:
    """The policy router on a real local server, for the CLI's HTTP client."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(policy_app_for(store), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _attempt in range(100):
        if server.started:
            break
        threading.Event().wait(0.05)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def test_the_policy_cli(api_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HILO_ADMIN_TOKEN", TOKEN)
    runner = CliRunner()
    api = ["--api", api_server]
    document = tmp_path / "policy.yaml"
    document.write_text(
        "global:\n  caps:\n    - {count: 3, window: 7d}\nchannels:\n  email:\n"
        "    quiet_hours: {start: '21:00', end: '08:00'}\n"
    )
    saved = runner.invoke(
        policy_app, ["set", str(document), "--note", "first", "--actor", "ana", *api]
    )
    assert saved.exit_code == 0, saved.output
    assert "contact policy v1 by ana" in saved.output and "global.caps" in saved.output
    shown = runner.invoke(policy_app, ["show", *api])
    assert shown.exit_code == 0, shown.output
    assert "# contact policy v1 by ana" in shown.output and "window: 7d" in shown.output
    history = runner.invoke(policy_app, ["history", *api])
    assert "v1" in history.output and "(first)" in history.output
    document.write_text("global:\n  caps:\n    - {count: 3, window: monthly}\n")
    refused = runner.invoke(policy_app, ["set", str(document), *api])
    assert refused.exit_code == 1
    assert "global.caps[0].window" in refused.output and "'24h'" in refused.output
    suppressed = runner.invoke(
        policy_app, ["suppress", "email", "ana@example.com", "-r", "asked by phone", *api]
    )
    assert suppressed.exit_code == 0 and "suppressed ana@example.com on email" in suppressed.output
    unreachable = runner.invoke(policy_app, ["show", "--api", "http://127.0.0.1:1"])
    assert unreachable.exit_code == 1 and "could not reach Hilo" in unreachable.output


# ---------------------------------------------------------------- the customer's own choices


def choose(store: Store, frequency: str = "normal", pause_until: datetime | None = None) -> None:
    """What the preference page stores when the customer saves these choices."""
    apply_preferences(
        store,
        "ana",
        PreferenceChange(
            frequency=frequency,  # type: ignore[arg-type]
            pause_until=pause_until,
            topics=[],
            opt_out=False,
        ),
    )


def test_a_pause_chosen_on_the_preference_page_skips_marketing_email_until_it_ends(
    policy: ContactPolicyService, any_store: Store
) -> None:
    now = local(2026, 5, 4, 12, 0)
    choose(any_store, pause_until=now + timedelta(days=30))
    paused = policy.decide(ask("m1"), now + timedelta(days=1))
    assert (paused.outcome, paused.rule) == ("skip", "preferences.pause")
    assert paused.reason == "paused by the customer until Wed 2026-06-03 12:00 EDT"
    # The customer's word, like consent: a step that ignores the brand's policy still hears it.
    forced = policy.decide(ask("m2", ignore_policy=True), now + timedelta(days=1))
    assert (forced.outcome, forced.rule) == ("skip", "preferences.pause")
    # Receipts and other channels are not what the page paused.
    receipt = policy.decide(ask("m3", category="transactional"), now + timedelta(days=1))
    assert receipt.outcome == "allow"
    assert policy.decide(ask("m4", channel="push"), now + timedelta(days=1)).outcome == "allow"
    assert policy.decide(ask("m5"), now + timedelta(days=31)).outcome == "allow"


def test_weekly_email_chosen_on_the_preference_page_spaces_marketing_email_a_week_apart(
    policy: ContactPolicyService, any_store: Store
) -> None:
    now = local(2026, 5, 4, 12, 0)
    choose(any_store, frequency="weekly")
    assert policy.decide(ask("w1"), now).outcome == "allow"
    again = policy.decide(ask("w2", journey="win_back"), now + timedelta(days=2))
    assert (again.outcome, again.rule) == ("skip", "preferences.frequency")
    assert "the customer chose weekly email" in again.reason
    assert policy.decide(ask("w3", channel="push"), now + timedelta(days=2)).outcome == "allow"
    # A released reservation (the send failed) does not count as an email received.
    assert policy.decide(ask("w4"), now + timedelta(days=7, minutes=1)).outcome == "allow"
    assert policy.release("w4", "invalid address")
    assert policy.decide(ask("w5"), now + timedelta(days=7, minutes=2)).outcome == "allow"
    # Back to normal: only the brand's policy applies again.
    choose(any_store, frequency="normal")
    assert policy.decide(ask("w6"), now + timedelta(days=7, minutes=3)).outcome == "allow"


def test_a_send_about_a_topic_the_customer_left_is_skipped_with_the_topic_named(
    policy: ContactPolicyService, any_store: Store
) -> None:
    now = local(2026, 5, 4, 12, 0)
    # Never chose anything: the customer hears about every topic.
    assert policy.decide(ask("t0", topic="promotions"), now).outcome == "allow"
    # Left promotions on the preference page, kept the news.
    apply_preferences(
        any_store,
        "ana",
        PreferenceChange(frequency="normal", pause_until=None, topics=["news"], opt_out=False),
        known_topics=["news", "promotions"],
    )
    left = policy.decide(ask("t1", topic="promotions"), now)
    assert (left.outcome, left.reason, left.rule) == (
        "skip",
        "left topic: promotions",
        "preferences.topics",
    )
    # On every channel, and whatever the step says about the brand's own policy.
    push = policy.decide(ask("t2", channel="push", topic="promotions"), now)
    assert (push.outcome, push.reason) == ("skip", "left topic: promotions")
    forced = policy.decide(ask("t3", topic="promotions", ignore_policy=True), now)
    assert (forced.outcome, forced.rule) == ("skip", "preferences.topics")
    # A topic still chosen, a send about no topic, and a receipt all go.
    assert policy.decide(ask("t4", topic="news"), now).outcome == "allow"
    assert policy.decide(ask("t5"), now).outcome == "allow"
    receipt = policy.decide(ask("t6", topic="promotions", category="transactional"), now)
    assert receipt.outcome == "allow"
    # The decision is recorded with its reason.
    assert policy.decide(ask("t1", topic="promotions"), now).replayed


# ---------------------------------------------------------------- PostgreSQL: optimistic first


def interrupted(service: ContactPolicyService, meanwhile: Any) -> list[int]:
    """Run ``meanwhile()`` once, after ``service``'s next decision read its snapshot and
    before it writes: another worker acting in that gap. Returns the evaluations seen."""
    original = service._evaluate
    calls: list[int] = []

    def evaluate(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(calls))
        if len(calls) == 1:
            # In a thread of its own: were this decision holding the customer's lock, the
            # other worker would wait for it, and the test would fail instead of hanging.
            other = threading.Thread(target=meanwhile)
            other.start()
            other.join(timeout=5)
        return original(*args, **kwargs)

    service._evaluate = evaluate  # type: ignore[method-assign]
    return calls


def test_an_allow_whose_slot_went_to_another_worker_meanwhile_is_decided_again(
    pg_store: Store,
) -> None:
    pg_store.upsert_profile("ana", consent={"email": True}, timezone="America/New_York")
    mine, theirs = ContactPolicyService(pg_store), ContactPolicyService(pg_store)
    try:
        set_rules(mine, **{"global": {"caps": [{"count": 1, "window": "24h"}]}})
        now = local(2026, 5, 4, 12, 0)
        for service in (mine, theirs):  # both know the policy: neither starts locked
            service.preview(ask("warm-up", customer="someone else"), now)
        taken: list[str] = []
        evaluations = interrupted(
            mine, lambda: taken.append(theirs.decide(ask("theirs"), now).outcome)
        )
        decision = mine.decide(ask("mine", journey="win_back"), now)
        # Read without the lock, it looked like an ALLOW; its write found the slot taken, so
        # it was decided again under the customer's lock.
        assert taken == ["allow"]
        assert len(evaluations) == 2
        assert (decision.outcome, decision.rule) == ("skip", "global.caps[0]")
        with pg_store.session() as session:
            held = session.exec(select(ContactReservation)).all()
            stored = session.exec(
                select(PolicyDecisionRecord).where(PolicyDecisionRecord.message_id == "mine")
            ).all()
        assert [r.message_id for r in held] == ["theirs"]
        assert [d.decision for d in stored] == ["skip"]  # the stale ALLOW left no trace
    finally:
        mine.close()
        theirs.close()


def test_an_allow_decided_under_a_policy_changed_meanwhile_is_decided_again(
    pg_store: Store,
) -> None:
    pg_store.upsert_profile("ana", consent={"email": True}, timezone="America/New_York")
    service = ContactPolicyService(pg_store)
    try:
        now = local(2026, 5, 4, 12, 0)
        service.preview(ask("warm-up", customer="someone else"), now)
        quiet = {"global": {"quiet_hours": {"start": "11:00", "end": "13:00"}}}
        evaluations = interrupted(service, lambda: set_rules(service, **quiet))
        decision = service.decide(ask("m1"), now)
        assert len(evaluations) == 2
        assert decision.outcome == "defer"
        assert decision.defer_until == local(2026, 5, 4, 13, 0)
    finally:
        service.close()


def test_decisions_that_hold_nothing_take_no_lock(pg_store: Store) -> None:
    # A SKIP is written while another session holds the customer's lock: it does not wait.
    pg_store.upsert_profile("ana", consent={"email": False}, timezone="America/New_York")
    service = ContactPolicyService(pg_store)
    try:
        service.preview(ask("warm-up"), local(2026, 5, 4, 12, 0))
        outcomes: list[str] = []
        with pg_store.engine.connect() as holder:
            holder.exec_driver_sql("SELECT pg_advisory_lock(%(key)s)", {"key": lock_key("ana")})
            try:
                deciding = threading.Thread(
                    target=lambda: outcomes.append(
                        service.decide(ask("m1"), local(2026, 5, 4, 12, 0)).outcome
                    )
                )
                deciding.start()
                deciding.join(timeout=3)
                done_while_locked = not deciding.is_alive()
            finally:
                holder.exec_driver_sql("SELECT pg_advisory_unlock_all()")
                deciding.join()
        assert done_while_locked
        assert outcomes == ["skip"]
    finally:
        service.close()
