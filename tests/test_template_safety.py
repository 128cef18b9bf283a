"""What a template may cost: loop and output limits, and checking off the API's event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from api.app import create_app
from hilo.journeys import JourneyInvalid, parse_journey
from hilo.settings import Settings
from hilo.storage import Store

TOKEN = "admin-token-for-template-tests"


def journey(*bodies: str, **step: Any) -> dict[str, Any]:
    """A journey of one email step per body."""
    return {
        "key": "heavy",
        "name": "Heavy",
        "trigger": {"event": "Signed Up"},
        "steps": [
            {
                "id": f"email_{index}",
                "type": "send",
                "channel": "email",
                "category": "transactional",
                "template": f"email_{index}",
                "subject": "Hello",
                "body": body,
                **step,
            }
            for index, body in enumerate(bodies)
        ],
    }


def problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(JourneyInvalid) as caught:
        parse_journey(raw)
    return [(problem.path, problem.message) for problem in caught.value.problems]


@pytest.fixture
async def api(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(_env_file=None, admin_token=TOKEN), store)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://hilo",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    ) as client:
        yield client


# --- limits -------------------------------------------------------------------------------------

HUGE_LOOP = "{% for i in (1..5000000) %}{{ i }}{% endfor %}"


@pytest.mark.parametrize("route", ["/journeys/validate", "/journeys"])
async def test_a_huge_loop_fails_fast_naming_the_field_and_the_limit(
    api: httpx.AsyncClient, route: str
) -> None:
    started = time.monotonic()
    response = await api.post(route, json=journey("Hi", HUGE_LOOP))
    elapsed = time.monotonic() - started

    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["path"] == "steps[1] (email_1).body"
    assert "loops would run more than 10,000 times" in problem["message"]
    assert "limit: 50" in problem["message"]  # what would be right
    # Without the limit this took seconds (3.6 s on an idle machine).
    assert elapsed < 1.0, f"took {elapsed:.2f} s"


def test_loops_side_by_side_count_together() -> None:
    # Each loop alone is under the limit, nested or not; together they are not.
    three_loops = "{% for i in (1..4000) %}{% endfor %}" * 3
    assert problems(journey(three_loops)) == [
        (
            "steps[0] (email_0).body",
            "template is too heavy: its loops would run more than 10,000 times in all; "
            "loop over fewer items, e.g. {% for item in items limit: 50 %}",
        )
    ]
    assert parse_journey(journey("{% for i in (1..4000) %}{% endfor %}" * 2)).key == "heavy"


def test_output_and_assigned_variables_are_bounded() -> None:
    line = "x" * 200
    many_lines = "{% for i in (1..6000) %}" + line + "{% endfor %}"
    doubling = (
        '{% assign text = "xxxxxxxxxx" %}{% for i in (1..20) %}'
        "{% assign text = text | append: text %}{% endfor %}{{ text | size }}"
    )
    assert problems(journey(many_lines, doubling)) == [
        (
            "steps[0] (email_0).body",
            "template is too heavy: it renders more than 1,000,000 bytes; a message needs far less",
        ),
        (
            "steps[1] (email_1).body",
            "template is too heavy: its assign and capture variables hold more than "
            "1,000,000 bytes; keep what a template builds small",
        ),
    ]


def test_a_limit_reached_with_the_sample_names_the_sms_field() -> None:
    raw = journey("Hi")
    raw["sample"] = {"profile": {"traits": {"orders": list(range(20_000))}}}
    raw["steps"] = [
        {
            "id": "sms_orders",
            "type": "send",
            "channel": "sms",
            "template": "orders",
            "body": "{% for order in profile.traits.orders %}{{ order }}{% endfor %}",
        }
    ]
    [(path, message)] = problems(raw)
    assert path == "steps[0] (sms_orders).body"
    assert "more than 10,000 times" in message


# --- the API stays responsive -------------------------------------------------------------------

# Just under the limit: 9,900 iterations a step, and eighty steps of it (2 s on an idle machine).
HEAVY_BUT_ALLOWED = "{% for i in (1..99) %}{% for j in (1..99) %}{{ j }}{% endfor %}{% endfor %}"


async def test_health_answers_while_a_heavy_journey_is_checked(api: httpx.AsyncClient) -> None:
    heavy = journey(*[HEAVY_BUT_ALLOWED] * 80)
    latencies: list[float] = []

    async def validate() -> tuple[httpx.Response, float]:
        started = time.monotonic()
        response = await api.post("/journeys/validate", json=heavy)
        return response, time.monotonic() - started

    async def probe_health() -> None:
        while not checking.done():
            started = time.monotonic()
            response = await api.get("/health")
            latencies.append(time.monotonic() - started)
            assert response.status_code == 200
            await asyncio.sleep(0.02)

    checking = asyncio.create_task(validate())
    await asyncio.gather(checking, probe_health())
    response, took = checking.result()

    assert response.status_code == 200, response.text
    assert response.json()["steps"] == 80
    assert max(latencies) < 0.5, (
        f"/health took up to {max(latencies):.2f} s while a {took:.2f} s check ran"
    )
    assert took > 1.0, f"the check took only {took:.2f} s: too light to show anything"
    assert len(latencies) >= 5, latencies
