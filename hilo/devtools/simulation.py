"""Simulation: the real journey workflow on Temporal's time-skipping test server.

A scenario scripts one customer (profile, consent, events at offsets) and says what it
expects; :func:`simulate` runs it and returns the timeline of what would be sent when::

    +45m email cart_reminder_1
    +4h push cart_push
    +2d end completed

A 30-day journey simulates in seconds because the server skips every timer.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.testing import WorkflowEnvironment

from hilo.db.store import Store
from hilo.devtools.devserver import tool_path
from hilo.events import CustomerEvent
from hilo.intake.routing import EventRouter, RouteResult
from hilo.journeys import search_attributes
from hilo.journeys.definitions import JourneyDefinition
from hilo.journeys.durations import Duration, format_duration, parse_duration
from hilo.journeys.runs import JourneyResult

_quiet_runtime: Runtime | None = None


def quiet_runtime() -> Runtime:
    """A runtime whose SDK core logs only errors: the test server lacks features the SDK
    warns about on every worker start (heartbeat details on failure), which are not ours."""
    global _quiet_runtime
    if _quiet_runtime is None:
        _quiet_runtime = Runtime(
            telemetry=TelemetryConfig(
                logging=LoggingConfig(
                    filter=TelemetryFilter(core_level="ERROR", other_level="ERROR")
                )
            )
        )
    return _quiet_runtime


async def start_time_skipping() -> WorkflowEnvironment:
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter,
        test_server_existing_path=tool_path("temporal-test-server"),
        runtime=quiet_runtime(),
    )
    await search_attributes.register(env.client, env.client.namespace)
    return env


# ---------------------------------------------------------------- scenarios


class ScenarioCustomer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = "customer-1"
    traits: dict[str, Any] = Field(default_factory=dict)
    consent: dict[str, Any] = Field(default_factory=dict)
    timezone: str | None = None
    locale: str | None = None
    devices: list[str] | None = Field(
        None,
        description="Push device tokens; by default one simulated device when push consent "
        "is given, none otherwise.",
    )


class ScenarioEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    at: Duration | None = None
    event: str
    properties: dict[str, Any] = Field(default_factory=dict)


class Scenario(BaseModel):
    """A scripted customer and the timeline the journey should produce."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    customer: ScenarioCustomer = Field(default_factory=ScenarioCustomer)
    start: datetime | None = Field(
        None, description="Clock at the first event (UTC); default: the server's clock."
    )
    events: list[ScenarioEvent] = Field(min_length=1)
    expect: list[str] | None = Field(
        None,
        description="Timeline lines, each an offset and what happened, e.g. "
        "'+45m email cart_reminder_1'; offsets compare as durations (+0s is +0m).",
    )

    @field_validator("expect")
    @classmethod
    def _offsets(cls, lines: list[str] | None) -> list[str] | None:
        for index, line in enumerate(lines or []):
            try:
                timeline_entry(line)
            except ValueError as error:
                raise ValueError(f"expect[{index}]: {error}") from None
        return lines

    @classmethod
    def from_yaml(cls, text: str, source: str = "scenario") -> Scenario:
        try:
            return cls.model_validate(yaml.safe_load(text))
        except ValidationError as error:
            lines = [
                f"  - {'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
                for e in error.errors()
            ]
            raise ValueError(f"{source}: scenario is invalid:\n" + "\n".join(lines)) from None


def timeline_entry(line: str) -> tuple[timedelta, str]:
    """``+45m email cart_reminder_1`` as (45 minutes, "email cart_reminder_1")."""
    offset, _, what = line.strip().partition(" ")
    if not offset.startswith("+") or not what.strip():
        raise ValueError(
            f"{line!r} is not a timeline line; write an offset and what happened, "
            "e.g. '+45m email cart_reminder_1' or '+2d end completed'"
        )
    return parse_duration(offset[1:]), " ".join(what.split())


def same_entry(expected: str, actual: str) -> bool:
    """Lines that say the same: offsets compared as durations (+0m is +0s, +2d is +48h)."""
    try:
        return timeline_entry(expected) == timeline_entry(actual)
    except ValueError:
        return expected == actual


@dataclass
class SimulationReport:
    timeline: list[str]
    results: dict[str, JourneyResult]
    expected: list[str] | None
    routes: list[RouteResult] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        if self.expected is None:
            return True
        return len(self.expected) == len(self.timeline) and all(
            same_entry(want, got) for want, got in zip(self.expected, self.timeline, strict=True)
        )

    def mismatch(self) -> str:
        """A line-by-line comparison for an author to read."""
        expected = self.expected or []
        width = max([len(line) for line in expected] + [8])
        rows = [f"  {'expected'.ljust(width)}   actual"]
        for index in range(max(len(expected), len(self.timeline))):
            want = expected[index] if index < len(expected) else ""
            got = self.timeline[index] if index < len(self.timeline) else ""
            mark = " " if want and got and same_entry(want, got) else "✗"
            rows.append(f"{mark} {want.ljust(width)}   {got}")
        return "\n".join(rows)


