"""Outage: Temporal stops, the Segment API keeps accepting, and once Temporal is back every
journey-relevant event is routed exactly once.

The API runs with its lifespan, so the dispatcher runs as in production; the worker runs in this
process; the dev server keeps its state in a file and comes back on the same port. What Temporal
recorded (every workflow's history) is compared with what the events sent call for.

And what comes after an outage: clients flushing their queues at once, to several API processes.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlmodel import func, select
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from api.app import create_app
from hilo.catalog import JourneyCatalog
from hilo.db.models import Profile, StoredEvent
from hilo.db.store import Store
from hilo.devtools.devserver import DevServer
from hilo.ids import journey_workflow_id
from hilo.intake.acceptance import Ingestor, OwnEvent
from hilo.intake.sources import WriteKeySource
from hilo.journeys.definitions import JourneyDefinition
from hilo.journeys.runs import SIGNAL_EVENT
from hilo.settings import DEV_WRITE_KEY, Settings
from worker.main import build_worker, connect

JOURNEY = "outage_cart"
CART = JourneyDefinition.model_validate(
    {
        "key": JOURNEY,
        "name": "Outage cart",
        "trigger": {
            "event": "Cart Abandoned",
            "key": "properties.cart_id",
            "where": {"path": "event.properties.cart_value", "op": "gt", "value": 0},
        },
        "exit": [{"event": "Order Completed", "match_trigger": ["cart_id"], "reason": "purchased"}],
        # Long waits: every instance is still running when the events of the outage arrive.
        "steps": [
            {
                "id": "back_on_site",
                "type": "wait_for",
                "timeout": "7d",
                "events": [{"event": "Page Viewed"}],
            },
            {"id": "quiet", "type": "wait", "duration": "7d"},
        ],
    }
)
LISTENED = {"Page Viewed", "Order Completed"}
OUTAGE_CALLS = 500
DUPLICATES = 60
AUTH = httpx.BasicAuth(DEV_WRITE_KEY, "")


# ---------------------------------------------------------------- what is sent, what it calls for


@dataclass
class Expected:
    """What routing the calls in the order accepted must produce: one start per entered cart,
    one signal per (instance, event) of each relevant event, whatever was resent."""

    starts: Counter[str] = field(default_factory=Counter)
    signals: Counter[tuple[str, str]] = field(default_factory=Counter)  # (workflow, message)
    active: dict[str, set[str]] = field(default_factory=dict)  # customer -> cart ids
    done: set[str] = field(default_factory=set)  # customers whose last relevant event came
    seen: set[str] = field(default_factory=set)
    duplicates: int = 0
    irrelevant: int = 0

    def accept(self, call: dict[str, Any]) -> None:
        if call["messageId"] in self.seen:
            self.duplicates += 1
            return
        self.seen.add(call["messageId"])
        customer = call["userId"]
        name = "Page Viewed" if call["type"] == "page" else call.get("event")
        properties = call.get("properties", {})
        carts = self.active.setdefault(customer, set())
        entering = name == "Cart Abandoned" and properties["cart_value"] > 0
        if entering and properties["cart_id"] not in carts:
            # A cart that exited is never abandoned again here: re-entry stays out of it.
            self.starts[journey_workflow_id(JOURNEY, customer, properties["cart_id"])] += 1
            carts.add(properties["cart_id"])
            return
        if name not in LISTENED or not carts:
            self.irrelevant += 1
            return
        # After an exit the instance ends on its own time; later events would race with it.
        assert customer not in self.done, f"{customer} got an event after its last one"
        for cart in sorted(carts):
            self.signals[(journey_workflow_id(JOURNEY, customer, cart), call["messageId"])] += 1
        if name == "Order Completed":
            carts.discard(properties["cart_id"])
            self.done.add(customer)


class Shop:
    """Segment calls a shop would send: carts, page views, orders, noise."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.clock = datetime(2025, 3, 1, 12, tzinfo=UTC)
        self.carts = 0

    def call(self, kind: str, customer: str, **fields: Any) -> dict[str, Any]:
        self.clock += timedelta(seconds=1)
        return {
            "type": kind,
            "userId": customer,
            "messageId": f"msg-{uuid.uuid4().hex}",
            "timestamp": self.clock.isoformat(),
            "context": {"library": {"name": "analytics.js", "version": "4.1.0"}},
            **fields,
        }

    def cart(self, customer: str, value: float | None = None) -> tuple[str, dict[str, Any]]:
        self.carts += 1
        cart_id = f"cart-{self.carts}"
        amount = value if value is not None else self.rng.choice([25, 80, 140, 320])
        return cart_id, self.call(
            "track",
            customer,
            event="Cart Abandoned",
            properties={"cart_id": cart_id, "cart_value": amount, "product_name": "Mug"},
        )

    def page(self, customer: str) -> dict[str, Any]:
        path = self.rng.choice(["/", "/cart", "/products/mug", "/sale"])
        return self.call("page", customer, name=path, properties={"path": path})

    def noise(self, customer: str) -> dict[str, Any]:
        if self.rng.random() < 0.3:
            return self.call("identify", customer, traits={"plan": "free"})
        return self.call(
            "track", customer, event="Product Viewed", properties={"sku": "mug-1", "price": 12}
        )

    def order(self, customer: str, cart_id: str) -> dict[str, Any]:
        return self.call(
            "track",
            customer,
            event="Order Completed",
            properties={"cart_id": cart_id, "total": 99.5, "order_id": f"o-{cart_id}"},
        )

    def script(self, customer: str, carts: list[str]) -> list[dict[str, Any]]:
        """One customer's calls during the outage, in order; an order, if any, comes last."""
        rng = self.rng
        calls: list[dict[str, Any]] = []
        carts = list(carts)
        if not carts or rng.random() < 0.4:
            cart_id, abandoned = self.cart(customer, 0 if rng.random() < 0.1 else None)
            calls.append(abandoned)
            if abandoned["properties"]["cart_value"] > 0:
                carts.append(cart_id)
        for _ in range(rng.randint(0, 5)):
            roll = rng.random()
            if roll < 0.5:
                calls.append(self.page(customer))
            elif roll < 0.8 or not carts:
                calls.append(self.noise(customer))
            else:  # abandoned again while its journey runs: no second entry
                again = self.call(
                    "track",
                    customer,
                    event="Cart Abandoned",
                    properties={"cart_id": rng.choice(carts), "cart_value": 50},
                )
                calls.append(again)
        if carts and rng.random() < 0.4:
            calls.append(self.order(customer, rng.choice(carts)))
        return calls

    def outage(self, entered: dict[str, str], total: int, duplicates: int) -> list[dict[str, Any]]:
        """``total`` calls: the customers' scripts interleaved, then ``duplicates`` resent."""
        rng = self.rng
        queues = [self.script(customer, [cart]) for customer, cart in entered.items()]
        queues += [self.script(f"new-{n}", []) for n in range(120)]
        queues += [[self.page(f"stranger-{n}"), self.noise(f"stranger-{n}")] for n in range(10)]
        queues += [[self.order(f"stranger-{n}", "cart-none")] for n in range(10, 15)]
        calls: list[dict[str, Any]] = []
        while len(calls) < total - duplicates:
            live = [queue for queue in queues if queue]
            assert live, "the scripts ran out of calls; add customers"
            calls.append(rng.choice(live).pop(0))
        for _ in range(duplicates):
            original = rng.randrange(len(calls))
            # Right after it (the same batch, usually) or any later request.
            at = original + 1 if rng.random() < 0.3 else rng.randint(original + 1, len(calls))
            calls.insert(at, dict(calls[original]))
        return calls


