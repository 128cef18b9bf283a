"""Two journeys competing for one customer under the contact policy, on the time-skipping
server: a cap of 2 per calendar day in the customer's time zone and quiet hours from 21:00
to 08:00 decide exactly which messages go out, and when.

Welcome (priority 10) and abandoned cart (priority 0), for a customer in New York who signs
up at 17:00 local time and abandons a cart five minutes later::

    day 1 17:00  welcome_1  email  sent           (1 of 2 today)
    day 1 17:35  cart_1     email  sent           (2 of 2)
    day 1 18:00  welcome_2  email  skipped        cap reached: today is full
    day 1 21:35  cart_2     push   deferred       quiet hours, to 08:00
    day 2 08:00  cart_2     push   sent           (1 of 2 on day 2)
    day 2 18:00  welcome_3  email  sent           (2 of 2)
    day 3 08:00  cart_3     email  sent           (1 of 2 on day 3)
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from hilo.devtools.simulation import JourneyLab
from hilo.journeys.validate import parse_journey
from hilo.policy import ContactPolicyService

NEW_YORK = ZoneInfo("America/New_York")
UNSUBSCRIBE = ' <a href="{{ unsubscribe_url }}">Unsubscribe</a>'


def email(step_id: str) -> dict[str, Any]:
    return {
        "id": step_id,
        "type": "send",
        "channel": "email",
        "template": step_id,
        "subject": f"{step_id} for {{{{ profile.traits.first_name }}}}",
        "body": f"Hello from {step_id}." + UNSUBSCRIBE,
    }


def journey(key: str, trigger: str, steps: list[dict[str, Any]]) -> Any:
    return parse_journey(
        {"key": key, "name": key.replace("_", " ").title(), "trigger": {"event": trigger},
         "steps": steps},
        source="test",
    )  # fmt: skip


WELCOME = journey(
    "welcome",
    "Signed Up",
    [
        email("welcome_1"),
        {"id": "settle", "type": "wait", "duration": "1h"},
        email("welcome_2"),
        {"id": "next_day", "type": "wait", "duration": "1d"},
        email("welcome_3"),
    ],
)
CART = journey(
    "abandoned_cart",
    "Cart Abandoned",
    [
        {"id": "first_delay", "type": "wait", "duration": "30m"},
        email("cart_1"),
        {"id": "push_delay", "type": "wait", "duration": "4h"},
        {"id": "cart_2", "type": "send", "channel": "push", "template": "cart_2",
         "title": "Still there?", "body": "Your cart misses you"},
        {"id": "last_delay", "type": "wait", "duration": "1d"},
        email("cart_3"),
    ],
)  # fmt: skip

POLICY = {
    "default_timezone": "UTC",
    "global": {
        "caps": [{"count": 2, "window": "calendar_day"}],
        "quiet_hours": {"start": "21:00", "end": "08:00"},
    },
    "journeys": {"welcome": {"priority": 10}, "abandoned_cart": {"priority": 0}},
}


async def advance_to_local(lab: JourneyLab, hour: int) -> datetime:
    """Move the server's clock to the next ``hour``:00 in New York."""
    now = (await lab.now()).astimezone(NEW_YORK)
    target = now.replace(hour=hour, minute=0, second=0, microsecond=0)
    if target <= now:
        target += timedelta(days=1)
    await lab.advance(target - now)
    return target


