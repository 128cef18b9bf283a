"""One poisoned event must not block a customer: ids that cannot make a workflow id are
refused at acceptance, long instance keys are hashed into one that fits, and an entry whose
delivery fails for good is parked as a dead letter (listed, retried, dropped with ``hilo
events``) while the customer's later events go on."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import update
from sqlmodel import select
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from typer.testing import CliRunner

from api.app import create_app
from hilo.cli.app import app as cli
from hilo.db.models import JourneyVersion, OutboxEntry
from hilo.db.store import Store
from hilo.devtools.devserver import DevServer
from hilo.devtools.simulation import JourneyLab
from hilo.ids import (
    MAX_CUSTOMER_ID_BYTES,
    MAX_INSTANCE_KEY_BYTES,
    MAX_WORKFLOW_ID_BYTES,
    bounded_instance_key,
    journey_workflow_id,
)
from hilo.intake.dispatcher import parking_reason
from hilo.journeys.definitions import JourneyDefinition
from hilo.journeys.runs import JourneyResult
from hilo.settings import Settings
from tests.helpers.api import SOURCES, asgi, basic, counts, hilo_app
from tests.helpers.examples import example
from worker.main import build_worker, connect

EMOJI_ID = "😀" * 200  # 200 characters: within the old cap, 2,400 bytes percent-encoded
LONG_CART = "cart-" + "x" * 1995  # 2,000 characters
runner = CliRunner()


# ---------------------------------------------------------------- ids


def test_short_keys_keep_their_ids_and_long_ones_hash_to_a_fitting_one() -> None:
    # Running instances are found by id: every key that fitted before keeps its id.
    assert (
        journey_workflow_id("abandoned_cart", "42", "cart-9") == "journey/abandoned_cart/42/cart-9"
    )
    fits = "é" * (MAX_INSTANCE_KEY_BYTES // 6)  # 6 bytes each once percent-encoded
    assert bounded_instance_key(fits) == fits
    assert journey_workflow_id("j", "a b", fits).endswith(quote(fits, safe=""))

    longest = "j" * 63
    widest_customer = "%" * (MAX_CUSTOMER_ID_BYTES // 3)
    for key in (LONG_CART, "😀" * 2000, "é" * 5000, LONG_CART[:-1] + "y"):
        bounded = bounded_instance_key(key)
        assert bounded.endswith("~" + hashlib.sha256(key.encode()).hexdigest())
        assert bounded.startswith(key[:10])  # readable
        assert len(quote(bounded, safe="")) <= MAX_INSTANCE_KEY_BYTES
        workflow_id = journey_workflow_id(longest, widest_customer, key)
        assert len(workflow_id.encode()) <= MAX_WORKFLOW_ID_BYTES
        assert workflow_id == journey_workflow_id(longest, widest_customer, key)  # stable
    assert bounded_instance_key(LONG_CART) != bounded_instance_key(LONG_CART[:-1] + "y")
    with pytest.raises(ValueError, match="at most 727 fit"):
        journey_workflow_id("j", EMOJI_ID)


async def test_a_customer_id_too_long_for_a_workflow_id_is_refused_naming_its_field(
    any_store: Store,
) -> None:
    """200 emoji (2,400 bytes once percent-encoded) as userId, anonymousId or previousId: a
    400 naming the field, and nothing stored; a 200-character ASCII id is still accepted."""
    app = hilo_app(any_store)
    key = basic("web-key")
    track = {"event": "Cart Abandoned", "properties": {"cart_id": "c1", "cart_value": 80}}
    async with asgi(app) as api:
        refused = await api.post("/v1/track", json=track | {"userId": EMOJI_ID}, headers=key)
        assert refused.status_code == 400, refused.text
        [error] = refused.json()["errors"]
        assert error["field"] == "userId"
        assert "2,400 bytes" in error["message"] and "727" in error["message"]

        batch = {
            "batch": [
                {"type": "track", "userId": "ok-1", **track},
                {"type": "page", "anonymousId": EMOJI_ID, "name": "Home"},
            ]
        }
        refused = await api.post("/v1/batch", json=batch, headers=key)
        assert refused.status_code == 400
        assert [e["field"] for e in refused.json()["errors"]] == ["batch[1].anonymousId"]

        alias = {"previousId": EMOJI_ID, "userId": "ok-1"}
        refused = await api.post("/v1/alias", json=alias, headers=key)
        assert [e["field"] for e in refused.json()["errors"]] == ["previousId"]

        own = {"name": "Cart Abandoned", "customer_id": EMOJI_ID}
        refused = await api.post("/events", json=own)
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["loc"] == ["body", "customer_id"]
        assert counts(any_store)["StoredEvent"] == 0
        assert counts(any_store)["OutboxEntry"] == 0

        ascii_id = "ana+shop@example.com/" * 9 + "x" * 11  # 200 characters, many escaped
        accepted = await api.post("/v1/track", json=track | {"userId": ascii_id}, headers=key)
        assert accepted.status_code == 200, accepted.text
    assert counts(any_store)["StoredEvent"] == 1


# ---------------------------------------------------------------- a long instance key


@pytest.fixture(scope="module")
async def dev_client(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Client]:
    """The dev server enforces Temporal's id limit (the time-skipping server does not)."""
    server = DevServer(db_file=None, log_file=tmp_path_factory.mktemp("dev") / "temporal.log")
    await server.start()
    try:
        yield await connect(Settings(environment="test", temporal_address=server.address))
    finally:
        server.stop()


