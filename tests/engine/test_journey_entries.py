"""An entry's row and its workflow agree, whatever the order of their writes and whatever
crashes between them: the end, the conversion and the holdout flag of a journey that ends
before its start is recorded are kept, and a delivery that died after the start (and is
delivered again) still leaves an instance that routing finds and a purchase ends.

Real Temporal (time-skipping server) and real databases; the only thing injected is the
timing of the router's write after the start, held or failed by a store subclass.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import delete, text
from sqlmodel import col, select
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from hilo.db.models import JourneyInstance
from hilo.db.store import MIGRATIONS_DIR, Store
from hilo.devtools.simulation import JourneyLab, start_time_skipping
from hilo.events import CustomerEvent
from hilo.journeys.definitions import JourneyDefinition
from hilo.journeys.runs import SIGNAL_EVENT
from tests.helpers.api import asgi, basic, hilo_app
from tests.helpers.examples import example

CART = {"cart_id": "c1", "cart_value": 80, "product_name": "Mug"}


def new_customer() -> tuple[str, str]:
    """A customer of this test alone (the Temporal server outlives each test), and the id
    of their abandoned-cart instance."""
    customer = f"ana-{uuid.uuid4().hex[:8]}"
    return customer, f"journey/abandoned_cart/{customer}/c1"


class HeldStart(Store):
    """A real store whose record of a started workflow waits until the test lets it go."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.holding = threading.Event()
        self.release = threading.Event()

    def instance_started(self, *args: Any, **kwargs: Any) -> None:
        self.holding.set()
        assert self.release.wait(60), "the test never released the entry write"
        super().instance_started(*args, **kwargs)


