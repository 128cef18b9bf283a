"""Record journey histories for the replay test: ``python -m tests.tools.record_histories``.

The recorded files are the proof that running journeys still replay on today's code. Keep
them: a workflow change that breaks one must be guarded with ``workflow.patched``, and new
recordings are added beside the old ones, never over them.
"""

from __future__ import annotations

import asyncio
import tempfile
from datetime import timedelta
from pathlib import Path

from hilo.db.store import Store
from hilo.devtools.simulation import JourneyLab, start_time_skipping
from tests.helpers.examples import example

HISTORIES = Path(__file__).parents[1] / "histories"


async def record() -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = Store(f"sqlite:///{Path(folder) / 'hilo.db'}")
        store.migrate()
        env = await start_time_skipping()
        try:
            async with JourneyLab.open(env, store, sandboxed=True) as lab:
                store.upsert_profile(
                    "42", traits={"email": "a@example.com"}, consent={"push": True}
                )
                lab.publish(example("abandoned_cart"))
                cases: dict[str, tuple[str | int, str | None, str | int | None]] = {
                    "abandoned_cart_completed": ("c1", None, None),
                    "abandoned_cart_back_on_site": ("c2", "Page Viewed", "c2"),
                    "abandoned_cart_purchased": ("c3", "Order Completed", "c3"),
                    # Recorded on the code before the same-value rule (==, so it completed).
                    "abandoned_cart_number_id_text_purchase": (555, "Order Completed", "555"),
                }
                for name, (cart, follow_up, follow_up_cart) in cases.items():
                    route = await lab.send("Cart Abandoned", "42", cart_id=cart, cart_value=80)
                    if follow_up:
                        await lab.advance(timedelta(hours=2))
                        await lab.send(follow_up, "42", cart_id=follow_up_cart, total=80)
                    workflow_id = route.started[0]
                    await lab.result(workflow_id)
                    history = await lab.handles[workflow_id].fetch_history()
                    (HISTORIES / f"{name}.json").write_text(history.to_json())
                    print(f"recorded {name}: {len(history.events)} events")
        finally:
            await env.shutdown()


if __name__ == "__main__":
    asyncio.run(record())
