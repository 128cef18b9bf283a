"""One comparison rule for conditions and match_trigger, and the misses it leaves on the
timeline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from hilo.customers.profiles import timeline
from hilo.db.store import Store
from hilo.devtools.simulation import JourneyLab
from hilo.journeys.conditions import Condition, key_text, same_value
from hilo.journeys.definitions import EventMatch, JourneyDefinition
from hilo.journeys.validate import check_journey
from tests.helpers.examples import example
from workflows.journey import JourneyWorkflow

# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (555, "555"),
        (555, 555.0),
        (555, "555.0"),
        (555.0, "555"),
        ("555", 555),
        (0.1, "0.1"),
        (-3, "-3.00"),
        (12345678901234567890, "12345678901234567890"),
        (True, True),
        (None, None),
        ("c1", "c1"),
        ([555, "a"], ["555", "a"]),
        ({"id": 7}, {"id": "7"}),
    ],
)
def test_the_same_value(left: Any, right: Any) -> None:
    assert same_value(left, right)
    assert same_value(right, left)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        # Booleans are not numbers, and "true" is text.
        (True, 1),
        (True, "1"),
        (True, "true"),
        (False, 0),
        (False, None),
        # Strings compare exactly: case, spaces and spelling count.
        ("555", "555.0"),
        ("0123", "123"),
        ("C1", "c1"),
        (" c1", "c1"),
        (555, " 555"),
        (555, "555 "),
        (1000, "1_000"),
        (555, "5.55e2x"),
        (12345678901234567891, "12345678901234567890"),
        (float("nan"), "nan"),
        (None, 0),
        (None, ""),
        (555, [555]),
        ([1, 2], [1]),
    ],
)
def test_not_the_same_value(left: Any, right: Any) -> None:
    assert not same_value(left, right)
    assert not same_value(right, left)


@pytest.mark.parametrize(
    ("op", "expected", "actual", "holds"),
    [
        ("eq", 555, "555", True),
        ("eq", "555", 555.0, True),
        ("eq", True, 1, False),
        ("eq", 1, True, False),
        ("ne", 555, "555", False),
        ("ne", True, "true", True),
        ("in", [1, 2, 555], "555", True),
        ("in", [1, 2], True, False),
        ("not_in", ["555"], 555, False),
        ("not_in", [0], False, True),
        ("contains", "555", ["555", 1], True),
        ("contains", 1, ["555", True], False),
        ("contains", "art", "cart", True),
    ],
)
def test_condition_operators_follow_the_rule(
    op: str, expected: Any, actual: Any, holds: bool
) -> None:
    condition = Condition.model_validate(
        {"path": "event.properties.x", "op": op, "value": expected}
    )
    assert condition.evaluate({"event": {"properties": {"x": actual}}}) is holds


def test_a_missing_value_is_equal_to_nothing() -> None:
    def holds(op: str, value: Any) -> bool:
        condition = Condition.model_validate(
            {"path": "event.properties.x", "op": op, "value": value}
        )
        return condition.evaluate({"event": {"properties": {}}})

    assert (holds("eq", None), holds("in", [None]), holds("ne", None), holds("not_in", [1])) == (
        False,
        False,
        True,
        True,
    )


def test_match_trigger_follows_the_rule_and_says_why_not() -> None:
    rule = EventMatch(event="Order Completed", match_trigger=["cart_id"])
    context = {"trigger": {"properties": {"cart_id": 555}}}

    def order(**properties: Any) -> dict[str, Any]:
        return {"name": "Order Completed", "properties": properties}

    assert rule.matches(order(cart_id="555"), context)
    assert rule.matches(order(cart_id=555.0), context)
    assert not rule.matches(order(cart_id="556"), context)
    assert rule.trigger_mismatch(order(cart_id="556"), context) == "cart_id 556 ≠ trigger's 555"
    assert rule.trigger_mismatch(order(), context) == "the event has no cart_id (trigger's 555)"
    assert rule.trigger_mismatch(order(cart_id=" 555"), context) == (
        'cart_id " 555" ≠ trigger\'s 555'
    )


def test_instance_keys_follow_the_rule_for_numbers() -> None:
    assert key_text(555) == key_text(555.0) == key_text("555") == "555"
    assert key_text(5.5) == "5.5"
    assert key_text("555.0") == "555.0"  # a string key keeps its spelling


# ---------------------------------------------------------------- journeys


def shopper(lab: JourneyLab) -> None:
    lab.store.upsert_profile("42", traits={"email": "ana@example.com"}, consent={"push": True})


async def test_a_purchase_sent_as_text_ends_a_cart_started_with_a_number(lab: JourneyLab) -> None:
    """The issue's case: `hilo send-event -p cart_id=555` then a Segment source's string."""
    shopper(lab)
    lab.publish(example("abandoned_cart"))
    begin = await lab.now()
    route = await lab.send("Cart Abandoned", "42", cart_id=555, cart_value=80)
    (workflow_id,) = route.started
    assert workflow_id == "journey/abandoned_cart/42/555"
    await lab.advance(timedelta(hours=2))
    signalled = await lab.send("Order Completed", "42", cart_id="555", total=80)
    assert signalled.signalled == [workflow_id]
    result = await lab.result(workflow_id)
    assert (result.status, result.reason, result.converted) == ("exited", "purchased", True)
    assert lab.timeline("42", begin) == ["+45m email cart_reminder_1", "+2h end exited (purchased)"]
    # The rule came in behind a patch: this new instance's history replays with its marker.
    replayer = Replayer(workflows=[JourneyWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(await lab.handles[workflow_id].fetch_history())


def listening_for_another_cart() -> JourneyDefinition:
    """Abandoned cart with a wait for the customer's return to the same cart first."""
    raw = example("abandoned_cart").model_dump(mode="json", by_alias=True, exclude_none=True)
    raw["steps"] = [
        {
            "id": "cart_revisited",
            "type": "wait_for",
            "timeout": "1d",
            "events": [{"event": "Page Viewed", "match_trigger": ["cart_id"]}],
        },
        *raw["steps"],
    ]
    definition = JourneyDefinition.model_validate(raw)
    assert check_journey(definition) == []
    return definition