async def test_cap_and_quiet_hours_decide_between_welcome_and_abandoned_cart(
    lab: JourneyLab,
) -> None:
    ContactPolicyService(lab.store).set_policy(POLICY, actor="test", note="two per day")
    lab.store.upsert_profile(
        "ana",
        traits={"email": "ana@example.com", "first_name": "Ana"},
        consent={"email": True, "push": True},
        timezone="America/New_York",
    )
    lab.store.register_device("ana", "push", "fcm-token-ana")
    lab.publish(WELCOME)
    lab.publish(CART)

    start = await advance_to_local(lab, 17)
    welcome = await lab.send("Signed Up", "ana")
    await lab.advance(timedelta(minutes=5))
    cart = await lab.send("Cart Abandoned", "ana", cart_id="c1")
    for route in (welcome, cart):
        assert len(route.started) == 1
    for workflow_id in [*welcome.started, *cart.started]:
        assert (await lab.result(workflow_id)).status == "completed"

    day1 = start.date()
    rows = {
        # To the minute: activities take real milliseconds even while timers are skipped.
        row.template: (row.status, _minute(row.scheduled_at.astimezone(NEW_YORK)), row.reason)
        for row in lab.store.messages(customer_id="ana")
    }

    def at(day: int, hour: int, minute: int = 0) -> datetime:
        return datetime(day1.year, day1.month, day1.day, hour, minute, tzinfo=NEW_YORK) + (
            timedelta(days=day - 1)
        )

    assert {name: (status, when) for name, (status, when, _reason) in rows.items()} == {
        "welcome_1": ("sent", at(1, 17)),
        "cart_1": ("sent", at(1, 17, 35)),
        "welcome_2": ("skipped", at(1, 18)),
        "cart_2": ("sent", at(2, 8)),
        "welcome_3": ("sent", at(2, 18)),
        "cart_3": ("sent", at(3, 8)),
    }
    assert "cap" in (rows["welcome_2"][2] or "")

    policy = ContactPolicyService(lab.store)
    for row in lab.store.messages(customer_id="ana"):
        reservation = policy.reservation(row.message_id)
        if row.status == "sent":  # the slot is held for good once the provider took it
            assert reservation is not None and reservation.status == "used", row.template
        else:
            assert reservation is None, row.template

    decisions = policy.decisions(customer_id="ana", limit=50)
    deferred = [d for d in decisions if d.decision == "defer"]
    assert len(deferred) == 1 and deferred[0].message_id == next(
        row.message_id for row in lab.store.messages(customer_id="ana") if row.template == "cart_2"
    )
    assert deferred[0].defer_until is not None
    assert deferred[0].defer_until.astimezone(NEW_YORK) == at(2, 8)


def _minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


BEST_TIME = journey(
    "morning_digest",
    "Digest Ready",
    [
        {"id": "best_hour", "type": "wait",
         "best_time": {"fallback_hour": 10, "max_delay": "24h"}},
        email("digest"),
    ],
)  # fmt: skip


async def test_best_time_waits_for_the_hour_the_customer_engages(lab: JourneyLab) -> None:
    lab.store.upsert_profile(
        "leo",
        traits={"email": "leo@example.com", "first_name": "Leo"},
        timezone="America/New_York",
    )
    start = await advance_to_local(lab, 9)
    # Leo opens email around 19:00 his time, day after day.
    for days_ago in range(1, 8):
        opened = start - timedelta(days=days_ago) + timedelta(hours=10, minutes=12)
        lab.store.record_event(f"open-{days_ago}", "leo", "Email Opened", {}, opened, "tracking")
    lab.publish(BEST_TIME)
    route = await lab.send("Digest Ready", "leo")
    assert (await lab.result(route.started[0])).status == "completed"
    sent = lab.store.messages(customer_id="leo")[0]
    assert sent.status == "sent"
    assert _minute(sent.scheduled_at.astimezone(NEW_YORK)).hour == 19


async def test_a_send_about_a_topic_the_customer_left_is_skipped_in_the_journey(
    lab: JourneyLab,
) -> None:
    """The newsletter goes out; the promotion, about a topic Ana left, is skipped and says why."""
    from hilo.catalog import JourneyCatalog
    from hilo.feedback.deliveries import apply_preferences
    from hilo.feedback.preferences import PreferenceChange

    lab.store.upsert_profile("ana", traits={"email": "ana@example.com", "first_name": "Ana"})
    apply_preferences(
        lab.store,
        "ana",
        PreferenceChange(frequency="normal", pause_until=None, topics=["news"], opt_out=False),
        known_topics=["news", "promotions"],
    )
    topical = journey(
        "weekly_mail",
        "Week Started",
        [
            {**email("newsletter"), "topic": "news"},
            {**email("promotion"), "topic": "promotions"},
            email("account_digest"),
        ],
    )
    JourneyCatalog(lab.store, topics=["news", "promotions"]).publish(topical)
    route = await lab.send("Week Started", "ana")
    (workflow_id,) = route.started
    assert (await lab.result(workflow_id)).status == "completed"
    outcome = {row.template: (row.status, row.reason) for row in lab.store.messages("ana")}
    assert outcome == {
        "newsletter": ("sent", None),
        "promotion": ("skipped", "left topic: promotions"),
        "account_digest": ("sent", None),
    }
