"""Exactly-once delivery through worker crashes.

The worker runs as its own process with real providers (a signed webhook to a receiver
that honours ``Idempotency-Key``, and SMTP to an aiosmtpd server) and is SIGKILLed again
and again (``KILLS``) while journeys send: half of the kills land after the receiver
accepted a message and before the worker heard the answer, half at random moments. After
the last restart every journey must finish with one ledger row per message, the webhook
receiver must have acted once per message (while hearing some keys twice), and no email
may be lost.

SMTP has no idempotency key, so a kill after the server took the mail and before the
worker heard its reply sends that mail again: aimed kills also land there, the test counts
the mails received twice, and that figure is the honest answer to what SMTP does in the
same window.
"""

from __future__ import annotations

import asyncio
import email
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope
from temporalio.client import Client

from hilo.catalog import JourneyCatalog
from hilo.db.store import Store
from hilo.devtools.devserver import DevServer
from hilo.events import CustomerEvent
from hilo.intake.routing import EventRouter
from hilo.journeys.validate import parse_journey
from hilo.settings import PROJECT_ROOT
from tests.fakes import (
    FakeSmtpServer,
    FakeWebhookReceiver,
    Mailbox,
    Received,
    Reply,
)
from worker.main import connect

# `make test` kills the worker 10 times; the acceptance run kills it 50 times:
#     HILO_CRASH_KILLS=50 .venv/bin/python -m pytest -s tests/system/test_crash.py
KILLS = int(os.environ.get("HILO_CRASH_KILLS", "10"))
CUSTOMERS = max(4, KILLS // 5)
SECRET = "whsec-crash-test-secret"
QUEUE = "hilo-crash"

WORKER = """
import asyncio
from datetime import timedelta

from hilo.settings import Settings
from hilo.db.store import Store
from worker.main import build_worker, configured_activities, connect


async def main() -> None:
    settings = Settings()
    store = Store(settings.resolved_database_url)
    client = await connect(settings)
    worker = build_worker(
        client,
        store,
        settings.task_queue,
        20,
        activities=configured_activities(store),
        # A killed worker's sticky queue is abandoned fast, so the next one takes over.
        sticky_queue_schedule_to_start_timeout=timedelta(seconds=1),
    )
    await worker.run()


asyncio.run(main())
"""


class HeldAnswers(FakeWebhookReceiver):
    """Acts on the request, then holds the answer while the test kills the worker."""

    def __init__(self, secret: str) -> None:
        super().__init__(secret)
        self.hold = 0.0
        self.accepted = threading.Event()

    def dispatch(self, request: Received) -> Reply:
        reply = super().dispatch(request)
        if self.hold and reply.status == 200:
            self.accepted.set()
            time.sleep(self.hold)
        return reply


class HeldMailbox(Mailbox):
    """Takes the mail, then holds the 250 reply while the test kills the worker: the SMTP
    server has the message, the worker never hears so."""

    def __init__(self, accepted: threading.Event) -> None:
        super().__init__()
        self.hold = 0.0
        self.accepted = accepted

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        if self.hold:
            self.accepted.set()
            await asyncio.sleep(self.hold)
        return reply


def probe_journey(hook_url: str) -> Any:
    steps: list[dict[str, Any]] = []
    for n in range(1, 4):
        steps += [
            {"id": f"hook_{n}", "type": "send", "channel": "webhook", "template": f"hook_{n}",
             "url": hook_url},
            {"id": f"pause_{n}", "type": "wait", "duration": "1s"},
            {"id": f"mail_{n}", "type": "send", "channel": "email", "template": f"mail_{n}",
             "subject": "Step {{ journey.key }} " + str(n),
             "body": "Hello {{ customer.name }}. Unsubscribe: {{ unsubscribe_url }}"},
        ]  # fmt: skip
    return parse_journey(
        {
            "key": "crash_probe",
            "name": "Crash probe",
            "trigger": {"event": "Crash Probe"},
            "steps": steps,
        },
        source="test",
    )


class WorkerProcess:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", WORKER],
                env=self.env,
                cwd=PROJECT_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None


@pytest.fixture
async def server(tmp_path: Path) -> Any:
    dev = DevServer(db_file=None, log_file=tmp_path / "temporal.log")
    await dev.start()
    yield dev
    dev.stop()


async def test_worker_kills_lose_nothing_and_duplicate_nothing(
    server: DevServer, tmp_path: Path
) -> None:
    receiver = HeldAnswers(SECRET).start()
    smtp = FakeSmtpServer()
    mailbox = HeldMailbox(receiver.accepted)
    smtp.mailbox = smtp.controller.handler = mailbox
    smtp.start()
    store = Store(f"sqlite:///{tmp_path / 'hilo.db'}")
    store.migrate()
    worker = WorkerProcess(
        {
            **os.environ,
            "HILO_DATABASE_URL": store.url,
            "HILO_TEMPORAL_ADDRESS": server.address,
            "HILO_TASK_QUEUE": QUEUE,
            "HILO_WEBHOOK_URL": receiver.hook_url,
            "HILO_WEBHOOK_SECRET": SECRET,
            "HILO_EMAIL_PROVIDER": "smtp",
            "HILO_SMTP_HOST": "127.0.0.1",
            "HILO_SMTP_PORT": str(smtp.port),
            "HILO_SMTP_STARTTLS": "false",
            "HILO_SMTP_FROM": "Hilo Shop <shop@example.com>",
        },
        tmp_path / "worker.log",
    )
    try:
        JourneyCatalog(store).publish(probe_journey(receiver.hook_url))
        client: Client = await connect_to(server)
        # Short attempt timeouts so that a killed attempt is retried within seconds.
        router = EventRouter(
            store,
            client,
            QUEUE,
            send_timeout=timedelta(seconds=2),
            task_timeout=timedelta(seconds=2),
        )
        for index in range(CUSTOMERS):
            store.upsert_profile(
                f"c{index}", traits={"email": f"c{index}@example.com", "name": f"C{index}"}
            )
        handles = []
        for index in range(CUSTOMERS):
            result = await router.route(CustomerEvent(name="Crash Probe", customer_id=f"c{index}"))
            handles.extend(result.handles.values())
        assert len(handles) == CUSTOMERS

        rng = random.Random(7)
        targeted = 0
        for kill in range(KILLS):
            receiver.accepted.clear()
            aim = kill % 2 == 0
            # Aimed kills land after the webhook receiver or the SMTP server took a message.
            receiver.hold = mailbox.hold = 1.0 if aim else 0.0
            worker.start()
            if aim:
                hit = await asyncio.to_thread(receiver.accepted.wait, 8)
                targeted += int(hit)
            else:
                await asyncio.sleep(rng.uniform(0.3, 2.0))
            worker.kill()
        receiver.hold = mailbox.hold = 0.0
        worker.start()
        results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 240)
    finally:
        worker.kill()
        receiver.stop()
        smtp.stop()

    ledger = store.messages(journey_key="crash_probe")
    hooks = {row.message_id for row in ledger if row.channel == "webhook"}
    acted = Counter(event["message"]["id"] for event in receiver.events)
    keys = Counter(receiver.idempotency_keys)
    repeated = sum(1 for count in keys.values() if count > 1)
    mails = {row.message_id for row in ledger if row.channel == "email"}
    received = Counter(
        str(email.message_from_bytes(envelope.original_content or b"")["Message-ID"])
        .strip("<>")
        .split("@")[0]
        for envelope in smtp.mailbox.envelopes
    )
    smtp_duplicates = sum(count - 1 for count in received.values())
    print(
        f"\n{KILLS} worker kills ({targeted} after the provider accepted): "
        f"{len(ledger)} ledger rows; webhook: {len(hooks)} messages, "
        f"{sum(acted.values())} acted on, {len(keys)} keys of which {repeated} heard twice or "
        f"more; SMTP: {len(mails)} emails, {len(received)} received, {smtp_duplicates} again"
    )

    assert all(result.status == "completed" for result in results), results
    assert len(ledger) == CUSTOMERS * 6
    assert {row.status for row in ledger} == {"sent"}, Counter(row.status for row in ledger)

    assert set(acted) == hooks, "every webhook message reached the receiver"
    assert max(acted.values()) == 1, "the receiver acted once per message"
    assert targeted >= 1, "no kill landed between the provider's acceptance and its answer"
    assert repeated >= 1, "some kills landed between acceptance and the answer"
    assert set(received) == mails, "no email lost"