async def test_a_2000_character_cart_id_starts_the_journey_and_its_purchase_ends_it(
    any_store: Store, dev_client: Client
) -> None:
    """The cart's instance key is hashed into a workflow id Temporal takes; the purchase of
    the same cart reaches that instance and ends it."""
    from hilo.catalog import JourneyCatalog

    customer = f"long-{uuid.uuid4().hex[:6]}"  # the dev server outlives each database's run

    JourneyCatalog(any_store).publish(example("abandoned_cart"))
    task_queue = f"hilo-dead-{uuid.uuid4().hex[:8]}"
    app = create_app(
        Settings(admin_token="t", write_keys=SOURCES, dispatcher=False),
        store=any_store,
        client=dev_client,
        task_queue=task_queue,
    )
    dispatcher = app.state.dispatcher
    cart = {"cart_id": LONG_CART, "cart_value": 80, "product_name": "Mug"}
    expected_id = journey_workflow_id("abandoned_cart", customer, bounded_instance_key(LONG_CART))
    async with build_worker(dev_client, any_store, task_queue), asgi(app) as api:
        call = {"userId": customer, "event": "Cart Abandoned", "properties": cart}
        assert (await api.post("/v1/track", json=call, headers=basic("web-key"))).is_success
        await dispatcher.dispatch_once()
        [instance] = any_store.instances_of_customer(customer)
        assert instance.workflow_id == expected_id
        assert len(expected_id.encode()) <= MAX_WORKFLOW_ID_BYTES
        assert instance.instance_key == bounded_instance_key(LONG_CART)

        order = {
            "userId": customer,
            "event": "Order Completed",
            "properties": {"cart_id": LONG_CART, "total": 80},
        }
        assert (await api.post("/v1/track", json=order, headers=basic("web-key"))).is_success
        await dispatcher.dispatch_once()
        handle = dev_client.get_workflow_handle(expected_id)
        result = JourneyResult.model_validate(await handle.result())
    assert (result.status, result.reason) == ("exited", "purchased")
    assert any_store.outbox_size() == 0 and any_store.dead_letters() == []


# ---------------------------------------------------------------- dead letters

