"""The abandoned-cart seed journey, end to end on the time-skipping server."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus
from temporalio.converter import decode_typed_search_attributes

from hilo.devtools.simulation import JourneyLab
from hilo.journeys import search_attributes as attrs
from hilo.journeys.definitions import JourneyDefinition
from tests.helpers.examples import example

CART = {"cart_id": "c1", "cart_value": 80, "product_name": "Mug"}
WID = "journey/abandoned_cart/42/c1"


def shopper(lab: JourneyLab, push: bool = True, customer_id: str = "42") -> None:
    lab.store.upsert_profile(
        customer_id,
        traits={"email": "ana@example.com", "first_name": "Ana"},
        consent={"push": push},
    )
    lab.store.register_device(customer_id, "push", f"fcm-token-{customer_id}")


async def test_no_purchase_runs_the_whole_sequence(lab: JourneyLab) -> None:
    shopper(lab)
    lab.publish(example("abandoned_cart"))
    begin = await lab.now()
    route = await lab.send("Cart Abandoned", "42", **CART)
    assert route.started == [WID]
    result = await lab.result(WID)
    assert (result.status, result.sent) == ("completed", 4)
    assert lab.timeline("42", begin) == [
        "+45m email cart_reminder_1",
        "+4h push cart_push",
        "+1d email cart_reminder_2",
        "+2d audience cart_retargeting",
        "+2d end completed",
    ]
    first = lab.store.captured("42")[0]
    assert first.recipient == "ana@example.com"
    assert first.content["subject"] == "You left Mug in your cart"


async def test_search_attributes_show_each_lasting_step_once(lab: JourneyLab) -> None:
    shopper(lab)
    lab.publish(example("abandoned_cart"))
    await lab.send("Cart Abandoned", "42", **CART)
    handle = lab.handles[WID]
    # The opening wait is in the attributes the instance starts with: an operator finds it
    # there before its first workflow task, which then has nothing to upsert.
    held = (await handle.describe()).typed_search_attributes
    assert (held.get(attrs.STEP), held.get(attrs.STATUS), held.get(attrs.WAITING_FOR)) == (
        "first_reminder_delay",
        "waiting",
        ["Order Completed"],
    )
    await lab.result(WID)
    upserts = [
        decode_typed_search_attributes(
            event.upsert_workflow_search_attributes_event_attributes.search_attributes
        )
        for event in (await handle.fetch_history()).events
        if event.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES
    ]
    assert [
        (found.get(attrs.STEP), found.get(attrs.STATUS), found.get(attrs.WAITING_FOR))
        for found in upserts
    ] == [
        ("back_on_site", "waiting_for", ["Order Completed", "Page Viewed"]),
        ("second_reminder_delay", "waiting", ["Order Completed"]),
        ("retargeting_delay", "waiting", ["Order Completed"]),
        (None, "completed", []),
    ]
    held = (await handle.describe()).typed_search_attributes
    assert (held.get(attrs.STEP), held.get(attrs.STATUS), held.get(attrs.WAITING_FOR)) == (
        "retargeting_delay",
        "completed",
        [],
    )


async def test_push_only_with_push_consent(lab: JourneyLab) -> None:
    shopper(lab, push=False)
    lab.publish(example("abandoned_cart"))
    begin = await lab.now()
    await lab.send("Cart Abandoned", "42", **CART)
    await lab.result(WID)
    timeline = lab.timeline("42", begin)
    assert not [line for line in timeline if "push" in line]
    assert timeline[0] == "+45m email cart_reminder_1"
    assert timeline[1] == "+1d email cart_reminder_2"


async def test_purchase_ends_the_instance_at_once(lab: JourneyLab) -> None:
    shopper(lab)
    lab.publish(example("abandoned_cart"))
    begin = await lab.now()
    await lab.send("Cart Abandoned", "42", **CART)
    await lab.advance(timedelta(hours=2))
    purchase_at = await lab.now()
    route = await lab.send("Order Completed", "42", cart_id="c1", total=80)
    assert route.signalled == [WID]
    result = await lab.result(WID)
    assert (result.status, result.reason, result.converted) == ("exited", "purchased", True)
    instance = lab.store.get_instance(WID)
    assert instance is not None and instance.ended_at is not None
    assert instance.ended_at - purchase_at < timedelta(seconds=1)
    assert instance.revenue == 80
    await lab.advance(timedelta(days=3))
    assert lab.timeline("42", begin) == ["+45m email cart_reminder_1", "+2h end exited (purchased)"]


async def test_purchase_of_another_cart_does_not_end_it(lab: JourneyLab) -> None:
    shopper(lab)
    lab.publish(example("abandoned_cart"))
    await lab.send("Cart Abandoned", "42", **CART)
    await lab.advance(timedelta(hours=1))
    await lab.send("Order Completed", "42", cart_id="another-cart", total=10)
    result = await lab.result(WID)
    assert (result.status, result.sent, result.converted) == ("completed", 4, False)


async def test_return_to_site_pauses_the_sequence_for_a_day(lab: JourneyLab) -> None:
    shopper(lab)
    lab.publish(example("abandoned_cart"))
    begin = await lab.now()
    await lab.send("Cart Abandoned", "42", **CART)
    await lab.advance(timedelta(hours=1))
    route = await lab.send("Page Viewed", "42", url="/products/mug")
    assert route.signalled == [WID]
    await lab.result(WID)
    assert lab.timeline("42", begin) == [
        "+45m email cart_reminder_1",
        "+1d1h push cart_push",
        "+1d21h email cart_reminder_2",
        "+2d21h audience cart_retargeting",
        "+2d21h end completed",
    ]


async def test_a_300_dollar_cart_takes_the_premium_branch(lab: JourneyLab) -> None:
    shopper(lab)
    lab.publish(example("abandoned_cart"))
    begin = await lab.now()
    await lab.send("Cart Abandoned", "42", cart_id="c1", cart_value=300, product_name="Tent")
    await lab.result(WID)
    assert lab.timeline("42", begin)[0] == "+45m email cart_reminder_premium"
    assert "personal shopper" in lab.store.captured("42")[0].content["text"]


async def test_one_instance_per_cart_and_reentry_after_it_ends(lab: JourneyLab) -> None:
    shopper(lab)
    lab.publish(example("abandoned_cart"))
    await lab.send("Cart Abandoned", "42", **CART)
    again = await lab.send("Cart Abandoned", "42", **CART)
    assert again.started == [] and again.not_entered == {
        "abandoned_cart": "already in this journey"
    }
    other_cart = await lab.send("Cart Abandoned", "42", **{**CART, "cart_id": "c2"})
    assert other_cart.started == ["journey/abandoned_cart/42/c2"]
    await lab.result(WID)
    await lab.result("journey/abandoned_cart/42/c2")
    # reentry: always — the same cart abandoned again later starts a new instance
    later = await lab.send("Cart Abandoned", "42", **CART)
    assert later.started == [WID]
    await lab.result(WID)
    instance = lab.store.get_instance(WID)
    assert instance is not None and instance.entry == 2
    messages = [m for m in lab.store.messages("42") if m.workflow_id == WID]
    assert len(messages) == 8 and len({m.message_id for m in messages}) == 8


def _tiny(reentry: dict[str, object]) -> JourneyDefinition:
    return JourneyDefinition.model_validate(
        {
            "key": "tiny",
            "name": "Tiny",
            "trigger": {"event": "Signed Up"},
            "entry": reentry,
            "steps": [
                {
                    "id": "hello",
                    "type": "send",
                    "channel": "email",
                    "template": "hello",
                    "subject": "Hi",
                    "body": "Welcome. Unsubscribe: {{ unsubscribe_url }}",
                },
                {"id": "pause", "type": "wait", "duration": "1h"},
            ],
        }
    )


async def test_reentry_once_refuses_a_second_entry(lab: JourneyLab) -> None:
    shopper(lab)
    lab.publish(_tiny({"reentry": "once"}))
    first = await lab.send("Signed Up", "42")
    await lab.result(first.started[0])
    second = await lab.send("Signed Up", "42")
    assert second.started == []
    assert "once" in second.not_entered["tiny"]


async def test_reentry_after_cooldown(lab: JourneyLab) -> None:
    shopper(lab)
    lab.publish(_tiny({"reentry": "after_cooldown", "cooldown": "7d"}))
    first = await lab.send("Signed Up", "42")
    await lab.advance(timedelta(hours=2))
    await lab.settle(first.started[0])
    too_soon = await lab.send("Signed Up", "42")
    assert too_soon.started == [] and "cooling down" in too_soon.not_entered["tiny"]
    await lab.advance(timedelta(days=7, hours=1))
    later = await lab.send("Signed Up", "42")
    assert later.started == ["journey/tiny/42"]
    await lab.result("journey/tiny/42")


async def test_v2_published_while_v1_waits_leaves_that_instance_on_v1(lab: JourneyLab) -> None:
    shopper(lab)
    shopper(lab, customer_id="43")
    v1 = example("abandoned_cart")
    assert lab.publish(v1) == 1
    await lab.send("Cart Abandoned", "42", **CART)
    await lab.advance(timedelta(minutes=10))
    raw = v1.model_dump(mode="json")
    raw["steps"][1]["otherwise"][0]["template"] = "cart_reminder_1_v2"
    assert lab.publish(JourneyDefinition.model_validate(raw)) == 2
    await lab.send("Cart Abandoned", "43", **CART)
    await lab.result(WID)
    await lab.result("journey/abandoned_cart/43/c1")
    by_customer = {
        (m.customer_id, m.journey_version, m.template)
        for m in lab.store.messages()
        if m.step_id == "first_reminder"
    }
    assert by_customer == {("42", 1, "cart_reminder_1"), ("43", 2, "cart_reminder_1_v2")}


@pytest.mark.parametrize("max_steps_per_run", [2])
async def test_continue_as_new_keeps_position_and_message_ids(
    time_env: object, store: object, max_steps_per_run: int
) -> None:
    from hilo.db.store import Store

    assert isinstance(store, Store)
    async with JourneyLab.open(
        time_env,  # type: ignore[arg-type]
        store,
        max_steps_per_run=max_steps_per_run,
        sandboxed=True,
    ) as lab:
        shopper(lab)
        lab.publish(example("abandoned_cart"))
        begin = await lab.now()
        await lab.send("Cart Abandoned", "42", **CART)
        result = await lab.result(WID)
        assert (result.status, result.sent) == ("completed", 4)
        assert lab.timeline("42", begin)[:4] == [
            "+45m email cart_reminder_1",
            "+4h push cart_push",
            "+1d email cart_reminder_2",
            "+2d audience cart_retargeting",
        ]
        instance = store.get_instance(WID)
        assert instance is not None and instance.status == "completed"
        first_run = lab.client.get_workflow_handle(WID, run_id=instance.run_id)
        assert (await first_run.describe()).status == WorkflowExecutionStatus.CONTINUED_AS_NEW
        # One enrollment: every message of every run carries the first run's id.
        assert {m.run_id for m in store.messages("42")} == {instance.run_id}


async def test_holdout_customers_enter_but_get_no_sends(lab: JourneyLab) -> None:
    raw = _tiny({"reentry": "always", "holdout_percent": 50}).model_dump(mode="json")
    lab.publish(JourneyDefinition.model_validate(raw))
    customers = [f"h{i}" for i in range(40)]
    for customer in customers:
        shopper(lab, customer_id=customer)
        await lab.send("Signed Up", customer)
    results = {c: await lab.result(f"journey/tiny/{c}") for c in customers}
    held_out = [c for c, r in results.items() if r.status == "holdout"]
    assert 10 <= len(held_out) <= 30  # a stable hash, about half
    for customer in customers:
        instance = lab.store.get_instance(f"journey/tiny/{customer}")
        assert instance is not None
        assert instance.holdout == (customer in held_out)
        assert len(lab.store.messages(customer)) == (0 if customer in held_out else 1)


async def test_routing_waits_for_the_database_without_stopping_the_event_loop(
    lab: JourneyLab,
) -> None:
    """Another writer holds SQLite's write lock: the event waits for it in a thread while the
    event loop (the API's, the dispatcher's) goes on, and is routed once the lock is free."""
    shopper(lab)
    lab.publish(example("abandoned_cart"))
    holder = sqlite3.connect(lab.store.engine.url.database or "", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        routing = asyncio.create_task(lab.send("Cart Abandoned", "42", **CART))
        ticks = 0
        for _ in range(30):  # 0.3 s of a loop that must keep turning
            await asyncio.sleep(0.01)
            ticks += 1
        assert not routing.done()  # still waiting for the write lock
    finally:
        holder.execute("COMMIT")
        holder.close()
    route = await asyncio.wait_for(routing, 30)
    assert ticks == 30
    assert route.started == [WID]
    assert (await lab.result(WID)).status == "completed"
