"""The abandoned-cart seed journey, end to end on the time-skipping server."""

from __future__ import annotations

from hilo.simulation import JourneyLab
from tests.conftest import example


async def test_no_purchase_runs_the_whole_sequence(lab: JourneyLab) -> None:
    lab.store.upsert_profile(
        "42", traits={"email": "ana@example.com", "first_name": "Ana"}, consent={"push": True}
    )
    lab.publish(example("abandoned_cart"))
    begin = await lab.now()
    route = await lab.send("Cart Abandoned", "42", cart_id="c1", cart_value=80, product_name="Mug")
    assert route.started == ["journey/abandoned_cart/42/c1"]
    result = await lab.result(route.started[0])
    assert result.status == "completed"
    assert lab.timeline("42", begin) == [
        "+45m email cart_reminder_1",
        "+4h push cart_push",
        "+1d email cart_reminder_2",
        "+2d audience cart_retargeting",
        "+2d end completed",
    ]