def requests(calls: list[dict[str, Any]], rng: random.Random) -> Iterator[tuple[str, Any]]:
    """The calls as Segment requests, in order: mostly batches, some single calls."""
    index = 0
    while index < len(calls):
        size = 1 if rng.random() < 0.35 else rng.randint(2, 40)
        chunk = calls[index : index + size]
        index += size
        if len(chunk) == 1:
            single = {key: value for key, value in chunk[0].items() if key != "type"}
            yield f"/v1/{chunk[0]['type']}", single
        else:
            yield "/v1/batch", {"batch": chunk, "sentAt": datetime.now(UTC).isoformat()}


# ---------------------------------------------------------------- what Temporal recorded


@dataclass
class Recorded:
    starts: Counter[str] = field(default_factory=Counter)
    signals: Counter[tuple[str, str]] = field(default_factory=Counter)
    other_signals: int = 0


async def recorded(client: Client, expected_workflows: int) -> Recorded:
    """Starts and event signals in every workflow's history, as Temporal has them."""
    executions: list[tuple[str, str]] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # visibility can trail the last start a little
        executions = [(w.id, w.run_id) async for w in client.list_workflows()]
        if len(executions) >= expected_workflows:
            break
        await asyncio.sleep(0.2)
    result = Recorded()
    gate = asyncio.Semaphore(16)

    async def count(workflow_id: str, run_id: str) -> None:
        async with gate:
            history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        for event in history.events:
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
                result.starts[workflow_id] += 1
            elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
                signalled = event.workflow_execution_signaled_event_attributes
                if signalled.signal_name != SIGNAL_EVENT:
                    result.other_signals += 1
                    continue
                sent = json.loads(signalled.input.payloads[0].data)
                result.signals[(workflow_id, sent["message_id"])] += 1

    await asyncio.gather(*(count(workflow_id, run_id) for workflow_id, run_id in executions))
    return result