WATCH = JourneyDefinition.model_validate(
    {
        "key": "watch",
        "name": "Watch",
        "trigger": {"event": "Watch Started"},
        "steps": [
            {
                "id": "back",
                "type": "wait_for",
                "timeout": "7d",
                "events": [{"event": "Page Viewed"}],
            }
        ],
    }
)
WELCOME = JourneyDefinition.model_validate(
    {
        "key": "welcome_dl",
        "name": "Welcome",
        "trigger": {"event": "Signed Up"},
        "steps": [{"id": "pause", "type": "wait", "duration": "7d"}],
    }
)


@pytest.fixture
async def any_lab(time_env: Any, any_store: Store) -> AsyncIterator[JourneyLab]:
    async with JourneyLab.open(time_env, any_store) as journey_lab:
        yield journey_lab


def _set_definition(store: Store, key: str, version: int, definition: dict[str, Any]) -> None:
    with store.session() as session:
        session.exec(
            update(JourneyVersion)
            .where(JourneyVersion.journey_key == key, JourneyVersion.version == version)  # type: ignore[arg-type]
            .values(definition=definition)
        )
        session.commit()


def _entries(store: Store) -> list[OutboxEntry]:
    with store.session() as session:
        return list(session.exec(select(OutboxEntry).order_by(OutboxEntry.id)))  # type: ignore[arg-type]


def _hilo(*args: str) -> Any:
    return runner.invoke(cli, ["events", *args])