class DiesAfterStart(Store):
    """A real store whose first record of a started workflow fails, as a process killed
    between the start and that write would leave things."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.failures = 1

    def instance_started(self, *args: Any, **kwargs: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("killed between the start and the entry write")
        super().instance_started(*args, **kwargs)


@asynccontextmanager
async def lab_on(env: WorkflowEnvironment, store: Store) -> AsyncIterator[JourneyLab]:
    try:
        async with JourneyLab.open(env, store, sandboxed=True) as lab:
            yield lab
    finally:
        store.dispose()


async def purchase_ends(lab: JourneyLab, customer: str, workflow_id: str) -> None:
    """A purchase signalled straight to the cart's workflow, which ends it. Tests end their
    carts so: the time-skipping server (shared by the session) skips no time for later
    tests while a workflow task waits for a worker that is gone."""
    handle = lab.client.get_workflow_handle(workflow_id)
    purchase = CustomerEvent(
        name="Order Completed",
        customer_id=customer,
        properties={"cart_id": "c1", "total": 80},
        timestamp=await lab.now(),
    )
    await handle.signal(SIGNAL_EVENT, purchase)
    assert (await handle.result())["status"] == "exited"


def everyone_holds_out() -> JourneyDefinition:
    return JourneyDefinition.model_validate(
        {
            "key": "control",
            "name": "Control",
            "trigger": {"event": "Signed Up"},
            "entry": {"reentry": "always", "holdout_percent": 100},
            "steps": [{"id": "pause", "type": "wait", "duration": "1h"}],
        }
    )


def entries(store: Store, workflow_id: str) -> list[JourneyInstance]:
    with store.session() as session:
        query = select(JourneyInstance).where(JourneyInstance.workflow_id == workflow_id)
        return sorted(session.exec(query), key=lambda row: row.entry)


async def test_a_journey_that_ends_before_its_start_is_recorded_keeps_its_end(
    time_env: WorkflowEnvironment, any_store: Store
) -> None:
    """The router's write after the start is held until the workflow has ended (a purchase
    signalled straight to it): the entry still says exited, converted, with the revenue,
    and the customer can enter again."""
    customer, workflow_id = new_customer()
    store = HeldStart(any_store.url)
    async with lab_on(time_env, store) as lab:
        lab.publish(example("abandoned_cart"))
        entering = asyncio.create_task(lab.send("Cart Abandoned", customer, **CART))
        assert await asyncio.to_thread(store.holding.wait, 30)
        await purchase_ends(lab, customer, workflow_id)
        store.release.set()
        assert (await entering).started == [workflow_id]

        ended = store.get_instance(workflow_id)
        assert ended is not None
        assert (ended.status, ended.exit_reason, ended.revenue) == ("exited", "purchased", 80.0)
        assert ended.converted_at is not None and ended.ended_at is not None
        first_run = await lab.client.get_workflow_handle(workflow_id).describe()
        assert ended.run_id == first_run.run_id

        again = await lab.send("Cart Abandoned", customer, **CART)
        assert again.started == [workflow_id], again.not_entered
        assert [(e.entry, e.status) for e in entries(store, workflow_id)] == [
            (1, "exited"),
            (2, "active"),
        ]
        await purchase_ends(lab, customer, workflow_id)


async def test_a_holdout_that_ends_before_its_start_is_recorded_keeps_its_flag(
    time_env: WorkflowEnvironment, any_store: Store
) -> None:
    customer = new_customer()[0]
    store = HeldStart(any_store.url)
    workflow_id = f"journey/control/{customer}"
    async with lab_on(time_env, store) as lab:
        lab.publish(everyone_holds_out())
        entering = asyncio.create_task(lab.send("Signed Up", customer))
        assert await asyncio.to_thread(store.holding.wait, 30)
        result = await lab.client.get_workflow_handle(workflow_id).result()
        assert result["status"] == "holdout"
        store.release.set()
        await entering

        held_out = store.get_instance(workflow_id)
        assert held_out is not None
        assert (held_out.status, held_out.holdout) == ("holdout", True)
        assert held_out.ended_at is not None

        again = await lab.send("Signed Up", customer)
        assert again.started == [workflow_id], again.not_entered
        await lab.result(workflow_id)
        assert [(e.entry, e.status, e.holdout) for e in entries(store, workflow_id)] == [
            (1, "holdout", True),
            (2, "holdout", True),
        ]


async def test_a_delivery_that_died_after_the_start_is_reconciled_when_delivered_again(
    time_env: WorkflowEnvironment, any_store: Store
) -> None:
    """The dispatcher's first delivery of the cart dies right after the workflow started;
    delivered again, it finds the workflow its event started and records it, so the
    purchase reaches the instance and ends it."""
    customer, workflow_id = new_customer()
    store = DiesAfterStart(any_store.url)
    async with lab_on(time_env, store) as lab:
        lab.publish(example("abandoned_cart"))
        app = hilo_app(store, lab)
        dispatcher = app.state.dispatcher
        dispatcher.max_backoff = 0.0  # a failed delivery is due again at once
        now = (await lab.now()).isoformat()
        cart = {"userId": customer, "event": "Cart Abandoned", "properties": CART}
        purchase = {"userId": customer, "event": "Order Completed"} | {
            "properties": {"cart_id": "c1", "total": 80}
        }
        async with asgi(app) as api:
            accepted = await api.post(
                "/v1/track", json=cart | {"timestamp": now}, headers=basic("web-key")
            )
            assert accepted.is_success

            assert await dispatcher.dispatch_once() == (0, 0.0)  # died after the start
            assert store.failures == 0
            running = await lab.client.get_workflow_handle(workflow_id).describe()
            assert running.status is not None and running.status.name == "RUNNING"

            assert (await dispatcher.dispatch_once())[0] == 1  # delivered again
            entry = store.get_instance(workflow_id)
            assert entry is not None
            assert (entry.status, entry.run_id) == ("active", running.run_id)

            accepted = await api.post(
                "/v1/track", json=purchase | {"timestamp": now}, headers=basic("web-key")
            )
            assert accepted.is_success
            assert (await dispatcher.dispatch_once())[0] == 1
        result = await lab.client.get_workflow_handle(workflow_id).result()
        assert (result["status"], result["reason"]) == ("exited", "purchased")
        ended = store.get_instance(workflow_id)
        assert ended is not None
        assert (ended.status, ended.revenue) == ("exited", 80.0)
        assert [e.entry for e in entries(store, workflow_id)] == [1]
        assert store.outbox_size() == 0


@pytest.fixture
async def own_time_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server of the test's own: the session's stops skipping time for good
    once a workflow is terminated on it."""
    env = await start_time_skipping()
    yield env
    await env.shutdown()


