"""What an operator reads of a running journey: the progress query, the search attributes,
the current details and the summaries in the history agree and hide nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import WorkflowHandle
from temporalio.converter import PayloadConverter

from hilo.devtools.simulation import JourneyLab
from hilo.journeys import search_attributes as attrs
from hilo.journeys.runs import JourneyProgress
from hilo.journeys.validate import parse_journey
from hilo.policy import ContactPolicyService
from tests.helpers.examples import example

WID = "journey/abandoned_cart/42/c1"


def shopper(lab: JourneyLab) -> None:
    lab.store.upsert_profile(
        "42", traits={"email": "ana@example.com", "first_name": "Ana"}, consent={"push": True}
    )
    lab.store.register_device("42", "push", "fcm-token-42")


async def shown(handle: WorkflowHandle) -> tuple[str | None, list[str], str | None, list[str]]:
    """(step, waiting_for) from the progress query and from the search attributes."""
    progress = JourneyProgress.model_validate(await handle.query("progress"))
    held = (await handle.describe()).typed_search_attributes
    return (
        progress.step,
        progress.waiting_for,
        held.get(attrs.STEP),
        list(held.get(attrs.WAITING_FOR) or []),
    )


async def test_progress_and_search_attributes_say_the_same_wait(lab: JourneyLab) -> None:
    shopper(lab)
    lab.publish(example("abandoned_cart"))
    await lab.send("Cart Abandoned", "42", cart_id="c1", cart_value=80, product_name="Mug")
    handle = lab.handles[WID]
    # A timed wait: the instance listens only for its exit rule's event.
    assert await shown(handle) == (
        "first_reminder_delay",
        ["Order Completed"],
        "first_reminder_delay",
        ["Order Completed"],
    )
    await lab.advance(timedelta(minutes=50))
    # A wait_for: its outcomes and the exit rule.
    assert await shown(handle) == (
        "back_on_site",
        ["Order Completed", "Page Viewed"],
        "back_on_site",
        ["Order Completed", "Page Viewed"],
    )
    await lab.send("Order Completed", "42", cart_id="c1", total=80)
    await lab.result(WID)
    progress = JourneyProgress.model_validate(await handle.query("progress"))
    held = (await handle.describe()).typed_search_attributes
    assert (progress.status, progress.waiting_for) == ("exited", [])
    assert (held.get(attrs.STATUS), held.get(attrs.WAITING_FOR)) == ("exited", [])


def email(step_id: str) -> dict[str, Any]:
    return {
        "id": step_id,
        "type": "send",
        "channel": "email",
        "template": step_id,
        "subject": f"{step_id} for you",
        "body": f'Hello from {step_id}. <a href="{{{{ unsubscribe_url }}}}">Unsubscribe</a>',
    }


WELCOME = parse_journey(
    {
        "key": "welcome",
        "name": "Welcome",
        "trigger": {"event": "Signed Up"},
        "steps": [
            email("welcome_1"),
            email("welcome_2"),
            {"id": "next_day", "type": "wait", "duration": "1d"},
            email("welcome_3"),
        ],
    },
    source="test",
)


async def current_details(handle: WorkflowHandle) -> str:
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    return metadata.current_details


async def test_a_skipped_send_shows_in_the_details_and_the_next_summary(lab: JourneyLab) -> None:
    ContactPolicyService(lab.store).set_policy(
        {"default_timezone": "UTC", "global": {"caps": [{"count": 1, "window": "1d"}]}},
        actor="test",
        note="one a day",
    )
    lab.store.upsert_profile("ana", traits={"email": "ana@example.com"}, consent={"email": True})
    lab.publish(WELCOME)
    (workflow_id,) = (await lab.send("Signed Up", "ana")).started
    handle = lab.handles[workflow_id]
    for _ in range(200):  # the two sends take real time; then the instance sleeps a day
        progress = JourneyProgress.model_validate(await handle.query("progress"))
        if progress.step == "next_day":
            break
        await asyncio.sleep(0.05)
    skipped = {row.template: row for row in lab.store.messages(customer_id="ana")}["welcome_2"]
    assert skipped.status == "skipped" and skipped.reason
    details = await current_details(handle)
    assert "next_day" in details
    assert f"welcome_2 (email welcome_2) skipped: {skipped.reason}" in details

    await lab.result(workflow_id)
    summaries = [
        (EventType.Name(event.event_type), PayloadConverter.default.from_payload(
            event.user_metadata.summary
        ))
        for event in (await handle.fetch_history()).events
        if event.user_metadata.HasField("summary")
    ]  # fmt: skip
    timers = [text for kind, text in summaries if kind == "EVENT_TYPE_TIMER_STARTED"]
    assert timers == [
        f"next_day: wait 1d · after welcome_2 (email welcome_2) skipped: {skipped.reason}"
    ]
    # Mentioned once: the next send's summary is its own again.
    sends = [text for kind, text in summaries if kind == "EVENT_TYPE_ACTIVITY_TASK_SCHEDULED"]
    assert sends == [
        "welcome_1: email welcome_1",
        "welcome_2: email welcome_2",
        "welcome_3: email welcome_3",
    ]
    assert "welcome_2 (email welcome_2) skipped" in await current_details(handle)