class JourneyLab:
    """Hilo's engine on one Temporal server: publish, send events, advance the clock."""

    def __init__(self, env: WorkflowEnvironment, store: Store, router: EventRouter) -> None:
        self.env = env
        self.client: Client = env.client
        self.store = store
        self.router = router
        self.handles: dict[str, WorkflowHandle] = {}

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        env: WorkflowEnvironment,
        store: Store,
        max_steps_per_run: int = 500,
        sandboxed: bool = False,
        activities: Any = None,
    ) -> AsyncIterator[JourneyLab]:
        """``activities``: a JourneyActivities with real providers; capture when None."""
        from worker.main import build_worker

        task_queue = f"hilo-lab-{uuid.uuid4().hex[:8]}"
        worker = build_worker(
            env.client,
            store,
            task_queue,
            max_concurrent_activities=20,
            sandboxed=sandboxed,
            activities=activities,
        )
        router = EventRouter(store, env.client, task_queue, max_steps_per_run=max_steps_per_run)
        async with worker:
            yield cls(env, store, router)

    def publish(self, definition: JourneyDefinition) -> int:
        from hilo.catalog import JourneyCatalog

        return JourneyCatalog(self.store).publish(definition)

    async def now(self) -> datetime:
        return await self.env.get_current_time()

    async def send(self, name: str, customer_id: str, **properties: Any) -> RouteResult:
        event = CustomerEvent(
            name=name,
            customer_id=customer_id,
            properties=properties,
            timestamp=await self.now(),
        )
        route = await self.router.route(event)
        self.handles.update(route.handles)
        return route

    async def advance(self, duration: timedelta) -> None:
        await self.env.sleep(duration)

    async def result(self, workflow_id: str) -> JourneyResult:
        # The handle from the start skips time while it waits (a plain handle would not).
        handle = self.handles[workflow_id]
        return JourneyResult.model_validate(await handle.result())

    async def settle(self, workflow_id: str, timeout: float = 30.0) -> None:
        """Wait for an instance to close without letting the clock run.

        ``result()`` lets the test server skip time until it sees the close, which can leave
        the clock years ahead; tests about elapsed time use this after ``advance``.
        """
        handle = self.handles[workflow_id]
        plain = self.client.get_workflow_handle(workflow_id, run_id=handle.result_run_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (await plain.describe()).status == WorkflowExecutionStatus.RUNNING:
            if loop.time() > deadline:
                raise TimeoutError(f"{workflow_id} still running after {timeout}s")
            await asyncio.sleep(0.05)

    def timeline(self, customer_id: str, since: datetime) -> list[str]:
        lines: list[tuple[datetime, int, str]] = []
        for message in self.store.messages(customer_id=customer_id):
            line = f"{_offset(message.scheduled_at - since)} {message.channel} {message.template}"
            if message.status != "sent":
                line += f" {message.status}" + (f" ({message.reason})" if message.reason else "")
            lines.append((message.scheduled_at, 0, line))
        for instance in self.store.instances_of_customer(customer_id):
            if instance.ended_at is None:
                continue
            line = f"{_offset(instance.ended_at - since)} end {instance.status}"
            if instance.exit_reason and instance.status != "completed":
                line += f" ({instance.exit_reason})"
            lines.append((instance.ended_at, 1, line))
        return [line for _when, _order, line in sorted(lines, key=lambda item: item[:2])]


def _offset(delta: timedelta) -> str:
    # Round to the minute: activities take real milliseconds even when timers are skipped.
    seconds = int(round(delta.total_seconds() / 60.0)) * 60
    return "+" + format_duration(timedelta(seconds=seconds))


async def run_scenario(
    lab: JourneyLab, definition: JourneyDefinition, scenario: Scenario
) -> SimulationReport:
    customer = scenario.customer
    lab.store.upsert_profile(
        customer.id,
        traits=customer.traits,
        consent=customer.consent,
        timezone=customer.timezone,
        locale=customer.locale,
    )
    devices = customer.devices
    if devices is None:
        devices = [f"simulated-device-{customer.id}"] if customer.consent.get("push") else []
    for token in devices:
        lab.store.register_device(customer.id, "push", token)
    lab.publish(definition)
    begin = await lab.now()
    if scenario.start is not None:
        await lab.advance(max(scenario.start - begin, timedelta(0)))
        begin = await lab.now()
    routes: list[RouteResult] = []
    started: list[str] = []
    for item in sorted(scenario.events, key=lambda e: e.at or timedelta(0)):
        target = begin + (item.at or timedelta(0))
        now = await lab.now()
        if target > now:
            await lab.advance(target - now)
        route = await lab.send(item.event, customer.id, **item.properties)
        routes.append(route)
        started.extend(route.started)
    results = {workflow_id: await lab.result(workflow_id) for workflow_id in started}
    return SimulationReport(
        timeline=lab.timeline(customer.id, begin),
        results=results,
        expected=scenario.expect,
        routes=routes,
    )


async def simulate(definition: JourneyDefinition, scenario: Scenario) -> SimulationReport:
    """Run one scenario on a fresh time-skipping server and a throw-away database."""
    with tempfile.TemporaryDirectory(prefix="hilo-sim-") as folder:
        store = Store(f"sqlite:///{Path(folder) / 'simulation.db'}")
        store.migrate()
        env = await start_time_skipping()
        try:
            async with JourneyLab.open(env, store) as lab:
                return await run_scenario(lab, definition, scenario)
        finally:
            await env.shutdown()
            store.dispose()


def simulate_sync(definition: JourneyDefinition, scenario: Scenario) -> SimulationReport:
    return asyncio.run(simulate(definition, scenario))
