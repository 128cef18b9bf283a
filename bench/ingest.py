"""Segment ingestion: Hilo's /v1/batch and /v1/track against a bare endpoint, and how soon an
accepted event reaches its journey.

Every side is its own process, as in production, so the load generator here does not share a
GIL with the servers:

* **hilo**: ``api.app.app_from_env`` under uvicorn with a SQLite file store and the dispatcher,
  connected to a Temporal dev server (in memory), with a worker process (``hilo worker``).
* **bare**: a FastAPI app with the same two paths, each reading the body, un-gzipping it if asked
  and parsing the JSON, and nothing else.

Both servers run under the same uvicorn settings (one process, no access log). The load is
Segment traffic as a shop's server sends it: track calls of about 450 bytes (properties,
context, a stable anonymousId per customer) for a pool of customers who all have a profile
before anything is measured, 100 calls a batch, keep-alive connections. Bodies are built before
the clock starts.

1. **throughput**: rounds of a fixed number of requests, ``--concurrency`` in flight, back to
   back, alternating bare and hilo: events/s, request p50/p99, CPU ms per request of each server
   (the dispatcher's work included) and of the load generator, and hilo/bare. For hilo also
   "routed/s": until the dispatcher had taken every accepted event through the router.
2. **paced**: /v1/batch at ``--rate`` events/s (2,000: 20 batches/s) on a schedule (an open
   loop), so latency is read at that load rather than at saturation.
3. **signals**: a journey whose running instances listen to ``Feature Used``, one per customer;
   single track calls at 50 events/s, each to one customer's instance. From the moment the 200
   came back to the ``WorkflowExecutionSignaled`` event in that workflow's history (the
   server's clock; same machine).

Every figure depends on the CPU the machine has left: the load average is printed with them.

    .venv/bin/python bench/ingest.py                   # about 3 minutes
    .venv/bin/python bench/ingest.py --quick           # smoke test: small rounds, short runs
    .venv/bin/python bench/ingest.py --gzip            # bodies sent gzip-compressed
    .venv/bin/python bench/ingest.py --parts paced     # one part, e.g. to profile it
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # Run as a script from anywhere: import the project itself.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402

from bench.common import cpu_seconds, percentile, run_async  # noqa: E402
from hilo.devtools.devserver import free_port, stop_process_group  # noqa: E402
from hilo.settings import DEV_WRITE_KEY  # noqa: E402

TRACK_EVENTS = ("Product Viewed", "Product Added", "Checkout Started", "Coupon Applied")
TRIGGER = "Trial Started"
LISTENED = "Feature Used"
LATENCY_JOURNEY = "bench_feature_usage"
TARGET_BATCH_RATE = 2000.0  # events/s through /v1/batch
TARGET_BATCH_P99 = 0.050  # s, at that rate
TARGET_SIGNAL_P99 = 0.500  # s, accepted -> signalled at 50 events/s
BATCH_SIZE = 100
PARTS = ("throughput", "paced", "signals")
SCRIPT = Path(__file__).resolve()


# ---------------------------------------------------------------- the servers


def serve(side: str, port: int) -> None:
    """Run one side under uvicorn in this process (the bench starts it as a child)."""
    import uvicorn

    if side == "hilo":
        from api.app import app_from_env

        app = app_from_env()  # HILO_* from the environment the bench gives
    else:
        app = bare_app()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def bare_app() -> FastAPI:
    """The floor: the same paths, reading and parsing the same bodies, storing nothing."""
    app = FastAPI()

    async def receive(request: Request) -> dict[str, bool]:
        body = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
        json.loads(body)
        return {"success": True}

    for kind in ("batch", "track"):
        app.add_api_route(f"/v1/{kind}", receive, methods=["POST"])
    app.add_api_route("/health", lambda: {"status": "ok"}, methods=["GET"])
    return app


@dataclass
class Child:
    """A server or worker process of the bench, its output in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    @classmethod
    def start(cls, name: str, args: list[str], env: dict[str, str], log: Path) -> Child:
        with log.open("ab") as output:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(
                args, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        return cls(name, process, log)

    async def ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self.tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer in {timeout:.0f}s: {self.tail()}")

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        stop_process_group(self.process, timeout=20)


# ---------------------------------------------------------------- the traffic


class Traffic:
    """Segment track calls as a shop's server-side library sends them."""

    def __init__(self, customers: int, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.customers = [
            (f"user-{n}", str(uuid.UUID(int=self.rng.getrandbits(128)))) for n in range(customers)
        ]

    def call(
        self, event: str | None = None, customer: tuple[str, str] | None = None
    ) -> dict[str, Any]:
        rng = self.rng
        user_id, anonymous_id = customer or rng.choice(self.customers)
        product = rng.randrange(1, 5000)
        return {
            "type": "track",
            "event": event or rng.choice(TRACK_EVENTS),
            "userId": user_id,
            "anonymousId": anonymous_id,
            "messageId": f"bench-{uuid.uuid4()}",
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "properties": {
                "product_id": f"p-{product}",
                "sku": f"SKU-{product:05d}",
                "category": rng.choice(["Shoes", "Apparel", "Outdoor", "Kitchen"]),
                "name": "Trail runner GTX",
                "price": round(rng.uniform(5, 300), 2),
                "currency": "USD",
                "quantity": rng.randint(1, 3),
            },
            "context": {
                "library": {"name": "analytics-node", "version": "2.1.2"},
                "ip": f"203.0.113.{rng.randrange(1, 255)}",
                "locale": "en-US",
                "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) Safari/605.1.15",
                "page": {"path": f"/p/{product}", "url": f"https://shop.example/p/{product}"},
            },
        }

    def body(self, calls: list[dict[str, Any]] | dict[str, Any], compress: bool) -> bytes:
        payload = (
            {"batch": calls, "sentAt": datetime.now(UTC).isoformat()}
            if isinstance(calls, list)
            else {key: value for key, value in calls.items() if key != "type"}
        )
        raw = json.dumps(payload, separators=(",", ":")).encode()
        return gzip.compress(raw, 6) if compress else raw

    def bodies(self, kind: str, count: int, compress: bool) -> list[bytes]:
        if kind == "batch":
            return [
                self.body([self.call() for _ in range(BATCH_SIZE)], compress) for _ in range(count)
            ]
        return [self.body(self.call(), compress) for _ in range(count)]


def headers(compress: bool) -> dict[str, str]:
    result = {"Content-Type": "application/json"}
    if compress:
        result["Content-Encoding"] = "gzip"
    return result


# ---------------------------------------------------------------- measurement


@dataclass
class Round:
    side: str
    kind: str
    requests: int
    events: int
    seconds: float
    latencies: list[float]
    server_cpu: float
    client_cpu: float
    drain_seconds: float = 0.0  # hilo: after the last answer, until the outbox was empty

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def routed_rate(self) -> float:
        """Events/s accepted *and* handed to the router (the dispatcher caught up)."""
        return self.events / (self.seconds + self.drain_seconds)

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99)


async def post(client: httpx.AsyncClient, path: str, body: bytes, compress: bool) -> float:
    started = time.perf_counter()
    response = await client.post(path, content=body, headers=headers(compress))
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:300]}")
    return elapsed


