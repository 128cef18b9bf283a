"""The dispatcher: delivers what ingestion committed to the outbox to Temporal.

Each customer's entries go in the order they were accepted, one at a time; different
customers go concurrently. When Temporal is unreachable an entry waits with exponential
backoff, and the customer's later entries wait behind it, so order holds through an
outage. An entry leaves the outbox only after its delivery succeeded; a crash between the
two delivers it again, which the router and the workflow both recognise (an entry made
from this event is not made twice; a workflow ignores an event id it has seen).

An entry that cannot be delivered, however often it is tried, is parked as a dead letter
with its reason (``hilo events dead-letters``, ``retry``, ``drop``) and the customer's queue
goes on without it. Failures are sorted as an outage or a refusal:

    transient   Temporal unreachable (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
                ABORTED, a failed connect), the network, the database: retried with backoff,
                never parked, so that order holds through an outage of any length
    permanent   Temporal refused the request (INVALID_ARGUMENT), or the entry does not make a
                valid request (a ValueError: our own validation, pydantic's, a definition that
                no longer parses; a TypeError or KeyError on a malformed entry): parked at once
    anything    else: parked after ``max_attempts`` tries

One process dispatches at a time, holding a lease in the database; others stand by.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy.engine import Row
from sqlalchemy.exc import OperationalError
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from hilo.clock import as_utc, utcnow
from hilo.db.store import Store
from hilo.db.writers import writer_turn
from hilo.events import CustomerEvent
from hilo.intake.routing import EventRouter, RouteResult
from hilo.journeys.runs import (
    LEAVE_AUDIENCES_WORKFLOW,
    SIGNAL_IDENTIFIED,
    IdentifiedSignal,
    LeaveAudiencesRequest,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
LEASE = "dispatcher"
LEASE_RENEWAL = 1.0  # seconds; far inside the lease's time to live
_OUTAGE = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.ABORTED,
        RPCStatusCode.CANCELLED,
    }
)


def parking_reason(error: Exception, attempts: int, max_attempts: int) -> str | None:
    """Why an entry that failed with ``error`` on try number ``attempts`` is parked, or None
    when it is to be tried again (see the module's docstring)."""
    if isinstance(error, RPCError):
        if error.status in _OUTAGE:
            return None
        if error.status == RPCStatusCode.INVALID_ARGUMENT:
            return f"Temporal refused it (INVALID_ARGUMENT): {error.message}"
    elif isinstance(error, OSError | TimeoutError | OperationalError):
        return None
    elif isinstance(error, RuntimeError) and str(error).startswith("Failed client connect"):
        return None  # the SDK's own words when the server cannot be reached
    elif isinstance(error, ValueError | TypeError | KeyError):
        return f"not a valid delivery ({type(error).__name__}): {error}"
    if attempts >= max_attempts:
        return f"failed {attempts} times; the last: {error!r}"
    return None


class Dispatcher:
    def __init__(
        self,
        store: Store,
        router: EventRouter,
        *,
        batch_size: int = 500,
        concurrency: int = 32,
        idle_poll: float = 1.0,
        lease_ttl: timedelta = timedelta(seconds=15),
        max_backoff: float = 5.0,
        max_attempts: int = 25,
    ) -> None:
        self.store = store
        self.router = router
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.idle_poll = idle_poll
        self.lease_ttl = lease_ttl
        self.max_backoff = max_backoff
        self.max_attempts = max_attempts
        self.parked = 0  # dead letters this process made
        self._renewal = min(LEASE_RENEWAL, lease_ttl.total_seconds() / 3)
        self._writer = writer_turn(store.engine)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.running = False
        self._wake = asyncio.Event()
        self._pass = asyncio.Lock()
        self._waiters: dict[str, list[asyncio.Future[RouteResult]]] = {}
        self._task: asyncio.Task[None] | None = None
        # The last pass saw the whole outbox and delivered all that was due: what comes next
        # comes with a wake() (or, from another process, by the next poll).
        self._drained = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._task is None:
            self.running = True
            self._task = asyncio.create_task(self.run(), name="hilo-dispatcher")

    async def stop(self) -> None:
        self.running = False
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.store.release_lease(LEASE, self.owner)

    def wake(self) -> None:
        """New entries were committed: look now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        self.running = True
        renewed = -math.inf
        while self.running:
            try:
                # Renewed every LEASE_RENEWAL seconds, not on every pass: under load that is a
                # pass per request, each paying a write transaction for the lease alone.
                if time.monotonic() - renewed >= self._renewal:
                    held = await self._write(
                        self.store.hold_lease, LEASE, self.owner, self.lease_ttl
                    )
                    if not held:
                        renewed = -math.inf
                        await self._sleep(self.lease_ttl.total_seconds() / 3)
                        continue
                    renewed = time.monotonic()
                delivered, pending = await self.dispatch_once()
            except Exception:  # the database may be briefly unavailable: keep the loop alive
                log.exception("dispatcher pass failed")
                await self._sleep(self.idle_poll)
                continue
            if delivered == 0 or self._drained:
                # Nothing ready: wait for new work, or for the earliest backoff to end.
                await self._sleep(min(self.idle_poll, pending) if pending else self.idle_poll)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(seconds, 0.01))
        self._wake.clear()

    async def _write(self, write: Callable[..., T], *args: Any) -> T:
        """A write, in a thread, in turn with ingestion's (see :mod:`hilo.db.writers`)."""

        def locked() -> T:
            with self._writer:
                return write(*args)

        return await asyncio.to_thread(locked)

    # ------------------------------------------------------------ delivery

    async def dispatch_once(self) -> tuple[int, float]:
        """Deliver what is ready; (entries delivered, seconds until the next is due)."""
        async with self._pass:
            self._drained = False
            # Database work in a thread: the event loop (the API's, in production) goes on
            # serving requests meanwhile.
            entries = await asyncio.to_thread(self.store.outbox_batch, self.batch_size)
            if not entries:
                return 0, 0.0
            failed = False
            now = utcnow()
            queues: dict[str, list[Row[Any]]] = {}
            for entry in entries:
                queues.setdefault(entry.customer_id, []).append(entry)
            ready = []
            next_due: float | None = None
            done: list[Row[Any]] = []
            concerned: dict[str, bool] = {}  # by event name, for this pass

            def concerns_nothing(entry: Row[Any]) -> bool:
                """An event whose delivery would start and signal nothing: its row is gone
                (erased), or no journey triggers on or listens to its name."""
                if entry.kind != "event":
                    return False
                name = entry.event_name
                if name is not None and name not in concerned:
                    concerned[name] = self.router.concerns(name)
                return name is None or not concerned[name]

            for queue in queues.values():
                due = (as_utc(queue[0].available_at) - now).total_seconds()
                if due > 0:
                    next_due = due if next_due is None else min(next_due, due)
                elif all(concerns_nothing(entry) for entry in queue):
                    # Most events start and reach no journey: done here, without a task.
                    for entry in queue:
                        done.append(entry)
                        self._resolve(entry.message_id, RouteResult())
                else:
                    ready.append(queue)
            gate = asyncio.Semaphore(self.concurrency)

            async def customer(queue: Sequence[Row[Any]]) -> None:
                nonlocal failed
                async with gate:
                    for entry in queue:
                        try:
                            result = await self._deliver(entry)
                        except Exception as error:
                            reason = parking_reason(error, entry.attempts + 1, self.max_attempts)
                            if reason is not None:
                                await self._park(entry, reason)
                                continue  # never deliverable: the customer's queue goes on
                            failed = True
                            await self._retry(entry, error)
                            return  # the customer's later entries wait behind this one
                        done.append(entry)
                        self._resolve(entry.message_id, result)

            await asyncio.gather(*(customer(queue) for queue in ready))
            await self._write(self.store.outbox_done, done)
            # A failed entry is due again after its backoff, which next_due does not know.
            self._drained = len(entries) < self.batch_size and not failed
            return len(done), next_due or 0.0

    async def _deliver(self, entry: Row[Any]) -> RouteResult:
        if entry.kind == "merge":
            return await self._identified(entry)
        if entry.kind == "audiences":
            return await self._leave_audiences(entry)
        if entry.event_name is None:
            return RouteResult()  # the event row is gone (erased): nothing left to route
        return await self.router.deliver(
            CustomerEvent(
                name=entry.event_name,
                customer_id=entry.event_customer_id,
                properties=entry.event_properties,
                timestamp=as_utc(entry.event_timestamp),
                message_id=entry.message_id,
                source=entry.event_source,
            )
        )

    async def _leave_audiences(self, entry: Row[Any]) -> RouteResult:
        """Start the workflow that takes the customer out of every ad audience; one per
        entry (its id is the entry's), so a delivery repeated after a crash starts nothing."""
        workflow_id = f"audiences/{entry.message_id}"
        with contextlib.suppress(WorkflowAlreadyStartedError):
            await self.router.client.start_workflow(
                LEAVE_AUDIENCES_WORKFLOW,
                LeaveAudiencesRequest(
                    customer_id=entry.customer_id,
                    reason=str(entry.payload.get("reason") or "consent withdrawn"),
                    scheduled_at=utcnow(),
                ),
                id=workflow_id,
                task_queue=self.router.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )
        return RouteResult()

    async def _identified(self, entry: Row[Any]) -> RouteResult:
        """Tell each running instance of a merged anonymous profile who the customer is."""
        result = RouteResult()
        signal = IdentifiedSignal(
            customer_id=str(entry.payload["to"]), previous_id=str(entry.payload["from"])
        )
        for workflow_id in entry.payload.get("workflow_ids", []):
            handle = self.router.client.get_workflow_handle(workflow_id)
            try:
                await handle.signal(SIGNAL_IDENTIFIED, signal)
            except RPCError as error:
                if error.status == RPCStatusCode.NOT_FOUND:
                    continue  # it ended meanwhile
                raise
            result.signalled.append(workflow_id)
        return result

    async def _retry(self, entry: Row[Any], error: Exception) -> None:
        backoff = min(self.max_backoff, 0.2 * 2 ** min(entry.attempts, 10))
        log.warning(
            "delivery of %s for customer %s failed (attempt %d), retrying in %.1fs: %s",
            entry.message_id,
            entry.customer_id,
            entry.attempts + 1,
            backoff,
            error,
        )
        due = utcnow() + timedelta(seconds=backoff)
        await self._write(self.store.outbox_retry, entry, repr(error), due)

    async def _park(self, entry: Row[Any], reason: str) -> None:
        self.parked += 1
        log.error(
            "delivery of %s for customer %s parked as a dead letter after %d attempt(s): %s "
            "(`hilo events dead-letters` lists them)",
            entry.message_id,
            entry.customer_id,
            entry.attempts + 1,
            reason,
        )
        await self._write(self.store.outbox_park, entry, reason)

    # ------------------------------------------------------------ waiting for a delivery

    async def routed(self, message_id: str, timeout: float) -> RouteResult | None:
        """The result of delivering ``message_id``, or None if not delivered in time.

        When no dispatcher loop runs in this process (an app without its lifespan), the
        caller's own pass delivers it.
        """
        future: asyncio.Future[RouteResult] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(message_id, []).append(future)
        try:
            if self._task is None:
                await self.dispatch_once()
            else:
                self.wake()
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return None
        finally:
            waiting = self._waiters.get(message_id, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._waiters.pop(message_id, None)

    def _resolve(self, message_id: str, result: RouteResult) -> None:
        for future in self._waiters.get(message_id, []):
            if not future.done():
                future.set_result(result)
