"""Event routing: an event starts the journeys it triggers and reaches the instances
that listen to it, found through the instance table (never a visibility query).

The published journeys are cached in memory and read again when the catalog changes
through the same :class:`Store` or after ``catalog_ttl`` seconds (a change made by another
process). The store's calls run in a thread: a SQLite write waiting for the writer's turn
must not stop the event loop (the API's and the dispatcher's) meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from hilo.clock import utcnow
from hilo.db.models import ENTRY_STARTING, LIVE_STATUSES, Journey, JourneyInstance, JourneyVersion
from hilo.db.store import Store
from hilo.events import CustomerEvent
from hilo.ids import bounded_instance_key, journey_workflow_id
from hilo.journeys.conditions import key_text, lookup
from hilo.journeys.definitions import Entry, JourneyDefinition, PublishedJourney
from hilo.journeys.runs import (
    JOURNEY_WORKFLOW,
    SIGNAL_EVENT,
    TRIGGER_MEMO,
    JourneyInput,
    JourneyResult,
    workflow_event,
)
from hilo.journeys.search_attributes import start_search_attributes


@dataclass
class RouteResult:
    duplicate: bool = False
    started: list[str] = field(default_factory=list)
    signalled: list[str] = field(default_factory=list)
    not_entered: dict[str, str] = field(default_factory=dict)
    handles: dict[str, WorkflowHandle] = field(default_factory=dict, repr=False)


class EventRouter:
    def __init__(
        self,
        store: Store,
        client: Client,
        task_queue: str,
        search_attributes: bool = True,
        max_steps_per_run: int = 500,
        catalog_ttl: float = 2.0,
        send_timeout: timedelta = timedelta(seconds=60),
        task_timeout: timedelta | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.task_queue = task_queue
        self.search_attributes = search_attributes
        self.max_steps_per_run = max_steps_per_run
        self.catalog_ttl = catalog_ttl
        self.send_timeout = send_timeout
        self.task_timeout = task_timeout
        self._definitions: dict[tuple[str, int], JourneyDefinition] = {}
        self._journeys: list[tuple[Journey, JourneyVersion, JourneyDefinition]] = []
        self._journeys_read: tuple[int, float] | None = None  # (catalog generation, when)

    def journeys(self) -> list[tuple[Journey, JourneyVersion, JourneyDefinition]]:
        """Every journey with its latest version and parsed definition."""
        read = self._journeys_read
        if (
            read is None
            or read[0] != self.store.catalog_generation
            or time.monotonic() - read[1] > self.catalog_ttl
        ):
            generation = self.store.catalog_generation
            self._journeys = [
                (journey, version, self._definition(version))
                for journey, version in self.store.published_journeys()
            ]
            self._journeys_read = (generation, time.monotonic())
        return self._journeys

    def concerns(self, name: str) -> bool:
        """Whether any journey triggers on or listens to events called ``name``."""
        return any(
            definition.trigger.event == name or name in definition.listens_to()
            for _journey, _version, definition in self.journeys()
        )

    def _definition(self, version: JourneyVersion) -> JourneyDefinition:
        cache_key = (version.journey_key, version.version)
        if cache_key not in self._definitions:
            self._definitions[cache_key] = JourneyDefinition.model_validate(version.definition)
        return self._definitions[cache_key]

    async def route(self, event: CustomerEvent) -> RouteResult:
        """Store the event once, then start and signal what it concerns, in this call.

        The API stores events through :mod:`hilo.intake.acceptance` and the dispatcher
        delivers them; this shortcut serves embedded use (simulations, benchmarks).
        """
        stored = await asyncio.to_thread(
            self.store.record_event,
            event.message_id,
            event.customer_id,
            event.name,
            event.properties,
            event.timestamp,
            event.source,
        )
        if not stored:
            return RouteResult(duplicate=True)
        result = await self.deliver(event)
        # Only now is the event done: a failure above leaves it to be routed again on retry.
        await asyncio.to_thread(self.store.event_routed, event.message_id)
        return result

    async def deliver(self, event: CustomerEvent) -> RouteResult:
        """Start the journeys ``event`` triggers and signal the instances listening to it.

        Safe to repeat after a failure midway: an entry already made from this event is
        not made again, and the workflow ignores an event it has seen.
        """
        result = RouteResult()
        journeys = self.journeys()
        for journey, version, definition in journeys:
            if definition.trigger.event != event.name:
                continue
            if journey.status != "active":
                result.not_entered[journey.key] = f"journey is {journey.status}"
                continue
            trigger_where = definition.trigger.where
            if trigger_where and not trigger_where.evaluate({"event": event.as_context()}):
                result.not_entered[journey.key] = "trigger filter did not match"
                continue
            await self._enter(journey, version, definition, event, result)
        # Paused and archived journeys too: their running instances must still hear exits.
        listening = {
            journey.key
            for journey, _version, definition in journeys
            if event.name in definition.listens_to()
        }
        active = await asyncio.to_thread(self.store.active_instances, event.customer_id, listening)
        for instance in active:
            if instance.workflow_id in result.started:
                continue
            # The instance hears the properties its rules read, not the whole event.
            running = await self._version(instance.journey_key, instance.version)
            heard = event if running is None else workflow_event(running, event, "event")
            if await self._signal(self.client.get_workflow_handle(instance.workflow_id), heard):
                result.signalled.append(instance.workflow_id)
        return result

    async def _version(self, key: str, version: int) -> JourneyDefinition | None:
        """The definition an instance runs: published versions never change, so each is
        read once (the latest ones come with the catalog)."""
        if (key, version) not in self._definitions:
            found = await asyncio.to_thread(self.store.get_version, key, version)
            if found is None:
                return None
            self._definitions[(key, version)] = JourneyDefinition.model_validate(found.definition)
        return self._definitions[(key, version)]

    async def _enter(
        self,
        journey: Journey,
        version: JourneyVersion,
        definition: JourneyDefinition,
        event: CustomerEvent,
        result: RouteResult,
    ) -> None:
        instance_key: str | None = None
        if definition.trigger.key:
            value = lookup({"properties": event.properties}, definition.trigger.key)
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                result.not_entered[journey.key] = (
                    f"event has no {definition.trigger.key}, the journey's instance key"
                )
                return
            # The key as the workflow id and the instance table hold it (long ones hashed).
            instance_key = bounded_instance_key(key_text(value))
        workflow_id = journey_workflow_id(journey.key, event.customer_id, instance_key)
        latest = await asyncio.to_thread(self.store.get_instance, workflow_id)
        if latest is not None and latest.trigger_message_id == event.message_id:
            if latest.status != ENTRY_STARTING:
                result.not_entered[journey.key] = "already entered from this event"
                return
            entry: JourneyInstance | None = latest
            recorded_now = False
        else:
            refusal = _refusal(definition.entry, latest, event)
            if refusal is not None:
                result.not_entered[journey.key] = refusal
                return
            # The entry is recorded before the start, so that no workflow runs without it.
            entry, recorded_now = await asyncio.to_thread(
                self.store.record_entry,
                workflow_id,
                journey.key,
                version.version,
                event.customer_id,
                instance_key,
                event.message_id,
            )
        if entry is None:
            result.not_entered[journey.key] = "already in this journey"
            return
        if entry.status != ENTRY_STARTING:
            result.not_entered[journey.key] = "already entered from this event"
            return
        # A starting entry found, not made now: an earlier delivery of this event recorded
        # it and may have started its workflow before it died.
        running = None if recorded_now else await self._started_by(workflow_id, event.message_id)
        if running is None:
            running = await self._start(
                journey, version, definition, event, workflow_id, instance_key
            )
        if running is None:
            await asyncio.to_thread(self.store.entry_refused, workflow_id, event.message_id)
            result.not_entered[journey.key] = "already in this journey"
            return
        handle, run_id = running
        await asyncio.to_thread(self.store.instance_started, workflow_id, event.message_id, run_id)
        result.started.append(workflow_id)
        result.handles[workflow_id] = handle

    async def _start(
        self,
        journey: Journey,
        version: JourneyVersion,
        definition: JourneyDefinition,
        event: CustomerEvent,
        workflow_id: str,
        instance_key: str | None,
    ) -> tuple[WorkflowHandle, str] | None:
        """Start the entry's workflow: its handle and run id; None when Temporal refuses
        it for another entry's workflow."""
        try:
            handle = await self.client.start_workflow(
                JOURNEY_WORKFLOW,
                JourneyInput(
                    journey=PublishedJourney(
                        key=journey.key, version=version.version, definition=definition
                    ),
                    customer_id=event.customer_id,
                    instance_key=instance_key,
                    # What conditions and match_trigger read: templates read the stored event.
                    trigger=workflow_event(definition, event, "trigger"),
                    max_steps_per_run=self.max_steps_per_run,
                    search_attributes=self.search_attributes,
                    send_timeout_seconds=self.send_timeout.total_seconds(),
                ),
                id=workflow_id,
                result_type=JourneyResult,
                task_queue=self.task_queue,
                task_timeout=self.task_timeout,
                id_reuse_policy=(
                    WorkflowIDReusePolicy.REJECT_DUPLICATE
                    if definition.entry.reentry == "once"
                    else WorkflowIDReusePolicy.ALLOW_DUPLICATE
                ),
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                search_attributes=(
                    start_search_attributes(
                        journey.key, event.customer_id, version.version, definition
                    )
                    if self.search_attributes
                    else None
                ),
                static_summary=f"{definition.name} v{version.version} · customer "
                f"{event.customer_id}" + (f" · {instance_key}" if instance_key else ""),
                memo={TRIGGER_MEMO: event.message_id},
            )
        except WorkflowAlreadyStartedError:
            # Started by this event already (the start of a delivery that then died), or
            # by another event's entry.
            return await self._started_by(workflow_id, event.message_id)
        return handle, handle.result_run_id or handle.first_execution_run_id or workflow_id

    async def _started_by(
        self, workflow_id: str, message_id: str
    ) -> tuple[WorkflowHandle, str] | None:
        """The workflow ``message_id`` started as ``workflow_id`` (its handle and first
        run's id), if the latest run is that one.

        A run that closed without recording its end (terminated, timed out) gets Temporal's
        word for it on its entry, which would otherwise stay starting."""
        try:
            described = await self.client.get_workflow_handle(workflow_id).describe()
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                return None
            raise
        if await described.memo_value(TRIGGER_MEMO, None) != message_id:
            return None
        info = described.raw_description.workflow_execution_info
        run_id = info.first_run_id or described.run_id
        handle = self.client.get_workflow_handle(workflow_id, run_id=described.run_id)
        if described.status not in (None, WorkflowExecutionStatus.RUNNING):
            await asyncio.to_thread(
                self.store.instance_ended,
                workflow_id,
                run_id,
                described.status.name.lower(),
                "closed before its end was recorded",
                described.close_time or utcnow(),
                None,
                None,
                trigger_message_id=message_id,
            )
        return handle, run_id

    async def _signal(self, handle: WorkflowHandle, event: CustomerEvent) -> bool:
        try:
            await handle.signal(SIGNAL_EVENT, event)
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                return False  # it ended between our read and the signal
            raise
        return True


def _refusal(entry: Entry, latest: JourneyInstance | None, event: CustomerEvent) -> str | None:
    """Why the entry rules keep the customer out, given their latest entry; None to enter."""
    if latest is None:
        return None
    if latest.status in LIVE_STATUSES:
        return "already in this journey"
    if entry.reentry == "once":
        return "re-entry is 'once' and the customer already entered"
    if entry.reentry == "after_cooldown" and latest.ended_at:
        assert entry.cooldown is not None
        ready_at = latest.ended_at + entry.cooldown
        if _now(event) < ready_at:
            return f"cooling down until {ready_at.isoformat()}"
    return None


def _now(event: CustomerEvent) -> datetime:
    return max(event.timestamp, utcnow())