async def closed_loop(
    client: httpx.AsyncClient, path: str, bodies: list[bytes], concurrency: int, compress: bool
) -> tuple[float, list[float]]:
    """Send every body, ``concurrency`` at a time back to back: (seconds, latencies)."""
    queue = iter(bodies)
    latencies: list[float] = []

    async def lane() -> None:
        for body in queue:
            latencies.append(await post(client, path, body, compress))

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


async def paced(count: int, rate: float, job: Callable[[int], Coroutine[Any, Any, None]]) -> float:
    """``job(i)`` for i in range(count), the i-th started at ``i / rate`` s whatever the
    earlier ones are doing (an open loop: a slow answer does not slow the arrivals)."""
    tasks: list[asyncio.Task[None]] = []
    started = time.perf_counter()
    for index in range(count):
        delay = started + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(job(index)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - started


def api_client(url: str, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        auth=httpx.BasicAuth(DEV_WRITE_KEY, ""),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=httpx.Timeout(30.0),
    )


# ---------------------------------------------------------------- the bench


@dataclass
class Paced:
    side: str
    rate: float
    seconds: float
    latencies: list[float]
    server_cpu: float  # seconds, the dispatcher's work included


@dataclass
class SignalRun:
    events: int
    seconds: float
    instances: int
    accepted_to_signalled: list[float] = field(default_factory=list)
    sent_to_signalled: list[float] = field(default_factory=list)
    request: list[float] = field(default_factory=list)
    missing: int = 0
    twice: int = 0


class Bench:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.database_url = f"sqlite:///{folder / 'hilo.db'}"
        self.task_queue = f"hilo-bench-{uuid.uuid4().hex[:8]}"
        self.traffic = Traffic(args.customers)
        self.children: dict[str, Child] = {}

    def env(self, temporal_address: str) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("HILO_") and key != "PYTHONDONTWRITEBYTECODE"
        }
        # The workflow sandbox imports the workflow module for every new journey: keep
        # bytecode (in a temp dir) so that the worker does not compile it each time.
        env["PYTHONPYCACHEPREFIX"] = str(self.folder / "pycache")
        env.update(
            {
                "HILO_ENVIRONMENT": "test",
                "HILO_DATABASE_URL": self.database_url,
                "HILO_TEMPORAL_ADDRESS": temporal_address,
                "HILO_TASK_QUEUE": self.task_queue,
                "PYTHONPATH": str(SCRIPT.parent.parent),
            }
        )
        return env

    async def setup(self, stack: contextlib.AsyncExitStack) -> None:
        from hilo.catalog import JourneyCatalog
        from hilo.db.store import Store
        from hilo.devtools.devserver import DevServer

        self.store = Store(self.database_url)
        self.store.migrate()
        stack.callback(self.store.dispose)
        JourneyCatalog(self.store).publish(latency_journey())
        self.server = DevServer(db_file=None, log_file=self.folder / "temporal.log")
        self.client = await self.server.start()
        stack.callback(self.server.stop)
        env = self.env(self.server.address)
        script = str(SCRIPT)
        worker = Child.start(
            "worker",
            [sys.executable, "-m", "hilo.cli", "worker"],
            env,
            self.folder / "worker.log",
        )
        self.children["worker"] = worker
        stack.callback(worker.stop)
        for side in ("bare", "hilo"):
            port = free_port()
            child = Child.start(
                side,
                [sys.executable, script, "--serve", side, "--port", str(port)],
                env,
                self.folder / f"{side}.log",
            )
            child.url = f"http://127.0.0.1:{port}"
            self.children[side] = child
            stack.callback(child.stop)
        await asyncio.gather(self.children["bare"].ready(), self.children["hilo"].ready())
        await self.known_customers()

    async def known_customers(self) -> None:
        """One call of every customer of the pool first: a running shop's customers have
        profiles already (the ones new to it are a small share of its traffic)."""
        calls = [self.traffic.call(customer=customer) for customer in self.traffic.customers]
        async with api_client(self.children["hilo"].url, 1) as client:
            for start in range(0, len(calls), BATCH_SIZE):
                body = self.traffic.body(calls[start : start + BATCH_SIZE], self.args.gzip)
                await post(client, "/v1/batch", body, self.args.gzip)
        await self.drained()

    async def drained(self, timeout: float = 120.0) -> float:
        """Seconds until the dispatcher has delivered everything accepted so far."""
        started = time.perf_counter()
        while self.store.outbox_size():
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"the outbox did not drain in {timeout:.0f}s")
            await asyncio.sleep(0.02)
        return time.perf_counter() - started

    # ------------------------------------------------------------ 1. throughput

    async def round(self, side: str, kind: str, requests: int) -> Round:
        args = self.args
        child = self.children[side]
        bodies = self.traffic.bodies(kind, requests, args.gzip)
        await self.drained()  # each round starts with nothing left to dispatch
        async with api_client(child.url, args.concurrency) as client:
            cpu, own_cpu = child.cpu(), cpu_seconds(os.getpid())
            seconds, latencies = await closed_loop(
                client, f"/v1/{kind}", bodies, args.concurrency, args.gzip
            )
            client_cpu = cpu_seconds(os.getpid()) - own_cpu
            drain = await self.drained() if side == "hilo" else 0.0
            server_cpu = child.cpu() - cpu  # the dispatcher's work included
        events = requests * (BATCH_SIZE if kind == "batch" else 1)
        return Round(
            side, kind, requests, events, seconds, latencies, server_cpu, client_cpu, drain
        )

    async def throughput(self) -> list[Round]:
        args = self.args
        rounds: list[Round] = []
        sizes = {"batch": args.batches, "track": args.tracks}
        print(f"throughput: warm-up ({machine()}) ...", flush=True)
        for side in ("bare", "hilo"):
            for kind in ("batch", "track"):
                await self.round(side, kind, max(5, sizes[kind] // 10))
        await self.drained()
        for kind in ("batch", "track"):
            for number in range(1, args.rounds + 1):
                for side in ("bare", "hilo"):
                    result = await self.round(side, kind, sizes[kind])
                    rounds.append(result)
                    drained = (
                        f", dispatcher done {result.drain_seconds:.1f}s later"
                        if side == "hilo"
                        else ""
                    )
                    print(
                        f"  /v1/{kind} round {number} {side}: {result.events} events in "
                        f"{result.seconds:.2f}s = {result.rate:,.0f} events/s, "
                        f"p50 {1000 * result.p50:.1f} ms, p99 {1000 * result.p99:.1f} ms" + drained,
                        flush=True,
                    )
        return rounds

    # ------------------------------------------------------------ 2. paced batches

    async def paced_batches(self, side: str) -> Paced:
        args = self.args
        rate = args.rate / BATCH_SIZE  # requests/s
        count = max(1, round(rate * args.paced_seconds))
        bodies = self.traffic.bodies("batch", count, args.gzip)
        latencies: list[float] = []
        child = self.children[side]
        await self.drained()
        async with api_client(child.url, 64) as client:

            async def one(index: int) -> None:
                latencies.append(await post(client, "/v1/batch", bodies[index], args.gzip))

            cpu = child.cpu()
            seconds = await paced(count, rate, one)
            await self.drained()
            server_cpu = child.cpu() - cpu
        return Paced(side, count * BATCH_SIZE / seconds, seconds, latencies, server_cpu)

    # ------------------------------------------------------------ 3. accepted -> signalled

    async def signal_latency(self) -> SignalRun:
        from temporalio.api.enums.v1 import EventType

        from hilo.ids import journey_workflow_id
        from hilo.journeys.runs import SIGNAL_EVENT

        args = self.args
        customers = [(f"member-{n}", str(uuid.uuid4())) for n in range(args.instances)]
        async with api_client(self.children["hilo"].url, 64) as client:
            # The instances: one running journey per customer, waiting for its events.
            calls = [self.traffic.call(TRIGGER, customer) for customer in customers]
            for start in range(0, len(calls), BATCH_SIZE):
                body = self.traffic.body(calls[start : start + BATCH_SIZE], args.gzip)
                await post(client, "/v1/batch", body, args.gzip)
            await self.drained()
            workflow_ids = [journey_workflow_id(LATENCY_JOURNEY, user) for user, _ in customers]
            await asyncio.sleep(1.0)  # let the first workflow tasks settle

            count = round(args.signal_rate * args.signal_seconds)
            events = [
                self.traffic.call(LISTENED, customers[index % len(customers)])
                for index in range(count)
            ]
            bodies = [self.traffic.body(call, args.gzip) for call in events]
            sent_at: dict[str, float] = {}
            accepted_at: dict[str, float] = {}
            request: list[float] = []

            async def one(index: int) -> None:
                message_id = events[index]["messageId"]
                sent_at[message_id] = time.time()
                request.append(await post(client, "/v1/track", bodies[index], args.gzip))
                accepted_at[message_id] = time.time()

            seconds = await paced(count, args.signal_rate, one)
            await self.drained()

        run = SignalRun(events=count, seconds=seconds, instances=len(customers), request=request)
        signalled: dict[str, list[float]] = {}
        for workflow_id in workflow_ids:
            history = await self.client.get_workflow_handle(workflow_id).fetch_history()
            for event in history.events:
                if event.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
                    continue
                attributes = event.workflow_execution_signaled_event_attributes
                if attributes.signal_name != SIGNAL_EVENT:
                    continue
                message_id = json.loads(attributes.input.payloads[0].data)["message_id"]
                signalled.setdefault(message_id, []).append(event.event_time.ToNanoseconds() / 1e9)
        for message_id, accepted in accepted_at.items():
            moments = signalled.get(message_id, [])
            if not moments:
                run.missing += 1
                continue
            run.twice += len(moments) > 1
            run.accepted_to_signalled.append(moments[0] - accepted)
            run.sent_to_signalled.append(moments[0] - sent_at[message_id])
        return run


def latency_journey() -> Any:
    from hilo.journeys.definitions import JourneyDefinition

    return JourneyDefinition.model_validate(
        {
            "key": LATENCY_JOURNEY,
            "name": "Feature usage (benchmark)",
            "trigger": {"event": TRIGGER},
            "steps": [
                {
                    "id": "first_use",
                    "type": "wait_for",
                    "timeout": "14d",
                    "events": [{"event": LISTENED}],
                },
                {"id": "trial", "type": "wait", "duration": "14d"},
            ],
        }
    )


# ---------------------------------------------------------------- the report


@dataclass
class Check:
    target: str
    measured: str
    met: bool


def median_round(rounds: list[Round], side: str, kind: str) -> Round:
    """The round of median throughput (the lower middle one for an even count)."""
    mine = sorted((r for r in rounds if (r.side, r.kind) == (side, kind)), key=lambda r: r.rate)
    return mine[(len(mine) - 1) // 2]


def best_round(rounds: list[Round], side: str, kind: str) -> Round:
    return max((r for r in rounds if (r.side, r.kind) == (side, kind)), key=lambda r: r.rate)


def machine() -> str:
    """What else the machine is doing: the figures only mean something beside it."""
    one, five, _fifteen = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def report_throughput(args: argparse.Namespace, rounds: list[Round]) -> list[Check]:
    print()
    print(
        f"throughput: closed loop, {args.concurrency} requests in flight, keep-alive, "
        f"{'gzip' if args.gzip else 'plain JSON'}; the median of {args.rounds} round(s), "
        "the best in brackets"
    )
    print(
        "  routed/s: until the dispatcher had handed every event to the router too; "
        "cpu: ms per request, of the server (dispatcher included) / of the load generator"
    )
    print(
        f"  {'endpoint':<10} {'side':<10} {'events/s':>18} {'routed/s':>9} {'p50 ms':>8}"
        f" {'p99 ms':>8} {'cpu server/client':>18}"
    )
    chosen: dict[tuple[str, str], Round] = {}
    for kind in ("batch", "track"):
        for side in ("bare", "hilo"):
            r = chosen[(side, kind)] = median_round(rounds, side, kind)
            best = best_round(rounds, side, kind)
            routed = f"{r.routed_rate:,.0f}" if side == "hilo" else "-"
            server, client = (1000 * cpu / r.requests for cpu in (r.server_cpu, r.client_cpu))
            print(
                f"  /v1/{kind:<6} {side:<10} {r.rate:>9,.0f} ({best.rate:>6,.0f}) {routed:>9}"
                f" {ms(r.p50):>8} {ms(r.p99):>8} {server:>9.2f} /{client:>6.2f}"
            )
        hilo, bare = chosen[("hilo", kind)], chosen[("bare", kind)]
        print(
            f"  {'':<10} {'hilo/bare':<10} {hilo.rate / bare.rate:>9.2f}{'':>19}"
            f" {hilo.p50 / bare.p50:>7.1f}x {hilo.p99 / bare.p99:>7.1f}x"
            f" {hilo.server_cpu / max(bare.server_cpu, 1e-9):>8.1f}x"
        )
    hilo_batch = chosen[("hilo", "batch")]
    return [
        Check(
            f"/v1/batch >= {TARGET_BATCH_RATE:,.0f} events/s, accepted and routed",
            f"{hilo_batch.routed_rate:,.0f} events/s",
            hilo_batch.routed_rate >= TARGET_BATCH_RATE,
        )
    ]


def report_paced(args: argparse.Namespace, paced_runs: list[Paced]) -> list[Check]:
    print()
    print(
        f"paced /v1/batch: {args.rate:,.0f} events/s ({args.rate / BATCH_SIZE:g} batches/s) "
        f"for {args.paced_seconds:g}s"
    )
    print(
        f"  {'side':<10} {'seconds':>8} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'server cpu ms/req':>18}"
    )
    for p in paced_runs:
        p50, p99 = percentile(p.latencies, 0.5), percentile(p.latencies, 0.99)
        cpu = 1000 * p.server_cpu / len(p.latencies)
        print(
            f"  {p.side:<10} {p.seconds:>8.1f} {p.rate:>10,.0f} {ms(p50):>8} {ms(p99):>8}"
            f" {cpu:>18.2f}"
        )
    hilo = next(p for p in paced_runs if p.side == "hilo")
    p99 = percentile(hilo.latencies, 0.99)
    return [
        Check(
            f"/v1/batch p99 < {ms(TARGET_BATCH_P99)} ms at {args.rate:,.0f} events/s",
            f"{ms(p99)} ms",
            # Kept up with the schedule too: a server that falls behind has no p99 at that rate.
            p99 < TARGET_BATCH_P99 and hilo.rate >= 0.95 * args.rate,
        )
    ]


def report_signals(args: argparse.Namespace, run: SignalRun) -> list[Check]:
    print()
    print(
        f"accepted -> signalled: {run.events} track calls at "
        f"{run.events / run.seconds:.0f} events/s over {run.seconds:.1f}s, to "
        f"{run.instances} running journeys ({run.missing} never signalled, "
        f"{run.twice} signalled twice)"
    )
    print(f"  {'':<24} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for label, values in (
        ("request (sent -> 200)", run.request),
        ("accepted -> signalled", run.accepted_to_signalled),
        ("sent -> signalled", run.sent_to_signalled),
    ):
        print(
            f"  {label:<24} {ms(percentile(values, 0.5)):>8} {ms(percentile(values, 0.99)):>8}"
            f" {ms(max(values)) if values else 'nan':>8}"
        )
    p99 = percentile(run.accepted_to_signalled, 0.99)
    return [
        Check(
            f"accepted -> signalled p99 < {ms(TARGET_SIGNAL_P99)} ms at "
            f"{args.signal_rate:g} events/s",
            f"{ms(p99)} ms",
            p99 < TARGET_SIGNAL_P99 and run.missing == 0 and run.twice == 0,
        )
    ]


def report_targets(args: argparse.Namespace, checks: list[Check]) -> None:
    print()
    print(f"targets ({machine()} at the end)")
    for check in checks:
        verdict = "met" if check.met else "MISSED"
        print(f"  {check.target:<60} {check.measured:>16}  {verdict}")
    if args.quick:
        print("  (smoke test: short rounds; the figures are rough)")


# ---------------------------------------------------------------- running it


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="hilo-bench-ingest-") as folder:
        bench = Bench(args, Path(folder))
        try:
            async with contextlib.AsyncExitStack() as stack:
                print(
                    f"starting the Temporal dev server, the worker and both APIs ({machine()}) ...",
                    flush=True,
                )
                await bench.setup(stack)
                checks: list[Check] = []
                if "throughput" in args.parts:
                    checks += report_throughput(args, await bench.throughput())
                if "paced" in args.parts:
                    print(
                        f"paced /v1/batch at {args.rate:,.0f} events/s ({machine()}) ...",
                        flush=True,
                    )
                    paced_runs = [await bench.paced_batches(side) for side in ("bare", "hilo")]
                    checks += report_paced(args, paced_runs)
                if "signals" in args.parts:
                    print(
                        f"accepted -> signalled: {args.instances} journeys, "
                        f"{args.signal_rate:g} events/s for {args.signal_seconds:g}s "
                        f"({machine()}) ...",
                        flush=True,
                    )
                    checks += report_signals(args, await bench.signal_latency())
                report_targets(args, checks)
        except RuntimeError as error:
            print(f"benchmark failed: {error}", file=sys.stderr)
            for child in bench.children.values():
                print(f"--- {child.name} log (last lines):\n{child.tail()}", file=sys.stderr)
            return 1
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--batches", type=int, default=150, help="batch requests a round (150)")
    parser.add_argument("--tracks", type=int, default=1500, help="track requests a round (1500)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each side (3)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (4)")
    parser.add_argument("--customers", type=int, default=2000, help="customer pool (2000)")
    parser.add_argument("--gzip", action="store_true", help="send gzip-compressed bodies")
    parser.add_argument(
        "--rate", type=float, default=TARGET_BATCH_RATE, help="paced batch events/s (2000)"
    )
    parser.add_argument("--paced-seconds", type=float, default=10.0, help="paced run (10 s)")
    parser.add_argument("--instances", type=int, default=100, help="running journeys (100)")
    parser.add_argument("--signal-rate", type=float, default=50.0, help="events/s (50)")
    parser.add_argument("--signal-seconds", type=float, default=20.0, help="signal run (20 s)")
    parser.add_argument(
        "--parts",
        type=lambda text: set(text.split(",")),
        default=set(PARTS),
        help=f"which runs, comma-separated ({','.join(PARTS)}); to profile one",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: small, short runs")
    parser.add_argument("--serve", choices=("hilo", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.parts or not args.parts <= set(PARTS):
        parser.error(f"--parts takes a comma-separated subset of {','.join(PARTS)}")
    if args.quick:
        args.batches, args.tracks, args.rounds = 30, 300, 1
        args.paced_seconds, args.signal_seconds, args.instances = 3.0, 5.0, 20
    return args


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return 0

    return run_async(lambda: main(args))


if __name__ == "__main__":
    sys.exit(run())
