"""Contact-policy decisions against a bare single-row upsert, on SQLite and PostgreSQL.

Each database (a SQLite file in a temp dir; a throwaway PostgreSQL server) is migrated and
given a realistic policy: 3 messages per 24h and 6 per calendar week overall, 1 email per
calendar day, a 1h gap, quiet hours 21:00-08:00, customers in America/New_York. Workloads:

* **many**: decisions spread over ``--customers`` customers (allow, defer and skip mixed);
* **hot**: every decision for one customer (after its first sends, all skipped by the caps);
* **upsert**: ``INSERT .. ON CONFLICT (k) DO UPDATE`` of one row keyed by customer, one
  transaction each, on a connection from the same pool: the floor any decision has to pay.

Each workload runs with 1 thread, then with ``--threads`` threads, then in ``--processes``
processes of ``--process-threads`` threads each: Hilo decides in its worker processes, and a
Python process spends its client CPU under one interpreter lock, so a machine's decisions/s
are those of the workers it runs (the atomicity is the database's, whatever the process).
A cell prints decisions (or upserts) per second, from the first call to the last of all its
threads and processes, and the p50/p99 latency of one call; the ratio column divides the
decision's p50 latency by the upsert's in the same run (same database, same threads and
processes). Compare figures only within one run: the machine is shared.

    .venv/bin/python bench/contact_policy.py                 # 2000 calls per cell
    .venv/bin/python bench/contact_policy.py --calls 500 --databases sqlite
    .venv/bin/python bench/contact_policy.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __name__ in ("__main__", "__mp_main__"):  # a script, or a process it spawned
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, text  # noqa: E402

from hilo.db.models import Profile
from hilo.db.store import Store
from hilo.policy import ContactPolicyService, SendIntent
from tests.helpers.postgres import PostgresServer  # noqa: E402

POLICY = {
    "default_timezone": "America/New_York",
    "global": {
        "caps": [{"count": 3, "window": "24h"}, {"count": 6, "window": "calendar_week"}],
        "min_gap": "1h",
        "quiet_hours": {"start": "21:00", "end": "08:00"},
    },
    "channels": {"email": {"caps": [{"count": 1, "window": "calendar_day"}]}},
    "journeys": {"welcome": {"priority": 10}},
}
# A Tuesday, 15:00 in New York: inside the allowed hours.
START = datetime(2026, 3, 10, 19, 0, tzinfo=UTC)
JOURNEYS = ("welcome", "abandoned_cart", "win_back")
CHANNELS = ("email", "push", "sms")


@dataclass
class Cell:
    database: str
    workload: str
    threads: int
    calls: int
    seconds: float
    latencies: list[float]
    outcomes: dict[str, int]
    processes: int = 1

    @property
    def shape(self) -> str:
        """Threads, or processes x threads."""
        if self.processes == 1:
            return str(self.threads)
        return f"{self.processes}x{self.threads}"

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000


def run_threads(
    threads: int,
    calls: int,
    one: Callable[[int], str | None],
    gate: Callable[[], object] | None = None,
) -> Cell:
    """``calls`` calls of ``one`` over ``threads`` threads; ``gate``, when given, is waited on
    once every thread is ready (the start of a run across processes)."""
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(threads + 1)

    def worker(offset: int) -> None:
        mine: list[float] = []
        seen: dict[str, int] = {}
        barrier.wait()
        for index in range(offset, calls, threads):
            started = time.perf_counter()
            outcome = one(index)
            mine.append(time.perf_counter() - started)
            if outcome:
                seen[outcome] = seen.get(outcome, 0) + 1
        with lock:
            latencies.extend(mine)
            for key, value in seen.items():
                outcomes[key] = outcomes.get(key, 0) + value

    pool = [threading.Thread(target=worker, args=(offset,)) for offset in range(threads)]
    for thread in pool:
        thread.start()
    if gate is not None:
        gate()
    barrier.wait()
    started = time.perf_counter()
    for thread in pool:
        thread.join()
    return Cell("", "", threads, calls, time.perf_counter() - started, latencies, outcomes)


def decision_call(
    service: ContactPolicyService,
    workload: str,
    run: int,
    customers: int,
    process: int = 0,
    processes: int = 1,
) -> Callable[[int], str | None]:
    """One decision per call index; process ``process`` of ``processes`` takes every
    ``processes``-th global index, so that the processes share one run's calls."""
    # Each run starts a week after the last, so earlier runs' sends fall out of every cap.
    base = START + timedelta(weeks=run)

    def one(local: int) -> str | None:
        index = local * processes + process
        customer = "hot" if workload == "hot" else f"c{index % customers}"
        intent = SendIntent(
            message_id=f"{workload}-{run}-{index}",
            customer_id=customer,
            journey_key=JOURNEYS[index % len(JOURNEYS)],
            channel=CHANNELS[(index // customers) % len(CHANNELS)],
        )
        # Time moves on a little with every call: 30 s, so a run spans hours.
        return service.decide(intent, base + timedelta(seconds=30 * index)).outcome

    return one


def upsert_call(
    engine: Any, sql: str, customers: int, process: int = 0, processes: int = 1
) -> Callable[[int], str | None]:
    def one(local: int) -> str | None:
        index = local * processes + process
        proxied = engine.raw_connection()
        try:
            cursor = proxied.cursor()
            cursor.execute(sql, (f"c{index % customers}", index))
            proxied.commit()
            cursor.close()
        finally:
            proxied.close()
        return None

    return one


def upsert_engine(store: Store) -> Any:
    """The cheapest durable write's connections: one statement, one transaction, no ping
    (PostgreSQL in autocommit, so one round trip), as the decision path's own pool does."""
    if store.engine.dialect.name == "sqlite":
        return store.engine
    return create_engine(store.url, pool_pre_ping=False, isolation_level="AUTOCOMMIT")


def upsert_sql(store: Store) -> str:
    mark = "?" if store.engine.dialect.name == "sqlite" else "%s"
    return (
        f"INSERT INTO bench_upsert (k, v) VALUES ({mark}, {mark}) "
        "ON CONFLICT (k) DO UPDATE SET v = excluded.v"
    )


@dataclass
class ProcessRun:
    """What one process of a run across processes does (picklable, for spawned children)."""

    url: str
    workload: str
    run: int
    customers: int
    process: int
    processes: int
    threads: int
    calls: int


def process_main(job: ProcessRun, ready: Any, go: Any, results: Any) -> None:
    """A spawned process: its own store and service (as a worker has), warmed up, then its
    share of the run once every process is ready."""
    store = Store(job.url)
    service = ContactPolicyService(store)
    engine = upsert_engine(store)
    try:
        if job.workload == "upsert":
            one = upsert_call(engine, upsert_sql(store), job.customers, job.process, job.processes)
        else:
            one = decision_call(
                service, job.workload, job.run, job.customers, job.process, job.processes
            )
        # Connections opened and statements prepared before the clock starts.
        warm = decision_call(service, "warmup", job.run, job.customers, job.process, 1_000)
        upsert_warm = upsert_call(engine, upsert_sql(store), job.customers)
        for index in range(job.threads * 2):
            warm(1_000_000 + index)
            upsert_warm(index)
        share = len(range(job.process, job.calls, job.processes))

        def gate() -> None:
            ready.wait()
            go.wait()

        cell = run_threads(job.threads, share, one, gate)
        results.put((time.perf_counter(), cell.latencies, cell.outcomes))
    finally:
        service.close()
        if engine is not store.engine:
            engine.dispose()
        store.dispose()


def run_processes(
    url: str, workload: str, run: int, customers: int, processes: int, threads: int, calls: int
) -> Cell:
    """``calls`` calls over ``processes`` fresh interpreters of ``threads`` threads each; the
    rate counts from the common start to the last process's end."""
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(processes + 1)
    go = context.Event()
    results = context.Queue()
    children = [
        context.Process(
            target=process_main,
            args=(
                ProcessRun(url, workload, run, customers, index, processes, threads, calls),
                ready,
                go,
                results,
            ),
        )
        for index in range(processes)
    ]
    for child in children:
        child.start()
    try:
        ready.wait(timeout=120)
        started = time.perf_counter()
        go.set()
        answers = [results.get(timeout=600) for _ in children]
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    latencies = [latency for _end, mine, _seen in answers for latency in mine]
    outcomes: dict[str, int] = {}
    for _end, _mine, seen in answers:
        for key, value in seen.items():
            outcomes[key] = outcomes.get(key, 0) + value
    # perf_counter is CLOCK_MONOTONIC on Linux: one clock for every process.
    seconds = max(end for end, _mine, _seen in answers) - started
    return Cell("", workload, threads, calls, seconds, latencies, outcomes, processes)


class Bench:
    def __init__(self, name: str, store: Store, customers: int) -> None:
        self.name = name
        self.store = store
        self.customers = customers
        self.service = ContactPolicyService(store)
        self.service.set_policy(POLICY, actor="bench", note="benchmark policy")
        self.run_id = 0
        consent = {"email": True, "push": True, "sms": True}
        with store.session() as session:
            session.add_all(
                Profile(
                    customer_id=f"c{number}",
                    traits={"email": f"c{number}@example.com", "phone": f"+1555{number:07d}"},
                    consent=consent,
                    timezone="America/New_York",
                )
                for number in range(customers)
            )
            session.add(Profile(customer_id="hot", consent=consent, timezone="America/New_York"))
            session.commit()
        with store.engine.begin() as connection:
            connection.execute(
                text("CREATE TABLE bench_upsert (k VARCHAR(200) PRIMARY KEY, v INTEGER NOT NULL)")
            )
        self.upsert_sql = upsert_sql(store)
        self.upsert_engine = upsert_engine(store)

    def decide(self, workload: str) -> Callable[[int], str | None]:
        self.run_id += 1
        return decision_call(self.service, workload, self.run_id, self.customers)

    def upsert(self) -> Callable[[int], str | None]:
        return upsert_call(self.upsert_engine, self.upsert_sql, self.customers)

    def measure(
        self, threads: Sequence[int], calls: int, processes: int = 0, process_threads: int = 2
    ) -> list[Cell]:
        cells = []
        warm = self.decide("warmup")
        for index in range(min(200, calls)):
            warm(index)
        shapes: list[tuple[int, int]] = [(1, count) for count in threads]
        if processes > 1:
            shapes.append((processes, process_threads))
        for process_count, count in shapes:
            for workload in ("upsert", "many", "hot"):
                if process_count > 1:
                    self.run_id += 1
                    cell = run_processes(
                        self.store.url,
                        workload,
                        self.run_id,
                        self.customers,
                        process_count,
                        count,
                        calls,
                    )
                else:
                    one = self.upsert() if workload == "upsert" else self.decide(workload)
                    cell = run_threads(count, calls, one)
                cell.database, cell.workload = self.name, workload
                cells.append(cell)
                label = (
                    f"{count:>2} thread(s)"
                    if process_count == 1
                    else f"{process_count} processes x {count} threads"
                )
                print(
                    f"  {self.name:<10} {workload:<6} {label}: "
                    f"{cell.rate:8.0f}/s  p50 {cell.percentile(0.5):6.2f} ms  "
                    f"p99 {cell.percentile(0.99):6.2f} ms  {cell.outcomes or ''}",
                    flush=True,
                )
        return cells

    def close(self) -> None:
        self.service.close()
        if self.upsert_engine is not self.store.engine:
            self.upsert_engine.dispose()
        self.store.dispose()


# What a decision must achieve on one machine: throughput, and the tail of its latency.
TARGET_RATE = 2000
TARGET_P99_MS = 5.0


def report(cells: list[Cell]) -> None:
    print()
    print(
        f"{'database':<10} {'workload':<6} {'thr':>3} {'calls/s':>9} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'upsert/s':>9} {'up p50':>7} {'up p99':>7} {'p50 ratio':>9}  target"
    )
    baseline = {(c.database, c.shape): c for c in cells if c.workload == "upsert"}
    for cell in cells:
        if cell.workload == "upsert":
            continue
        floor = baseline[(cell.database, cell.shape)]
        print(
            f"{cell.database:<10} {cell.workload:<6} {cell.shape:>3} {cell.rate:>9.0f} "
            f"{cell.percentile(0.5):>7.2f} {cell.percentile(0.99):>7.2f} {floor.rate:>9.0f} "
            f"{floor.percentile(0.5):>7.2f} {floor.percentile(0.99):>7.2f} "
            f"{cell.percentile(0.5) / floor.percentile(0.5):>8.1f}x  {verdict(cell)}"
        )
    print()
    print(
        f"target: >= {TARGET_RATE} decisions/s and p99 < {TARGET_P99_MS:g} ms; "
        "ratio = decision p50 / upsert p50; thr: threads, or processes x threads"
    )


def verdict(cell: Cell) -> str:
    """'met', or what missed the target."""
    missed = []
    if cell.rate < TARGET_RATE:
        missed.append("rate")
    if cell.percentile(0.99) >= TARGET_P99_MS:
        missed.append("p99")
    return f"missed: {', '.join(missed)}" if missed else "met"


def main(args: argparse.Namespace) -> int:
    cells: list[Cell] = []
    threads = sorted({1, args.threads})
    with tempfile.TemporaryDirectory(prefix="hilo-bench-policy-") as folder:
        if "sqlite" in args.databases:
            store = Store(f"sqlite:///{Path(folder) / 'hilo.db'}")
            store.migrate()
            bench = Bench("sqlite", store, args.customers)
            try:
                cells += bench.measure(threads, args.calls, args.processes, args.process_threads)
            finally:
                bench.close()
        if "postgresql" in args.databases:
            server = PostgresServer().start()
            try:
                store = Store(server.url)
                store.migrate()
                bench = Bench("postgresql", store, args.customers)
                try:
                    cells += bench.measure(
                        threads, args.calls, args.processes, args.process_threads
                    )
                finally:
                    bench.close()
            finally:
                server.stop()
    report(cells)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=2000, help="calls per cell (2000)")
    parser.add_argument("--threads", type=int, default=4, help="threads of the second run (4)")
    parser.add_argument("--customers", type=int, default=500, help="customers for 'many' (500)")
    parser.add_argument(
        "--processes", type=int, default=2, help="processes of the last run (2; 1: none)"
    )
    parser.add_argument(
        "--process-threads", type=int, default=2, help="threads in each of them (2)"
    )
    parser.add_argument(
        "--databases",
        default="sqlite,postgresql",
        type=lambda value: value.split(","),
        help="comma-separated: sqlite, postgresql",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 100 calls per cell")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.customers = 100, 50
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