async def test_an_event_that_almost_matches_says_why_on_the_timeline(lab: JourneyLab) -> None:
    shopper(lab)
    lab.publish(listening_for_another_cart())
    route = await lab.send("Cart Abandoned", "42", cart_id="c1", cart_value=80)
    (workflow_id,) = route.started
    await lab.advance(timedelta(minutes=10))
    await lab.send("Order Completed", "42", cart_id="c2", total=80)
    await lab.send("Page Viewed", "42", url="/cart")
    await lab.send("Page Viewed", "42", cart_id="c1")  # this one ends the wait
    await lab.send("Order Completed", "42", cart_id="c1", total=80)
    result = await lab.result(workflow_id)
    assert (result.status, result.reason) == ("exited", "purchased")

    notes = [
        entry.summary
        for entry in reversed(timeline(lab.store, "42"))
        if entry.kind == "journey_note"
    ]
    assert notes == [
        "Order Completed did not end the journey: cart_id c2 ≠ trigger's c1",
        "Page Viewed did not end the wait at cart_revisited: the event has no cart_id "
        "(trigger's c1)",
    ]
    entry = next(e for e in timeline(lab.store, "42") if e.kind == "journey_note")
    assert entry.data["journey_key"] == "abandoned_cart"
    assert entry.data["workflow_id"] == workflow_id


def test_a_note_is_recorded_once(any_store: Store) -> None:
    """The note activity may run again after a crash: the second write changes nothing."""
    note = {
        "workflow_id": "journey/abandoned_cart/42/c1",
        "run_id": "run-1",
        "journey_key": "abandoned_cart",
        "customer_id": "42",
        "step_id": "back_on_site",
        "event_message_id": "evt-1",
        "summary": "Order Completed did not end the journey: cart_id c2 ≠ trigger's c1",
        "noted_at": datetime(2026, 12, 3, 9, 0, tzinfo=UTC),
    }
    any_store.add_journey_note(note)
    any_store.add_journey_note({**note, "summary": "written again"})
    entries = [e for e in timeline(any_store, "42") if e.kind == "journey_note"]
    assert [(e.summary, e.at, e.data["step_id"]) for e in entries] == [
        (note["summary"], note["noted_at"], "back_on_site")
    ]