async def wait_for_empty_outbox(store: Store, timeout: float) -> float:
    started = time.monotonic()
    while store.outbox_size():
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"{store.outbox_size()} outbox entries still pending after {timeout:.0f}s"
            )
        await asyncio.sleep(0.1)
    return time.monotonic() - started


# ---------------------------------------------------------------- the test


async def test_every_event_sent_during_an_outage_is_routed_exactly_once(
    tmp_path: Path, store: Store
) -> None:
    began = time.monotonic()
    JourneyCatalog(store).publish(CART)
    server = DevServer(db_file=tmp_path / "temporal.db", log_file=tmp_path / "temporal.log")
    await server.start()
    port = server.port
    settings = Settings(
        environment="test",
        temporal_address=server.address,
        task_queue=f"hilo-outage-{uuid.uuid4().hex[:8]}",
        database_url=store.url,
        dispatcher=True,
    )
    client = await connect(settings)
    app = create_app(settings, store=store, client=client)
    shop = Shop(seed=20250301)
    expected = Expected()
    rng = random.Random(7)
    try:
        async with (
            build_worker(client, store, settings.task_queue),
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://hilo", auth=AUTH
            ) as api,
        ):

            async def send(calls: list[dict[str, Any]]) -> Counter[str]:
                paths: Counter[str] = Counter()
                for path, body in requests(calls, rng):
                    response = await api.post(path, json=body)
                    assert response.status_code == 200, (path, response.text)
                    assert response.json() == {"success": True}
                    paths[path] += 1
                for call in calls:
                    expected.accept(call)
                return paths

            # Phase 1, Temporal up: a few customers enter, one comes back to the site.
            entered: dict[str, str] = {}
            first: list[dict[str, Any]] = []
            for n in range(8):
                cart_id, abandoned = shop.cart(f"early-{n}", 80)
                entered[f"early-{n}"] = cart_id
                first.append(abandoned)
            first.append(shop.page("early-0"))
            await send(first)
            await wait_for_empty_outbox(store, timeout=20)

            # Phase 2, Temporal down: every request is still accepted.
            server.stop()
            assert server.process is not None and server.process.poll() is not None
            outage = shop.outage(entered, OUTAGE_CALLS, DUPLICATES)
            assert len(outage) == OUTAGE_CALLS
            down = time.monotonic()
            paths = await send(outage)
            accepted_in = time.monotonic() - down
            assert paths["/v1/batch"] and paths["/v1/track"]
            pending = store.outbox_size()
            routable = len({c["messageId"] for c in outage if c["type"] in ("track", "page")})
            assert pending == routable, "an event was routed, or lost, while Temporal was down"

            # Phase 3, Temporal back on the same port and file: the outbox drains.
            await asyncio.sleep(1)  # the dispatcher has backed off meanwhile
            await server.start()
            assert server.port == port
            drained_in = await wait_for_empty_outbox(store, timeout=40)
            found = await recorded(client, len(expected.starts))
    finally:
        server.stop()

    starts_ok = found.starts == expected.starts
    signals_ok = found.signals == expected.signals
    print(
        f"\noutage: {OUTAGE_CALLS} calls in {sum(paths.values())} requests "
        f"({', '.join(f'{n} to {path}' for path, n in sorted(paths.items()))}) accepted in "
        f"{accepted_in:.2f}s with Temporal down ({expected.duplicates} resent, "
        f"{expected.irrelevant} concern no journey); outbox drained in {drained_in:.2f}s "
        f"after the restart; whole test {time.monotonic() - began:.1f}s"
    )
    print(
        f"  workflows started: expected {sum(expected.starts.values())}, in Temporal "
        f"{sum(found.starts.values())} ({len(found.starts)} workflows)"
    )
    print(
        f"  event signals:     expected {sum(expected.signals.values())}, in Temporal "
        f"{sum(found.signals.values())} ({len(found.signals)} distinct instance/event pairs)"
    )
    missing = expected.signals - found.signals
    extra = found.signals - expected.signals
    assert starts_ok, (
        f"starts differ: missing {expected.starts - found.starts}, "
        f"extra {found.starts - expected.starts}"
    )
    assert not missing, f"{sum(missing.values())} signals lost: {list(missing)[:5]}"
    assert not extra, f"{sum(extra.values())} signals twice or unexpected: {list(extra)[:5]}"
    assert signals_ok
    assert found.other_signals == 0
    assert sum(expected.starts.values()) > 40 and sum(expected.signals.values()) > 100