async def connect_to(server: DevServer) -> Client:
    from hilo.settings import Settings

    return await connect(
        Settings(
            environment="test",
            temporal_address=server.address,
            temporal_namespace=server.namespace,
        )
    )


async def test_smtp_sends_again_after_a_kill_inside_its_reply(
    server: DevServer, tmp_path: Path
) -> None:
    """What SMTP does in the window the idempotency key covers for HTTP providers: the
    server took the mail, the worker died before hearing 250, the retry sends it again.
    The ledger still holds one message, and both copies carry the same Message-ID (our
    message id), which is what a receiving system can deduplicate on."""
    accepted = threading.Event()
    smtp = FakeSmtpServer()
    mailbox = HeldMailbox(accepted)
    smtp.mailbox = smtp.controller.handler = mailbox
    smtp.start()
    store = Store(f"sqlite:///{tmp_path / 'hilo.db'}")
    store.migrate()
    worker = WorkerProcess(
        {
            **os.environ,
            "HILO_DATABASE_URL": store.url,
            "HILO_TEMPORAL_ADDRESS": server.address,
            "HILO_TASK_QUEUE": QUEUE,
            "HILO_EMAIL_PROVIDER": "smtp",
            "HILO_SMTP_HOST": "127.0.0.1",
            "HILO_SMTP_PORT": str(smtp.port),
            "HILO_SMTP_STARTTLS": "false",
            "HILO_SMTP_FROM": "Hilo Shop <shop@example.com>",
        },
        tmp_path / "worker.log",
    )
    mail_only = parse_journey(
        {
            "key": "smtp_probe",
            "name": "SMTP probe",
            "trigger": {"event": "Smtp Probe"},
            "steps": [
                {"id": "mail", "type": "send", "channel": "email", "template": "mail",
                 "subject": "Hi", "body": "Hello. Unsubscribe: {{ unsubscribe_url }}"},
            ],
        },
        source="test",
    )  # fmt: skip
    try:
        JourneyCatalog(store).publish(mail_only)
        client = await connect_to(server)
        router = EventRouter(
            store,
            client,
            QUEUE,
            send_timeout=timedelta(seconds=2),
            task_timeout=timedelta(seconds=2),
        )
        store.upsert_profile("m1", traits={"email": "m1@example.com"})
        route = await router.route(CustomerEvent(name="Smtp Probe", customer_id="m1"))
        mailbox.hold = 1.0
        worker.start()
        assert await asyncio.to_thread(accepted.wait, 20), "the mail never reached the server"
        worker.kill()
        mailbox.hold = 0.0
        worker.start()
        results = await asyncio.wait_for(
            asyncio.gather(*(h.result() for h in route.handles.values())), 60
        )
    finally:
        worker.kill()
        smtp.stop()

    assert [result.status for result in results] == ["completed"]
    ledger = store.messages(journey_key="smtp_probe")
    assert [row.status for row in ledger] == ["sent"]
    ids = [
        str(email.message_from_bytes(envelope.original_content or b"")["Message-ID"])
        for envelope in mailbox.envelopes
    ]
    assert len(ids) == 2 and len(set(ids)) == 1 and ledger[0].message_id in ids[0]
