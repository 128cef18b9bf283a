"""Waiting until a local time window in the customer's time zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from activities.journey_activities import next_opening
from hilo.devtools.simulation import JourneyLab
from hilo.journeys.definitions import JourneyDefinition, TimeWindow

NEW_YORK = ZoneInfo("America/New_York")
DAYTIME = TimeWindow(start="09:00", end="21:00")


def local(text: str, zone: ZoneInfo = NEW_YORK) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=zone)


@pytest.mark.parametrize(
    ("now", "window", "expected"),
    [
        pytest.param("2027-06-01T12:00", DAYTIME, "2027-06-01T12:00", id="inside: now"),
        pytest.param("2027-06-01T03:00", DAYTIME, "2027-06-01T09:00", id="before: today"),
        pytest.param("2027-06-01T22:30", DAYTIME, "2027-06-02T09:00", id="after: tomorrow"),
        pytest.param(
            "2027-06-05T10:00",  # a Saturday
            TimeWindow(start="09:00", end="21:00", days=["mon", "tue", "wed", "thu", "fri"]),
            "2027-06-07T09:00",
            id="weekend: monday",
        ),
        pytest.param(
            "2027-06-01T01:00",
            TimeWindow(start="21:00", end="02:00"),
            "2027-06-01T01:00",
            id="overnight window: still open after midnight",
        ),
        pytest.param(
            "2027-06-01T03:00",
            TimeWindow(start="21:00", end="02:00"),
            "2027-06-01T21:00",
            id="overnight window: opens tonight",
        ),
    ],
)
def test_next_opening(now: str, window: TimeWindow, expected: str) -> None:
    assert next_opening(local(now), window, NEW_YORK) == local(expected)


def test_next_opening_across_the_spring_dst_change() -> None:
    # Saturday 22:00 EST; clocks go forward that night, so Sunday 09:00 is EDT (UTC-4).
    opening = next_opening(local("2027-03-13T22:00"), DAYTIME, NEW_YORK)
    assert opening.astimezone(UTC) == datetime(2027, 3, 14, 13, 0, tzinfo=UTC)


def test_next_opening_across_the_autumn_dst_change() -> None:
    opening = next_opening(local("2027-11-06T22:00"), DAYTIME, NEW_YORK)
    assert opening.astimezone(UTC) == datetime(2027, 11, 7, 14, 0, tzinfo=UTC)


QUIET_NIGHTS = JourneyDefinition.model_validate(
    {
        "key": "quiet_nights",
        "name": "Quiet nights",
        "trigger": {"event": "Signed Up"},
        "steps": [
            {"id": "daytime", "type": "wait", "until": {"start": "09:00", "end": "10:00"}},
            {
                "id": "hello",
                "type": "send",
                "channel": "email",
                "template": "hello",
                "subject": "Good morning",
                "body": "Hi. Unsubscribe: {{ unsubscribe_url }}",
            },
        ],
    }
)


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "America/Argentina/Buenos_Aires", None])
async def test_send_waits_for_the_customers_morning(lab: JourneyLab, zone: str | None) -> None:
    customer = f"tz-{zone}"
    lab.store.upsert_profile(customer, traits={"email": "a@example.com"}, timezone=zone)
    lab.publish(QUIET_NIGHTS)
    entered_at = await lab.now()
    route = await lab.send("Signed Up", customer)
    await lab.result(route.started[0])
    [message] = lab.store.messages(customer)
    sent_local = message.scheduled_at.astimezone(ZoneInfo(zone or "UTC"))
    assert 9 <= sent_local.hour < 10
    expected = next_opening(entered_at, QUIET_NIGHTS.steps[0].until, ZoneInfo(zone or "UTC"))  # type: ignore[union-attr,arg-type]
    assert abs(message.scheduled_at - expected) < timedelta(seconds=5)