def test_api_processes_flushing_at_once_for_the_same_new_customers_store_everything(
    store: Store,
) -> None:
    """After an outage, client libraries flush their queues together, to more than one API
    process: several batches may be the first to name the same new customer, and each must
    still be stored whole (not refused with a 500)."""
    processes = [Ingestor(store), Ingestor(Store(store.url))]  # two engines on one database
    failures: list[BaseException] = []

    def flush(ingestor: Ingestor, batch: list[OwnEvent]) -> None:
        try:
            ingestor.accept(batch, WriteKeySource(name="web"))
        except BaseException as error:  # noqa: BLE001 - reported below, by the test thread
            failures.append(error)

    for round_no in range(5):
        customers = [f"flush-{round_no}-{n}" for n in range(20)]
        batches = [[viewed(customer) for customer in customers] for _ in range(6)]
        threads = [
            threading.Thread(target=flush, args=(processes[n % 2], batch))
            for n, batch in enumerate(batches)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    processes[1].store.dispose()
    assert not failures, failures[:1]
    with store.session() as session:
        stored = session.exec(select(func.count()).select_from(StoredEvent)).one()
        profiles = session.exec(select(func.count()).select_from(Profile)).one()
    assert (stored, profiles) == (5 * 6 * 20, 5 * 20)


def viewed(customer: str) -> OwnEvent:
    return OwnEvent(
        message_id=f"msg-{uuid.uuid4().hex}",
        user_id=customer,
        event="Product Viewed",
        properties={"sku": "mug-1"},
        timestamp=datetime.now(UTC),
    )
