"""On the real dev server with a database file: restarts, and finding instances by search.

The worker runs as its own process (``hilo worker``) so that it can be killed for real.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlmodel import select

from hilo.catalog import JourneyCatalog
from hilo.db.models import CapturedMessage
from hilo.db.store import Store
from hilo.devtools.devserver import DevServer, tool_path
from hilo.events import CustomerEvent
from hilo.intake.routing import EventRouter
from hilo.journeys.definitions import JourneyDefinition
from hilo.journeys.runs import JourneyResult
from worker.main import connect

TASK_QUEUE = "hilo-restart-test"
PROBE = JourneyDefinition.model_validate(
    {
        "key": "restart_probe",
        "name": "Restart probe",
        "trigger": {"event": "Signed Up"},
        "exit": [{"event": "Order Completed", "reason": "purchased"}],
        "steps": [
            {
                "id": "hello",
                "type": "send",
                "channel": "email",
                "template": "hello",
                "subject": "Hi {{ profile.traits.first_name }}",
                "body": "Welcome. Unsubscribe: {{ unsubscribe_url }}",
            },
            {"id": "pause", "type": "wait", "duration": "6s"},
            {
                "id": "follow_up",
                "type": "send",
                "channel": "email",
                "template": "follow_up",
                "subject": "Still there?",
                "body": "Tips. Unsubscribe: {{ unsubscribe_url }}",
            },
        ],
    }
)


@pytest.fixture
def database(store: Store) -> Store:
    """The worker process shares this file database with the test."""
    return store


def start_worker(server: DevServer, store: Store, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "HILO_DATABASE_URL": store.url,
        "HILO_TEMPORAL_ADDRESS": server.address,
        "HILO_TASK_QUEUE": TASK_QUEUE,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "hilo.cli", "worker"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def captured(store: Store) -> list[CapturedMessage]:
    with store.session() as session:
        return list(session.exec(select(CapturedMessage)))


async def wait_until(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s")
        await asyncio.sleep(0.1)


async def test_restart_resumes_a_waiting_journey_without_duplicates(
    tmp_path: Path, database: Store
) -> None:
    database.upsert_profile("42", traits={"email": "ana@example.com", "first_name": "Ana"})
    JourneyCatalog(database).publish(PROBE)
    server = DevServer(db_file=tmp_path / "temporal.db", log_file=tmp_path / "temporal.log")
    await server.start()
    worker = start_worker(server, database, tmp_path / "worker.log")
    try:
        from hilo.settings import Settings

        client = await connect(Settings(temporal_address=server.address))
        router = EventRouter(database, client, TASK_QUEUE)
        route = await router.route(CustomerEvent(name="Signed Up", customer_id="42"))
        workflow_id = route.started[0]
        await wait_until(lambda: len(captured(database)) == 1)

        # An operator finds the instance by journey, customer and what it waits for.
        query = (
            "HiloJourney = 'restart_probe' AND HiloCustomer = '42' "
            "AND HiloWaitingFor = 'Order Completed' AND HiloStatus = 'waiting'"
        )
        found: list[str] = []
        for _ in range(100):
            found = [w.id async for w in client.list_workflows(query)]
            if found:
                break
            await asyncio.sleep(0.1)
        assert found == [workflow_id]
        cli = subprocess.run(
            [
                tool_path("temporal"),
                "workflow",
                "list",
                "--address",
                server.address,
                "--query",
                query,
                "--output",
                "json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert workflow_id in cli.stdout

        # Kill the worker outright and stop the server while the 6 s timer is pending.
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        server.stop()
        await asyncio.sleep(7)  # the timer falls due while nothing runs

        await server.start()
        worker = start_worker(server, database, tmp_path / "worker.log")
        client = await connect(Settings(temporal_address=server.address))
        handle = client.get_workflow_handle(workflow_id, result_type=JourneyResult)
        result = await asyncio.wait_for(handle.result(), timeout=60)
        assert (result.status, result.sent) == ("completed", 2)
        sent = captured(database)
        assert [m.template for m in sent] == ["hello", "follow_up"]
        assert len({m.message_id for m in sent}) == 2
        assert len(database.messages("42")) == 2
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=20)
        server.stop()


async def test_an_event_whose_routing_failed_is_routed_on_retry(
    tmp_path: Path, database: Store
) -> None:
    from hilo.settings import Settings

    JourneyCatalog(database).publish(PROBE)
    server = DevServer(db_file=tmp_path / "temporal.db", log_file=tmp_path / "temporal.log")
    await server.start()
    try:
        client = await connect(Settings(temporal_address=server.address))
        event = CustomerEvent(name="Signed Up", customer_id="7")
        server.stop()
        with pytest.raises(Exception):  # noqa: B017 - whatever the transport raises
            await asyncio.wait_for(EventRouter(database, client, TASK_QUEUE).route(event), 30)

        await server.start()
        client = await connect(Settings(temporal_address=server.address))
        router = EventRouter(database, client, TASK_QUEUE)
        retried = await router.route(event)
        assert (retried.duplicate, retried.started) == (False, ["journey/restart_probe/7"])
        again = await router.route(event)
        assert (again.duplicate, again.started) == (True, [])
    finally:
        server.stop()


async def test_a_server_that_dies_at_start_up_is_retried_then_reported_with_its_log(
    tmp_path: Path,
) -> None:
    # A folder where the database file should be: the server dies at once, every time.
    (tmp_path / "temporal.db").mkdir()
    server = DevServer(db_file=tmp_path / "temporal.db", log_file=tmp_path / "temporal.log")
    with pytest.raises(RuntimeError) as failure:
        await server.start(timeout=30, attempts=3)
    # The reason is in the error itself, not only in a log file that CI throws away.
    assert "unable to open database file" in str(failure.value)
    log = (tmp_path / "temporal.log").read_text()
    assert log.count("failed starting server") == 3
