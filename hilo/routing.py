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
from datetime import UTC, datetime, timedelta

from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from hilo.conditions import key_text, lookup
from hilo.events import CustomerEvent
from hilo.ids import journey_workflow_id
from hilo.journey_runs import SIGNAL_EVENT, JourneyInput, workflow_event
from hilo.journeys import JourneyDefinition, PublishedJourney
from hilo.storage import Journey, JourneyVersion, Store


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

        The API stores events through :mod:`hilo.ingest` and the dispatcher delivers them;
        this shortcut serves embedded use (simulations, benchmarks).
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
            instance_key = key_text(value)
        workflow_id = journey_workflow_id(journey.key, event.customer_id, instance_key)
        previous = await asyncio.to_thread(self.store.get_instance, workflow_id)
        entry = definition.entry
        if previous is not None and previous.trigger_message_id == event.message_id:
            result.not_entered[journey.key] = "already entered from this event"
            return
        if previous is not None and previous.status == "active":
            result.not_entered[journey.key] = "already in this journey"
            return
        if previous is not None and entry.reentry == "once":
            result.not_entered[journey.key] = "re-entry is 'once' and the customer already entered"
            return
        if previous is not None and entry.reentry == "after_cooldown" and previous.ended_at:
            assert entry.cooldown is not None
            ready_at = previous.ended_at + entry.cooldown
            if _now(event) < ready_at:
                result.not_entered[journey.key] = f"cooling down until {ready_at.isoformat()}"
                return
        from workflows.journey import JourneyWorkflow, start_search_attributes

        try:
            handle = await self.client.start_workflow(
                JourneyWorkflow.run,
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
                task_queue=self.task_queue,
                task_timeout=self.task_timeout,
                id_reuse_policy=(
                    WorkflowIDReusePolicy.REJECT_DUPLICATE
                    if entry.reentry == "once"
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
            )
        except WorkflowAlreadyStartedError:
            result.not_entered[journey.key] = "already in this journey"
            return
        await asyncio.to_thread(
            self.store.instance_started,
            workflow_id=workflow_id,
            journey_key=journey.key,
            version=version.version,
            customer_id=event.customer_id,
            instance_key=instance_key,
            run_id=handle.result_run_id or handle.first_execution_run_id or workflow_id,
            trigger_message_id=event.message_id,
        )
        result.started.append(workflow_id)
        result.handles[workflow_id] = handle

    async def _signal(self, handle: WorkflowHandle, event: CustomerEvent) -> bool:
        try:
            await handle.signal(SIGNAL_EVENT, event)
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                return False  # it ended between our read and the signal
            raise
        return True


def _now(event: CustomerEvent) -> datetime:
    return max(event.timestamp, datetime.now(UTC))