async def test_a_poisoned_event_is_parked_and_the_customers_next_event_is_routed(
    any_lab: JourneyLab, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A running instance's version no longer parses (saved by an older grammar): the page
    view it listens to can never be delivered. It is parked with its reason, on the timeline,
    and the customer's sign-up behind it starts its journey; ``hilo events`` lists it,
    retries it once the definition is fixed, and drops the next one."""
    lab, store = any_lab, any_lab.store
    # Workflow ids are the customers': the Temporal server is shared by both databases' runs.
    d1, d2 = f"d1-{uuid.uuid4().hex[:6]}", f"d2-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("HILO_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HILO_DATABASE_URL", store.url)
    lab.publish(WATCH)
    lab.publish(WELCOME)
    [watching] = (await lab.send("Watch Started", d1)).started
    await lab.send("Watch Started", d2)
    stored = store.get_version("watch", 1)
    assert stored is not None
    good = stored.definition
    lab.publish(WATCH.model_copy(update={"name": "Watch, renamed"}))  # v2: v1 keeps running
    broken = good | {"steps": [{"id": "back", "type": "teleport"}]}
    _set_definition(store, "watch", 1, broken)

    app = hilo_app(store, lab)  # a new process: it reads v1 afresh
    dispatcher = app.state.dispatcher
    now = (await lab.now()).isoformat()
    batch = {
        "batch": [
            {"type": "page", "userId": d1, "name": "Home", "messageId": "page-1"},
            {"type": "track", "userId": d1, "event": "Signed Up", "messageId": "signup-1"},
        ]
    }
    for call in batch["batch"]:
        call["timestamp"] = now
    async with asgi(app) as api:
        assert (await api.post("/v1/batch", json=batch, headers=basic("web-key"))).is_success
        delivered, _pending = await dispatcher.dispatch_once()
        assert delivered == 1  # the sign-up, past the page view
        [entry] = _entries(store)
        assert (entry.message_id, entry.attempts) == ("page-1", 1)
        assert entry.parked_at is not None and "ValidationError" in (entry.last_error or "")
        assert dispatcher.parked == 1 and store.outbox_size() == 0
        assert [i.journey_key for i in store.instances_of_customer(d1)] == [
            "watch",
            "welcome_dl",
        ]
        assert await dispatcher.dispatch_once() == (0, 0.0)  # parked: not tried again

        timeline = (await api.get(f"/profiles/{d1}/timeline")).json()
        [letter] = [e for e in timeline if e["kind"] == "dead_letter"]
        assert letter["summary"].startswith("Page Viewed not delivered: not a valid delivery")
        assert letter["data"]["message_id"] == "page-1" and letter["data"]["attempts"] == 1

        listed = _hilo("dead-letters")
        assert listed.exit_code == 0, listed.output
        assert "1 dead letter(s)" in listed.output
        assert "page-1" in listed.output and f"customer {d1}" in listed.output
        assert "ValidationError" in listed.output

        # Fixed: the retry delivers it to the instance still waiting for it.
        _set_definition(store, "watch", 1, good)
        retried = _hilo("retry", "page-1")
        assert retried.exit_code == 0 and f"back in customer {d1}'s queue" in retried.output
        assert store.outbox_size() == 1
        assert await dispatcher.routed("page-1", timeout=10) is not None
        assert _entries(store) == []
        # Closed by the page view, without skipping time (d2's wait must still run).
        await lab.settle(watching)
        described = await lab.client.get_workflow_handle(watching).describe()
        assert described.status == WorkflowExecutionStatus.COMPLETED

        # Another one, given up on: kept as the record, on the timeline as dropped.
        _set_definition(store, "watch", 1, broken)
        restarted = hilo_app(store, lab).state.dispatcher  # reads v1 afresh
        page = {"userId": d2, "name": "Home", "messageId": "page-2", "timestamp": now}
        assert (await api.post("/v1/page", json=page, headers=basic("web-key"))).is_success
        assert (await restarted.dispatch_once())[0] == 0
        assert restarted.parked == 1
        dropped = _hilo("drop", "page-2")
        assert dropped.exit_code == 0, dropped.output
        assert "0 dead letter(s)" in _hilo("dead-letters").output
        assert "page-2" in _hilo("dead-letters", "--dropped").output
        again = _hilo("retry", "page-2")
        assert again.exit_code == 1 and "no dead letter 'page-2'" in again.output
        timeline = (await api.get(f"/profiles/{d2}/timeline")).json()
        [letter] = [e for e in timeline if e["kind"] == "dead_letter"]
        assert letter["summary"].endswith("(dropped)")
    assert store.outbox_size() == 0
    # Nothing left waiting on the shared test server: a timer firing later, with no worker on
    # this lab's task queue, would hold its clock for every test after this one.
    await lab.advance(timedelta(days=8))  # past both 7-day waits, this lab's worker running
    for customer in (d1, d2):
        for instance in store.instances_of_customer(customer):
            handle = lab.client.get_workflow_handle(instance.workflow_id)
            for _ in range(200):
                if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
                    break
                await asyncio.sleep(0.05)
            assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED


def test_outages_wait_refusals_park_and_anything_parks_after_its_attempts() -> None:
    def rpc(status: RPCStatusCode) -> RPCError:
        return RPCError("no", status, b"")

    for transient in (
        rpc(RPCStatusCode.UNAVAILABLE),
        rpc(RPCStatusCode.DEADLINE_EXCEEDED),
        rpc(RPCStatusCode.RESOURCE_EXHAUSTED),
        RuntimeError("Failed client connect: Server connection error"),
        ConnectionRefusedError(),
        TimeoutError(),
    ):
        assert parking_reason(transient, attempts=1000, max_attempts=25) is None
    refused = parking_reason(rpc(RPCStatusCode.INVALID_ARGUMENT), attempts=1, max_attempts=25)
    assert refused is not None and "INVALID_ARGUMENT" in refused
    assert parking_reason(ValueError("bad"), attempts=1, max_attempts=25) is not None
    unknown = rpc(RPCStatusCode.PERMISSION_DENIED)
    assert parking_reason(unknown, attempts=24, max_attempts=25) is None
    assert "failed 25 times" in (parking_reason(unknown, attempts=25, max_attempts=25) or "")


def test_the_migration_matches_the_outbox(any_store: Store) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    with any_store.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        differences = [
            difference
            for difference in compare_metadata(context, SQLModel.metadata)
            if "outbox" in repr(difference)
        ]
    assert differences == []
