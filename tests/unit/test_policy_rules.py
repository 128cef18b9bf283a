"""The contact policy's rules, without a database: caps in rolling and calendar windows in
the customer's zone, quiet hours across midnight and daylight-saving changes, allowed days,
which scopes count a send, and priority."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hilo.policy import ContactPolicy, SendIntent, left_topic, parse_policy
from hilo.policy.rules import (
    Sent,
    cap_full,
    next_allowed,
    period,
    priority_of,
    scopes_for,
    timings_of,
)

NEW_YORK = ZoneInfo("America/New_York")
MADRID = ZoneInfo("Europe/Madrid")


def policy(**scopes: object) -> ContactPolicy:
    return parse_policy(scopes)


def intent(channel: str = "email", journey: str = "welcome", **extra: object) -> SendIntent:
    return SendIntent(
        message_id="m1", customer_id="ana", journey_key=journey, channel=channel, **extra
    )


def sent(at: datetime, channel: str = "email", journey: str = "welcome") -> Sent:
    return Sent(at=at, channel=channel, category="marketing", journey_key=journey)


def local(zone: ZoneInfo, *parts: int) -> datetime:
    return datetime(*parts, tzinfo=zone)


def test_a_rolling_cap_frees_a_slot_when_the_oldest_send_leaves_the_window() -> None:
    rules = policy(**{"global": {"caps": [{"count": 2, "window": "24h"}]}})
    scope = scopes_for(rules, intent())[0]
    now = datetime(2026, 3, 2, 12, tzinfo=UTC)
    history = [sent(now - timedelta(hours=20)), sent(now - timedelta(hours=2))]
    assert cap_full(rules.global_.caps[0], scope, intent(), history, now, UTC) == (
        2,
        now + timedelta(hours=4),
    )
    assert cap_full(rules.global_.caps[0], scope, intent(), history[1:], now, UTC) is None


def test_a_calendar_day_cap_counts_the_customers_own_day() -> None:
    rules = policy(**{"global": {"caps": [{"count": 1, "window": "calendar_day"}]}})
    scope = scopes_for(rules, intent())[0]
    # 23:30 in New York is already tomorrow in UTC: the New York day still holds the send.
    first = local(NEW_YORK, 2026, 3, 2, 9)
    late = local(NEW_YORK, 2026, 3, 2, 23, 30)
    full = cap_full(rules.global_.caps[0], scope, intent(), [sent(first)], late, NEW_YORK)
    assert full == (1, local(NEW_YORK, 2026, 3, 3, 0))
    tomorrow = local(NEW_YORK, 2026, 3, 3, 0, 5)
    assert (
        cap_full(rules.global_.caps[0], scope, intent(), [sent(first)], tomorrow, NEW_YORK) is None
    )


def test_a_calendar_week_starts_on_monday_in_the_customers_zone() -> None:
    start, end = period("calendar_week", local(MADRID, 2026, 3, 5, 10), MADRID)
    assert start == local(MADRID, 2026, 3, 2, 0) and end == local(MADRID, 2026, 3, 9, 0)


def test_the_day_of_a_daylight_saving_change_has_its_real_length() -> None:
    # New York springs forward on 8 March 2026: that local day lasts 23 hours.
    start, end = period("calendar_day", local(NEW_YORK, 2026, 3, 8, 12), NEW_YORK)
    assert end - start == timedelta(hours=23)


def test_a_channel_cap_counts_only_its_channel_and_a_global_cap_counts_every_channel() -> None:
    rules = policy(
        **{
            "global": {"caps": [{"count": 3, "window": "24h"}]},
            "channels": {"sms": {"caps": [{"count": 1, "window": "24h"}]}},
        }
    )
    send = intent("sms")
    global_scope, sms_scope = scopes_for(rules, send)
    now = datetime(2026, 3, 2, 12, tzinfo=UTC)
    history = [sent(now - timedelta(hours=1), "email"), sent(now - timedelta(hours=2), "push")]
    sms_cap = rules.channels["sms"].caps[0]
    assert cap_full(sms_cap, sms_scope, send, history, now, UTC) is None
    history.append(sent(now - timedelta(hours=3), "sms"))
    assert cap_full(sms_cap, sms_scope, send, history, now, UTC) is not None
    assert cap_full(rules.global_.caps[0], global_scope, send, history, now, UTC) is not None


def test_quiet_hours_across_midnight_defer_to_their_end_in_the_customers_zone() -> None:
    rules = policy(**{"global": {"quiet_hours": {"start": "21:00", "end": "08:00"}}})
    timings = timings_of(scopes_for(rules, intent()))
    assert next_allowed(local(NEW_YORK, 2026, 3, 2, 22, 15), NEW_YORK, timings) == local(
        NEW_YORK, 2026, 3, 3, 8
    )
    assert next_allowed(local(NEW_YORK, 2026, 3, 3, 2), NEW_YORK, timings) == local(
        NEW_YORK, 2026, 3, 3, 8
    )
    noon = local(NEW_YORK, 2026, 3, 3, 12)
    assert next_allowed(noon, NEW_YORK, timings) == noon


def test_quiet_hours_end_at_the_local_hour_on_a_daylight_saving_night() -> None:
    rules = policy(**{"global": {"quiet_hours": {"start": "21:00", "end": "08:00"}}})
    timings = timings_of(scopes_for(rules, intent()))
    # The night New York springs forward: 08:00 local is 12:00 UTC, not 13:00.
    allowed = next_allowed(local(NEW_YORK, 2026, 3, 7, 23), NEW_YORK, timings)
    assert allowed == local(NEW_YORK, 2026, 3, 8, 8)
    assert allowed is not None and allowed.astimezone(UTC).hour == 12


def test_allowed_days_and_quiet_hours_of_several_scopes_all_apply() -> None:
    rules = policy(
        **{
            "global": {"quiet_hours": {"start": "20:00", "end": "09:00"}},
            "journeys": {"welcome": {"allowed_days": ["mon", "tue", "wed", "thu", "fri"]}},
        }
    )
    timings = timings_of(scopes_for(rules, intent()))
    assert [timing.path for timing in timings] == [
        "global.quiet_hours",
        "journeys.welcome.allowed_days",
    ]
    friday_night = local(MADRID, 2026, 3, 6, 21)
    assert next_allowed(friday_night, MADRID, timings) == local(MADRID, 2026, 3, 9, 9)


def test_the_scopes_of_a_send_are_global_then_channel_category_and_journey() -> None:
    rules = policy(
        channels={"email": {"min_gap": "1h"}},
        categories={"marketing": {"min_gap": "2h"}},
        journeys={"welcome": {"priority": 10}, "win_back": {"priority": 0}},
    )
    assert [scope.path for scope in scopes_for(rules, intent())] == [
        "global",
        "channels.email",
        "categories.marketing",
        "journeys.welcome",
    ]
    assert [scope.path for scope in scopes_for(rules, intent("sms", "win_back"))] == [
        "global",
        "categories.marketing",
        "journeys.win_back",
    ]


def test_priority_comes_from_the_journey_unless_the_send_names_its_own() -> None:
    rules = policy(journeys={"welcome": {"priority": 10}})
    assert priority_of(rules, intent()) == 10
    assert priority_of(rules, intent(journey="win_back")) == 0
    assert priority_of(rules, intent(priority=50)) == 50


def test_a_topic_the_customer_left_is_left_whatever_the_channel() -> None:
    preferences = {"topics": ["new-arrivals"]}
    assert left_topic(preferences, "promotions")
    assert not left_topic(preferences, "new-arrivals")
    assert not left_topic(None, "promotions")