async def test_an_entry_whose_workflow_closed_before_the_redelivery_is_not_left_starting(
    own_time_env: WorkflowEnvironment, any_store: Store
) -> None:
    """The routing of the cart dies after the start, and an operator terminates the
    workflow before the event is routed again: its entry takes Temporal's word for the end
    instead of staying starting, and the customer can enter again."""
    customer, workflow_id = new_customer()
    store = DiesAfterStart(any_store.url)
    async with lab_on(own_time_env, store) as lab:
        lab.publish(example("abandoned_cart"))
        cart = CustomerEvent(
            name="Cart Abandoned", customer_id=customer, properties=CART, timestamp=await lab.now()
        )
        with pytest.raises(ConnectionError):
            await lab.router.route(cart)
        await lab.client.get_workflow_handle(workflow_id).terminate("stopped by an operator")

        assert (await lab.router.route(cart)).started == [workflow_id]
        closed = await lab.client.get_workflow_handle(workflow_id).describe()
        assert closed.status == WorkflowExecutionStatus.TERMINATED  # no second run of it
        entry = store.get_instance(workflow_id)
        assert entry is not None
        assert (entry.status, entry.exit_reason) == (
            "terminated",
            "closed before its end was recorded",
        )
        assert entry.ended_at is not None
        assert (await lab.send("Cart Abandoned", customer, **CART)).started == [workflow_id]
        await purchase_ends(lab, customer, workflow_id)


async def test_a_workflow_another_event_started_keeps_the_customer_out_without_a_row(
    lab: JourneyLab,
) -> None:
    """Temporal refuses the start for a workflow no entry of this event started (one whose
    row was never written): the customer is told they are in the journey already, and the
    entry recorded before the start is withdrawn."""
    customer, workflow_id = new_customer()
    lab.publish(example("abandoned_cart"))
    first = await lab.send("Cart Abandoned", customer, **CART)
    assert first.started == [workflow_id]
    with lab.store.session() as session:
        session.execute(
            delete(JourneyInstance).where(col(JourneyInstance.workflow_id) == workflow_id)
        )
        session.commit()

    again = await lab.send("Cart Abandoned", customer, **CART)
    assert again.not_entered == {"abandoned_cart": "already in this journey"}
    assert entries(lab.store, workflow_id) == []
    await purchase_ends(lab, customer, workflow_id)


def _migrate(store: Store, step: str, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        getattr(command, step)(config, revision)


def test_entries_made_before_the_upgrade_keep_their_rows(any_store: Store) -> None:
    """The migration to entries keyed by workflow id and number keeps every row; of two
    entries one event made (a redelivery that entered again), the later keeps the trigger."""
    _migrate(any_store, "downgrade", "0006")
    legacy = (
        "INSERT INTO journey_instances (run_id, workflow_id, entry, journey_key, version, "
        "customer_id, trigger_message_id, status, holdout, started_at) VALUES "
        "(:run_id, 'journey/welcome/ana', :entry, 'welcome', 1, 'ana', :trigger, :status, "
        ":holdout, '2026-11-01 10:00:00')"
    )
    with any_store.engine.begin() as connection:
        for run_id, entry, trigger, status, holdout in [
            ("run-1", 1, "e1", "completed", False),
            ("run-2", 2, "e1", "holdout", True),
            ("run-3", 3, "e2", "active", False),
        ]:
            connection.execute(
                text(legacy),
                {
                    "run_id": run_id,
                    "entry": entry,
                    "trigger": trigger,
                    "status": status,
                    "holdout": holdout,
                },
            )
    _migrate(any_store, "upgrade", "head")

    rows = entries(any_store, "journey/welcome/ana")
    assert [(r.entry, r.run_id, r.trigger_message_id, r.status, r.holdout) for r in rows] == [
        (1, "run-1", None, "completed", False),
        (2, "run-2", "e1", "holdout", True),
        (3, "run-3", "e2", "active", False),
    ]
    moment = datetime(2026, 11, 2, tzinfo=UTC)
    # The end of a workflow started before the upgrade finds its entry by trigger or run id.
    any_store.instance_ended("journey/welcome/ana", "run-3", "completed", None, moment, None, None)
    latest = any_store.get_instance("journey/welcome/ana")
    assert latest is not None and (latest.entry, latest.status) == (3, "completed")
