"""What an operator reads of a running journey: the progress query, the search attributes,
the current details and the summaries in the history agree and hide nothing."""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import WorkflowHandle

from hilo import search_attributes as attrs
from hilo.journey_runs import JourneyProgress
from hilo.simulation import JourneyLab
from tests.conftest import example

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
