"""Journey throughput: Hilo's interpreter against a hand-written workflow of the same size.

One Temporal dev server (in memory) and one SQLite store serve both sides:

* **hilo**: the abandoned-cart journey from ``examples/journeys`` with every wait cut to
  ``--wait`` seconds, published through the catalog, N customers with email and push consent,
  N ``Cart Abandoned`` events routed by :class:`~hilo.intake.routing.EventRouter` and run by
  the real worker (:func:`worker.main.build_worker`) with the production client
  (``worker.main.connect``).
* **bare**: a minimal workflow defined here that schedules exactly the activities and timers one
  Hilo journey did (read from its history), in the same order, with activities that do nothing,
  started with ``client.start_workflow`` on its own task queue and worker.

Each round starts N journeys and times from the first start to the last completion. After a
warm-up of each side, rounds alternate in pairs (bare, hilo, then hilo, bare, ...) so that
machine noise hits both sides; the table gives the median and the best round of each and
their ratio, and the ratio within each pair of neighbouring rounds.

    .venv/bin/python bench/journey_throughput.py               # 200 journeys, 5 rounds each
    .venv/bin/python bench/journey_throughput.py --journeys 500 --rounds 2
    .venv/bin/python bench/journey_throughput.py --quick       # smoke test: 20 journeys, 1 round
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

if __name__ == "__main__":
    # Run as a script from anywhere: import the project itself.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    # The workflow sandbox imports the workflow's module afresh for every new journey. An
    # installed package has bytecode for it; a checkout run with PYTHONDONTWRITEBYTECODE=1
    # (as on the dev machines) would recompile workflows/journey.py each time, ~9 ms of CPU
    # per journey that production does not pay. Keep bytecode in a temp dir, out of the tree.
    if sys.dont_write_bytecode and sys.pycache_prefix is None:
        sys.pycache_prefix = tempfile.mkdtemp(prefix="hilo-bench-pycache-")
        sys.dont_write_bytecode = False
        atexit.register(shutil.rmtree, sys.pycache_prefix, True)

from temporalio import activity, workflow  # noqa: E402

# The workflow sandbox re-imports this file (as __temporal_main__): let it reuse these modules.
with workflow.unsafe.imports_passed_through():
    import yaml
    from temporalio.api.enums.v1 import EventType
    from temporalio.client import Client, WorkflowHandle
    from temporalio.worker import UnsandboxedWorkflowRunner, Worker
    from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

    from bench.common import cpu_seconds, run_async
    from hilo.catalog import JourneyCatalog
    from hilo.db.store import Store
    from hilo.devtools.devserver import DevServer
    from hilo.events import CustomerEvent
    from hilo.intake.routing import EventRouter
    from hilo.journeys.definitions import JourneyDefinition
    from hilo.journeys.runs import SEND_MESSAGE
    from hilo.journeys.validate import parse_journey
    from hilo.settings import PROJECT_ROOT, Settings
    from worker.main import build_worker, connect

T = TypeVar("T")
EXAMPLE = PROJECT_ROOT / "examples" / "journeys" / "abandoned_cart.yaml"
BENCH_KEY = "bench_abandoned_cart"
TARGET_RATIO = 0.8

# ---------------------------------------------------------------- the bare side


@dataclass
class BarePlan:
    """What one journey does, in order: ``"activity"`` or a timer of that many seconds."""

    steps: list[str | float] = field(default_factory=list)


@activity.defn(name="bench_noop")
async def noop() -> None:
    """An activity that does nothing."""


@workflow.defn(name="BareJourney")
class BareJourney:
    @workflow.run
    async def run(self, plan: BarePlan) -> int:
        done = 0
        for step in plan.steps:
            if step == "activity":
                await workflow.execute_activity(noop, start_to_close_timeout=timedelta(seconds=30))
            else:
                await workflow.sleep(float(step))
            done += 1
        return done


# ---------------------------------------------------------------- the hilo side


def bench_journey(wait_seconds: int) -> JourneyDefinition:
    """The abandoned-cart example, same steps, every wait and timeout cut to ``wait_seconds``."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["key"] = BENCH_KEY
    raw["name"] = "Abandoned cart (benchmark)"

    def shorten(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "wait" and "duration" in node:
                node["duration"] = f"{wait_seconds}s"
            if node.get("type") == "wait_for" and "timeout" in node:
                node["timeout"] = f"{wait_seconds}s"
            for value in node.values():
                shorten(value)
        elif isinstance(node, list):
            for item in node:
                shorten(item)

    shorten(raw["steps"])
    return parse_journey(raw, source="bench")


def cart_event(customer: str, cart_id: str, index: int) -> CustomerEvent:
    value = 350 if index % 2 else 80  # both arms of the cart-value branch: one email either way
    return CustomerEvent(
        name="Cart Abandoned",
        customer_id=customer,
        properties={
            "cart_id": cart_id,
            "cart_value": value,
            "product_name": "Trail shoes",
            "cart_url": f"https://shop.example/cart/{cart_id}",
        },
    )


# ---------------------------------------------------------------- measurement


@dataclass
class Round:
    side: str
    journeys: int
    seconds: float
    start_seconds: float  # until every journey was started (routed, for hilo)
    python_cpu: float  # CPU seconds of this process (client, router, workers) in the round
    server_cpu: float  # CPU seconds of the dev server in the round
    # How late the server fired timers, average and worst, in a sample of the round's
    # journeys: a wait that fires late stalls a round whatever the engine.
    timers_late: tuple[float, float] = (0.0, 0.0)

    @property
    def rate(self) -> float:
        return self.journeys / self.seconds


@dataclass
class HistoryCounts:
    activities: int
    timers: int
    events: int
    workflow_tasks: int
    timer_seconds: float
    history_bytes: int
    upserts: int
    activity_types: Counter[str]
    plan: BarePlan

    def line(self) -> str:
        kinds = ", ".join(
            name if count == 1 else f"{name} x{count}"
            for name, count in self.activity_types.items()
        )
        return (
            f"{self.activities} activities ({kinds}), {self.timers} timers "
            f"({self.timer_seconds:g}s), {self.upserts} search-attribute upserts, "
            f"{self.workflow_tasks} workflow tasks, "
            f"{self.events} history events ({self.history_bytes / 1024:.1f} KiB)"
        )


LOCAL_ACTIVITY_MARKER = "core_local_activity"


def _local_activity_type(event: Any) -> str:
    data = event.marker_recorded_event_attributes.details.get("data")
    try:
        return str(json.loads(data.payloads[0].data)["activity_type"])
    except (AttributeError, IndexError, KeyError, ValueError):
        return "local activity"


async def history_counts(handle: WorkflowHandle[Any, Any]) -> HistoryCounts:
    history = await handle.fetch_history()
    kinds: Counter[int] = Counter()
    activity_types: Counter[str] = Counter()
    plan = BarePlan()
    timer_seconds = 0.0
    local_activities = 0
    for event in history.events:
        kinds[event.event_type] += 1
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            plan.steps.append("activity")
            activity_types[event.activity_task_scheduled_event_attributes.activity_type.name] += 1
        elif event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED and (
            event.marker_recorded_event_attributes.marker_name == LOCAL_ACTIVITY_MARKER
        ):
            # Hilo runs its bookkeeping (profile read, finish) as local activities; the bare
            # workflow runs the same number of activities, all of them regular ones.
            plan.steps.append("activity")
            local_activities += 1
            activity_types[f"{_local_activity_type(event)} (local)"] += 1
        elif event.event_type == EventType.EVENT_TYPE_TIMER_STARTED:
            seconds = event.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
            plan.steps.append(seconds.total_seconds())
            timer_seconds += seconds.total_seconds()
    return HistoryCounts(
        activities=kinds[EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED] + local_activities,
        timers=kinds[EventType.EVENT_TYPE_TIMER_STARTED],
        events=len(history.events),
        workflow_tasks=kinds[EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED],
        timer_seconds=timer_seconds,
        history_bytes=sum(event.ByteSize() for event in history.events),
        upserts=kinds[EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES],
        activity_types=activity_types,
        plan=plan,
    )


async def timer_lateness(handles: Sequence[WorkflowHandle[Any, Any]]) -> tuple[float, float]:
    """Average and worst seconds between a timer falling due and its firing."""
    late: list[float] = []
    for handle in handles:
        started: dict[int, Any] = {}
        for event in (await handle.fetch_history()).events:
            if event.event_type == EventType.EVENT_TYPE_TIMER_STARTED:
                started[event.event_id] = event
            elif event.event_type == EventType.EVENT_TYPE_TIMER_FIRED:
                begun = started[event.timer_fired_event_attributes.started_event_id]
                due = (
                    begun.event_time.ToDatetime()
                    + begun.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
                )
                late.append((event.event_time.ToDatetime() - due).total_seconds())
    return (sum(late) / len(late), max(late)) if late else (0.0, 0.0)


class Stopwatch:
    """Wall time and the CPU time of both processes, from one moment on."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.wall = time.perf_counter()
        self.python = cpu_seconds()
        self.server = cpu_seconds(server_pid) if server_pid else 0.0

    def round(self, side: str, journeys: int, started: float) -> Round:
        return Round(
            side,
            journeys,
            seconds=time.perf_counter() - self.wall,
            start_seconds=started - self.wall,
            python_cpu=cpu_seconds() - self.python,
            server_cpu=(cpu_seconds(self.server_pid) - self.server) if self.server_pid else 0.0,
        )


async def bounded(
    concurrency: int, job: Callable[[T], Awaitable[None]], items: Sequence[T]
) -> None:
    """``job(item)`` for every item, at most ``concurrency`` at a time (as a service would)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(item: T) -> None:
        async with gate:
            await job(item)

    await asyncio.gather(*(one(item) for item in items))


class Bench:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.store = Store(f"sqlite:///{folder / 'hilo.db'}")
        self.server = DevServer(db_file=None, log_file=folder / "temporal.log")
        self.customers = 0
        self.round_no = 0
        self.sends: int | None = None  # send_message activities per journey, once known
        self.handles: list[WorkflowHandle[Any, Any]] = []  # the last round's journeys

    async def setup(self, stack: contextlib.AsyncExitStack) -> None:
        args = self.args
        self.store.migrate()
        stack.callback(self.store.dispose)
        await self.server.start()
        stack.callback(self.server.stop)
        self.server_pid = self.server.process.pid if self.server.process else None
        settings = Settings(
            environment="test",
            temporal_address=self.server.address,
            temporal_namespace=self.server.namespace,
            task_queue=f"hilo-bench-{uuid.uuid4().hex[:8]}",
            database_url=self.store.url,
        )
        # Hilo as it runs in production: the worker's own client (pydantic, tracing).
        self.hilo_client = await connect(settings)
        self.router = EventRouter(self.store, self.hilo_client, settings.task_queue)
        self.version = JourneyCatalog(self.store).publish(bench_journey(args.wait))
        hilo_worker = build_worker(
            self.hilo_client,
            self.store,
            settings.task_queue,
            max_concurrent_activities=settings.max_concurrent_activities,
            sandboxed=args.hilo_sandboxed,
        )
        # The bare side: a plain client, its own task queue, its own worker.
        self.bare_client = await Client.connect(
            self.server.address, namespace=self.server.namespace
        )
        self.bare_queue = f"bare-bench-{uuid.uuid4().hex[:8]}"
        bare_worker = Worker(
            self.bare_client,
            task_queue=self.bare_queue,
            workflows=[BareJourney],
            activities=[noop],
            max_concurrent_activities=settings.max_concurrent_activities,
            # The SDK's default is the sandbox; Hilo's worker runs without (HILO_WORKFLOW_SANDBOX).
            workflow_runner=(
                UnsandboxedWorkflowRunner() if args.bare_unsandboxed else SandboxedWorkflowRunner()
            ),
        )
        await stack.enter_async_context(hilo_worker)
        await stack.enter_async_context(bare_worker)

    def add_customers(self, count: int) -> list[str]:
        ids = []
        for _ in range(count):
            self.customers += 1
            customer = f"bench-{self.customers}"
            self.store.upsert_profile(
                customer,
                traits={"email": f"{customer}@example.com", "first_name": "Ana"},
                consent={"email": True, "push": True},
            )
            self.store.register_device(customer, "push", f"token-{customer}")
            ids.append(customer)
        return ids

    async def results(self, handles: list[WorkflowHandle[Any, Any]], journeys: int) -> list[Any]:
        """Every journey's result: the round ends when the last one completes."""
        limit = self.args.timeout or 120.0 + journeys * 1.0
        try:
            async with asyncio.timeout(limit):
                return list(await asyncio.gather(*(handle.result() for handle in handles)))
        except TimeoutError:
            raise RuntimeError(f"{journeys} journeys did not all complete in {limit:g}s") from None

    async def hilo_round(self, journeys: int) -> tuple[Round, WorkflowHandle[Any, Any]]:
        self.round_no += 1
        customers = self.add_customers(journeys)  # not timed: profiles exist before the events
        events = [
            cart_event(customer, f"r{self.round_no}-cart-{i}", i)
            for i, customer in enumerate(customers)
        ]
        handles: list[WorkflowHandle[Any, Any]] = []

        async def route(event: CustomerEvent) -> None:
            result = await self.router.route(event)
            if len(result.started) != 1:
                raise RuntimeError(f"event did not start one journey: {result}")
            handles.extend(result.handles.values())

        watch = Stopwatch(self.server_pid)
        await bounded(self.args.concurrency, route, events)
        started = time.perf_counter()
        results = await self.results(handles, journeys)
        measured = watch.round("hilo", journeys, started)
        self.handles = handles
        bad = [r for r in results if r.status != "completed" or self.sends not in (None, r.sent)]
        if bad:
            raise RuntimeError(
                f"{len(bad)} hilo journeys did not complete with {self.sends} sends: {bad[0]}"
            )
        return measured, handles[0]

    async def bare_round(
        self, journeys: int, plan: BarePlan
    ) -> tuple[Round, WorkflowHandle[Any, Any]]:
        self.round_no += 1
        handles: list[WorkflowHandle[Any, Any]] = []

        async def start(index: int) -> None:
            handle = await self.bare_client.start_workflow(
                BareJourney.run,
                plan,
                id=f"bare/{self.round_no}/{index}",
                task_queue=self.bare_queue,
            )
            handles.append(handle)

        watch = Stopwatch(self.server_pid)
        await bounded(self.args.concurrency, start, range(journeys))
        started = time.perf_counter()
        results = await self.results(handles, journeys)
        measured = watch.round("bare", journeys, started)
        self.handles = handles
        if any(result != len(plan.steps) for result in results):
            raise RuntimeError("a bare journey did not run its whole plan")
        return measured, handles[0]


def median_round(rounds: list[Round], side: str) -> Round | None:
    """The round of median throughput (the lower middle one for an even count)."""
    mine = sorted((r for r in rounds if r.side == side), key=lambda r: r.rate)
    return mine[(len(mine) - 1) // 2] if mine else None


def report(
    args: argparse.Namespace,
    rounds: list[Round],
    hilo_counts: HistoryCounts,
    bare_counts: HistoryCounts | None,
) -> None:
    print()
    print(
        "rounds, in the order run (cpu: CPU ms per journey, of this process / the server;"
        " timers late: ms, average / worst, in a sample of 20 journeys)"
    )
    print(
        f"  {'side':<5} {'journeys':>8} {'seconds':>8} {'started in':>10} {'journeys/s':>10}"
        f" {'cpu ms/journey':>17} {'timers late':>15}"
    )
    for r in rounds:
        print(
            f"  {r.side:<5} {r.journeys:>8} {r.seconds:>8.2f} {r.start_seconds:>9.2f}s"
            f" {r.rate:>10.1f} {1000 * r.python_cpu / r.journeys:>8.1f} /"
            f"{1000 * r.server_cpu / r.journeys:>6.1f}"
            f" {1000 * r.timers_late[0]:>7.0f} /{1000 * r.timers_late[1]:>6.0f}"
        )
    print()
    print(f"one journey: hilo {hilo_counts.line()}")
    if bare_counts:
        print(f"             bare {bare_counts.line()}")
    print(
        f"(waits cut to {args.wait}s: a journey takes at least "
        f"{hilo_counts.timer_seconds:g}s however fast the engine)"
    )
    print()
    print(f"median of {args.rounds} round(s) per side; best round in brackets")
    print(
        f"  {'side':<5} {'journeys':>8} {'seconds':>14} {'journeys/s':>16}"
        f" {'py cpu ms/j':>12} {'server cpu ms/j':>16}"
    )
    best = {}
    chosen = {}
    for side in ("bare", "hilo"):
        mine = [r for r in rounds if r.side == side]
        middle = median_round(rounds, side)
        if middle is None:
            continue
        top = max(mine, key=lambda r: r.rate)
        chosen[side], best[side] = middle, top
        print(
            f"  {side:<5} {middle.journeys:>8} {middle.seconds:>7.2f} ({top.seconds:>5.2f})"
            f" {middle.rate:>8.1f} ({top.rate:>5.1f})"
            f" {1000 * middle.python_cpu / middle.journeys:>12.1f}"
            f" {1000 * middle.server_cpu / middle.journeys:>16.1f}"
        )
    if "hilo" in chosen and "bare" in chosen:
        ratio = chosen["hilo"].rate / chosen["bare"].rate
        verdict = "meets" if ratio >= TARGET_RATIO else "is BELOW"
        print()
        print(
            f"  hilo/bare throughput: {ratio:.2f} (median rounds), "
            f"{best['hilo'].rate / best['bare'].rate:.2f} (best rounds); "
            f"{verdict} the {TARGET_RATIO} target"
        )
        pairs = [
            first.rate / second.rate if first.side == "hilo" else second.rate / first.rate
            for first, second in zip(rounds[::2], rounds[1::2], strict=False)
            if {first.side, second.side} == {"hilo", "bare"}
        ]
        if pairs:
            print(
                "  hilo/bare in each pair of neighbouring rounds: "
                + ", ".join(f"{ratio:.2f}" for ratio in pairs)
                + f" (median {statistics.median(pairs):.2f})"
            )
        if args.quick:
            print("  (smoke test: too few journeys to load the machine; the ratio means little)")
        floor = hilo_counts.timer_seconds
        hilo_extra = chosen["hilo"].seconds - floor
        bare_extra = chosen["bare"].seconds - floor
        if bare_extra > 0:
            print(
                f"  seconds beyond the {floor:g}s of waits: hilo {hilo_extra:.2f}, "
                f"bare {bare_extra:.2f} ({hilo_extra / bare_extra:.1f}x)"
            )


async def measure(bench: Bench, args: argparse.Namespace) -> None:
    sides = ("bare", "hilo") if args.sides == "both" else (args.sides,)
    warmup = min(args.journeys, 10)
    # Hilo goes first: one of its histories says what the bare journey must do.
    runner = {False: "without the workflow sandbox", True: "in the workflow sandbox"}
    print(f"  hilo runs {runner[args.hilo_sandboxed]}, bare {runner[not args.bare_unsandboxed]}")
    print(f"warm-up: {warmup} journeys of each side ...", flush=True)
    _round, sample = await bench.hilo_round(warmup)
    hilo_counts = await history_counts(sample)
    bench.sends = hilo_counts.activity_types[SEND_MESSAGE]  # every send must really be sent
    steps = hilo_counts.plan.steps
    print(f"  one hilo journey: {hilo_counts.line()}")
    print("  bare plan: " + ", ".join(s if s == "activity" else f"timer {s:g}s" for s in steps))
    bare_counts: HistoryCounts | None = None
    if "bare" in sides:
        _round, sample = await bench.bare_round(warmup, hilo_counts.plan)
        bare_counts = await history_counts(sample)
        if (bare_counts.activities, bare_counts.timers) != (
            hilo_counts.activities,
            hilo_counts.timers,
        ):
            raise RuntimeError(f"the bare journey differs: {bare_counts.line()}")
    rounds: list[Round] = []
    for number in range(1, args.rounds + 1):
        # ABBA: bare-hilo, then hilo-bare, ... so that a machine growing slower or faster over
        # the run favours neither side.
        for side in sides if number % 2 else sides[::-1]:
            if side == "bare":
                result, _handle = await bench.bare_round(args.journeys, hilo_counts.plan)
            else:
                result, handle = await bench.hilo_round(args.journeys)
                counts = await history_counts(handle)
                if (counts.activities, counts.timers) != (
                    hilo_counts.activities,
                    hilo_counts.timers,
                ):
                    raise RuntimeError(f"a hilo journey changed shape: {counts.line()}")
            result.timers_late = await timer_lateness(
                bench.handles[:: max(1, len(bench.handles) // 20)]
            )
            rounds.append(result)
            print(
                f"  round {number} {side}: {result.journeys} journeys in "
                f"{result.seconds:.2f}s = {result.rate:.1f}/s",
                flush=True,
            )
    report(args, rounds, hilo_counts, bare_counts)


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="hilo-bench-") as folder:
        bench = Bench(args, Path(folder))
        try:
            async with contextlib.AsyncExitStack() as stack:
                print(f"starting the Temporal dev server and the workers (in {folder}) ...")
                await bench.setup(stack)
                await measure(bench, args)
        except RuntimeError as error:
            print(f"benchmark failed: {error!r}", file=sys.stderr)
            log = Path(folder) / "temporal.log"
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-20:]
                print("dev server log (last lines):\n" + "\n".join(tail), file=sys.stderr)
            return 1
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--journeys", type=int, default=200, help="journeys per round (200)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each side (5)")
    parser.add_argument("--wait", type=int, default=1, help="seconds of each wait (1)")
    parser.add_argument(
        "--concurrency", type=int, default=20, help="events routed / workflows started at once"
    )
    parser.add_argument("--timeout", type=float, default=0.0, help="seconds per round (auto)")
    parser.add_argument(
        "--sides",
        choices=("both", "hilo", "bare"),
        default="both",
        help="run one side only (to profile it); the ratio needs both",
    )
    parser.add_argument(
        "--hilo-sandboxed",
        action="store_true",
        help="run Hilo's interpreter in the workflow sandbox (HILO_WORKFLOW_SANDBOX=true)",
    )
    parser.add_argument(
        "--bare-unsandboxed",
        action="store_true",
        help="run the bare workflow without the sandbox (the SDK's default is with it)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 20 journeys, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.journeys, args.rounds = 20, 1
    if args.journeys < 1 or args.rounds < 1 or args.wait < 1:
        parser.error("--journeys, --rounds and --wait must be at least 1")
    return args


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    return run_async(lambda: main(args))


if __name__ == "__main__":
    sys.exit(run())
