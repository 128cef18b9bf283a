"""Send throughput: the signed-webhook provider and the whole send activity against plain httpx.

One receiver runs in its own process (uvicorn, a small Starlette app), so the load generator
here does not share a GIL with it. Like a real receiver it checks every signed request with
:func:`~hilo.channels.webhook.verify_signature`, does the work once per Idempotency-Key (here:
counts it) and answers 200 with a JSON body over keep-alive connections. Three sides post to it
from ``--concurrency`` threads (a worker runs sync activities in a thread pool too):

* **plain**: ``httpx.Client.post`` of the JSON body the provider would send, serialised before
  the round, unsigned: the floor of a Python HTTP client on this machine;
* **provider**: ``SignedWebhook.deliver(Delivery(...))``: the payload serialised, the HMAC
  signature, the Idempotency-Key, :func:`~hilo.channels.base.send`, the answer parsed;
* **activity**: ``JourneyActivities.send_message(SendRequest(...))`` with a SQLite file store
  (WAL) and that provider as its ``webhook`` channel, without Temporal: the ledger and profile
  read, the body rendered (Liquid, with the stored trigger event), the ledger row queued before
  the provider and completed after. Half the sends are marketing, half transactional.

Each round sends ``--messages`` messages, each a new message id, back to back. Rounds alternate
(plain, provider, activity, then provider, activity, plain ...) after a warm-up of each side, so
that machine noise hits every side. The table gives messages/s, the p50/p99 latency of one
message, CPU milliseconds per message of this process (the load) and of the receiver, the median
and best round of each side, and the ratios to plain. Compare figures only within one run: the
machine may be shared.

    .venv/bin/python bench/send_throughput.py                   # 2,000 messages x 3 rounds
    .venv/bin/python bench/send_throughput.py --concurrency 4 --rounds 5
    .venv/bin/python bench/send_throughput.py --sides activity  # one side only, to profile it
    .venv/bin/python bench/send_throughput.py --quick           # smoke test: 200 messages
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

if __name__ == "__main__":
    # Run as a script from anywhere: import the project itself.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from activities.journey_activities import JourneyActivities  # noqa: E402
from bench.common import cpu_seconds, percentile  # noqa: E402
from hilo.channels.base import Delivery  # noqa: E402
from hilo.channels.webhook import SignedWebhook, verify_signature  # noqa: E402
from hilo.db.store import Store  # noqa: E402
from hilo.devtools.devserver import free_port, stop_process_group  # noqa: E402
from hilo.journeys.runs import SendRequest  # noqa: E402

SIDES = ("plain", "provider", "activity")
SECRET = "bench-webhook-signing-secret"
JOURNEY = "bench_webhook"
STEP = "notify_helpdesk"
TEMPLATE = "cart_to_helpdesk"
# The activity renders this for each customer; the other sides get the same text pre-rendered.
BODY = (
    "{{ customer.first_name }} left {{ trigger.properties.product_name }} "
    "(cart {{ trigger.properties.cart_id }}, {{ trigger.properties.cart_value }} USD) behind."
)
SCRIPT = Path(__file__).resolve()


# ---------------------------------------------------------------- the receiver


def receiver_app() -> Any:
    """What a customer's endpoint does: verify, do the work once per key, answer JSON."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    counts: Counter[str] = Counter()
    seen: set[str] = set()

    async def signed(request: Request) -> JSONResponse:
        body = await request.body()
        headers = request.headers
        if not verify_signature(SECRET, headers, body):
            counts["rejected"] += 1
            return JSONResponse({"error": "bad signature"}, status_code=401)
        key = headers.get("idempotency-key", "")
        if not key:
            counts["rejected"] += 1
            return JSONResponse({"error": "no Idempotency-Key"}, status_code=400)
        if key in seen:
            counts["repeated"] += 1
        else:
            seen.add(key)
        json.loads(body)
        counts["signed"] += 1
        counts["signed bytes"] += len(body)
        return JSONResponse({"ok": True})

    async def plain(request: Request) -> JSONResponse:
        body = await request.body()
        json.loads(body)
        counts["plain"] += 1
        counts["plain bytes"] += len(body)
        return JSONResponse({"ok": True})

    async def report(request: Request) -> JSONResponse:
        return JSONResponse(dict(counts))

    return Starlette(
        routes=[
            Route("/hooks/signed", signed, methods=["POST"]),
            Route("/hooks/plain", plain, methods=["POST"]),
            Route("/counts", report, methods=["GET"]),
        ]
    )


def serve(port: int) -> None:
    """Run the receiver under uvicorn in this process (the bench starts it as a child)."""
    import uvicorn

    # A long keep-alive: connections idle between rounds must not be closed under the client.
    uvicorn.run(
        receiver_app(),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=120,
    )


class Receiver:
    """The receiver process, its output in a log file."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "receiver.log"
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--serve", "--port", str(self.port)],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.client = httpx.Client(base_url=self.url, timeout=10.0)

    def ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the receiver exited: {self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get("/counts").status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the receiver did not answer in {timeout:.0f}s: {self.tail()}")

    def counts(self) -> Counter[str]:
        return Counter(self.client.get("/counts").json())

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        self.client.close()
        stop_process_group(self.process, timeout=10)


# ---------------------------------------------------------------- measurement


@dataclass
class Round:
    side: str
    messages: int
    seconds: float
    latencies: list[float]
    load_cpu: float  # CPU seconds of this process in the round
    receiver_cpu: float  # CPU seconds of the receiver in the round
    body_bytes: int  # request bodies as the receiver counted them

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99)

    @property
    def load_ms(self) -> float:
        return 1000 * self.load_cpu / self.messages

    @property
    def receiver_ms(self) -> float:
        return 1000 * self.receiver_cpu / self.messages


def closed_loop(concurrency: int, count: int, one: Callable[[int], None]) -> list[float]:
    """``one(i)`` for every i < count from ``concurrency`` threads, each taking the next index
    as soon as its last call returned: the latency of every call."""
    take = itertools.count().__next__  # one C call: atomic under the GIL
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)

    def lane() -> None:
        mine: list[float] = []
        barrier.wait()
        try:
            while (index := take()) < count:
                started = time.perf_counter()
                one(index)
                mine.append(time.perf_counter() - started)
        except Exception as error:
            with lock:
                errors.append(error)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=lane, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    barrier.wait()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} sending thread(s) failed, first: {errors[0]!r}")
    return latencies


# ---------------------------------------------------------------- the bench


@dataclass(frozen=True)
class Customer:
    customer_id: str
    traits: dict[str, Any]
    cart: dict[str, Any]  # the trigger event's properties
    event_id: str


class Bench:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.store = Store(f"sqlite:///{folder / 'hilo.db'}")
        self.receiver: Receiver | None = None
        self.customers: list[Customer] = []
        self.round_no = 0
        self.activity_sends = 0

    def setup(self, stack: contextlib.ExitStack) -> None:
        self.store.migrate()
        stack.callback(self.store.dispose)
        self.receiver = receiver = Receiver(self.folder)
        stack.callback(receiver.stop)
        self.signed_url = f"{receiver.url}/hooks/signed"
        self.plain_url = f"{receiver.url}/hooks/plain"
        for index in range(self.args.customers):
            self.customers.append(self.add_customer(index))
        receiver.ready()
        # Each side its own long-lived client, as each provider has.
        self.plain = httpx.Client(timeout=httpx.Timeout(10.0, connect=5.0))
        stack.callback(self.plain.close)
        self.webhook = SignedWebhook(self.signed_url, SECRET)
        stack.callback(self.webhook.close)
        activity_webhook = SignedWebhook(self.signed_url, SECRET)
        stack.callback(activity_webhook.close)
        self.activities = JourneyActivities(self.store, providers={"webhook": activity_webhook})

    def add_customer(self, index: int) -> Customer:
        customer_id = f"bench-{index}"
        traits = {
            "email": f"{customer_id}@example.com",
            "first_name": "Ana",
            "last_name": "Souza",
            "plan": "pro" if index % 3 else "free",
            "lifetime_value": 120 + index % 700,
        }
        self.store.upsert_profile(customer_id, traits=traits, consent={"email": True})
        cart = {
            "cart_id": f"cart-{index}",
            "cart_value": 80 + index % 300,
            "product_name": "Trail shoes",
            "cart_url": f"https://shop.example/cart/cart-{index}",
        }
        event_id = f"bench-event-{index}"
        self.store.record_event(
            event_id,
            customer_id,
            "Cart Abandoned",
            cart,
            timestamp=datetime.now(UTC),
            source="bench",
        )
        return Customer(customer_id, traits, cart, event_id)

    # ------------------------------------------------------------ one message of each side

    def message_id(self, side: str, index: int) -> str:
        return f"bench-{self.round_no}-{side}-{index}"

    def send_request(self, index: int) -> SendRequest:
        customer = self.customers[index % len(self.customers)]
        return SendRequest(
            message_id=self.message_id("activity", index),
            workflow_id=f"{JOURNEY}:{customer.customer_id}",
            run_id=f"run-{self.round_no}",
            journey_key=JOURNEY,
            journey_version=1,
            customer_id=customer.customer_id,
            step_id=STEP,
            channel="webhook",
            template=TEMPLATE,
            category="marketing" if index % 2 else "transactional",
            content={"url": self.signed_url, "body": BODY},
            trigger_message_id=customer.event_id,
            scheduled_at=datetime.now(UTC),
        )

    def delivery(self, side: str, index: int) -> Delivery:
        """What the activity hands the provider for the same message."""
        customer = self.customers[index % len(self.customers)]
        cart = customer.cart
        marketing = index % 2 == 1
        message_id = self.message_id(side, index)
        return Delivery(
            message_id=message_id,
            channel="webhook",
            customer_id=customer.customer_id,
            journey_key=JOURNEY,
            step_id=STEP,
            template=TEMPLATE,
            category="marketing" if marketing else "transactional",
            recipient=None,
            content={
                "url": self.signed_url,
                "body": f"{customer.traits['first_name']} left {cart['product_name']} "
                f"(cart {cart['cart_id']}, {cart['cart_value']} USD) behind.",
            },
            profile=customer.traits,
            unsubscribe_url=f"https://hilo.example/l/u/{message_id}" if marketing else None,
        )

    def job(self, side: str, count: int) -> Callable[[int], None]:
        """The call one message costs on ``side``; its inputs are built here, before the clock."""
        if side == "plain":
            client, url = self.plain, self.plain_url
            bodies = [
                json.dumps(
                    SignedWebhook.payload(self.delivery(side, i)), separators=(",", ":")
                ).encode()
                for i in range(count)
            ]
            headers = {"Content-Type": "application/json"}

            def post(index: int) -> None:
                response = client.post(url, content=bodies[index], headers=headers)
                if response.status_code != 200:
                    raise RuntimeError(f"plain post answered {response.status_code}")

            return post
        if side == "provider":
            webhook = self.webhook
            deliveries = [self.delivery(side, i) for i in range(count)]

            def deliver(index: int) -> None:
                webhook.deliver(deliveries[index])

            return deliver
        activities = self.activities
        requests = [self.send_request(i) for i in range(count)]

        def send(index: int) -> None:
            result = activities.send_message(requests[index])
            if result.status != "sent":
                raise RuntimeError(f"{result.message_id} was {result.status}: {result.reason}")

        return send

    def round(self, side: str, count: int) -> Round:
        assert self.receiver is not None
        self.round_no += 1
        one = self.job(side, count)
        before = self.receiver.counts()
        gc.collect()  # the garbage of the last round is not this round's cost
        cpu, receiver_cpu = cpu_seconds(), self.receiver.cpu()
        started = time.perf_counter()
        latencies = closed_loop(self.args.concurrency, count, one)
        seconds = time.perf_counter() - started
        cpu, receiver_cpu = cpu_seconds() - cpu, self.receiver.cpu() - receiver_cpu
        got = self.receiver.counts() - before
        path = "plain" if side == "plain" else "signed"
        if got[path] != count or got["rejected"] or got["repeated"]:
            raise RuntimeError(
                f"{side}: the receiver took {got[path]} of {count} messages, "
                f"rejected {got['rejected']}, saw {got['repeated']} key(s) again"
            )
        if side == "activity":
            self.activity_sends += count
        return Round(side, count, seconds, latencies, cpu, receiver_cpu, got[f"{path} bytes"])

    def check_ledger(self) -> None:
        """Every activity send left one ``sent`` row in the ledger."""
        statuses = Counter(message.status for message in self.store.messages(journey_key=JOURNEY))
        if statuses != Counter({"sent": self.activity_sends}):
            raise RuntimeError(f"ledger: {dict(statuses)}, expected {self.activity_sends} sent")


# ---------------------------------------------------------------- the report


def median_round(rounds: list[Round], side: str) -> Round | None:
    """The round of median throughput (the lower middle one for an even count)."""
    mine = sorted((r for r in rounds if r.side == side), key=lambda r: r.rate)
    return mine[(len(mine) - 1) // 2] if mine else None


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.2f}"


def report(args: argparse.Namespace, rounds: list[Round]) -> None:
    print()
    print("rounds, in the order run (cpu: CPU ms per message, of this process / the receiver)")
    print(
        f"  {'side':<9} {'messages':>8} {'seconds':>8} {'msg/s':>8} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'cpu ms/msg':>14}"
    )
    for r in rounds:
        print(
            f"  {r.side:<9} {r.messages:>8} {r.seconds:>8.2f} {r.rate:>8,.0f} {ms(r.p50):>7}"
            f" {ms(r.p99):>7} {r.load_ms:>6.2f} /{r.receiver_ms:>6.2f}"
        )
    print()
    print(
        f"median of {args.rounds} round(s) per side, {args.concurrency} threads; "
        "best round in brackets"
    )
    print(
        f"  {'side':<9} {'msg/s':>15} {'p50 ms':>7} {'p99 ms':>7} {'load cpu ms/msg':>16}"
        f" {'receiver cpu ms/msg':>20} {'body bytes':>11}"
    )
    chosen: dict[str, Round] = {}
    best: dict[str, Round] = {}
    for side in SIDES:
        middle = median_round(rounds, side)
        if middle is None:
            continue
        top = max((r for r in rounds if r.side == side), key=lambda r: r.rate)
        chosen[side], best[side] = middle, top
        print(
            f"  {side:<9} {middle.rate:>7,.0f} ({top.rate:>5,.0f}) {ms(middle.p50):>7}"
            f" {ms(middle.p99):>7} {middle.load_ms:>16.2f} {middle.receiver_ms:>20.2f}"
            f" {middle.body_bytes / middle.messages:>11.0f}"
        )
    pairs = [("provider", "plain"), ("activity", "plain"), ("activity", "provider")]
    lines = [(a, b) for a, b in pairs if a in chosen and b in chosen]
    if lines:
        print()
        print(
            f"  {'ratio':<19} {'msg/s median':>12} {'msg/s best':>11} {'p50':>6}"
            f" {'load cpu ms/msg':>16}"
        )
    for a, b in lines:
        print(
            f"  {a + '/' + b:<19} {chosen[a].rate / chosen[b].rate:>12.2f}"
            f" {best[a].rate / best[b].rate:>11.2f}"
            f" {chosen[a].p50 / chosen[b].p50:>5.1f}x"
            f" {chosen[a].load_ms / chosen[b].load_ms:>15.1f}x"
        )
    if args.quick:
        print("  (smoke test: short rounds; the figures are rough)")


# ---------------------------------------------------------------- running it


def measure(bench: Bench, args: argparse.Namespace) -> list[Round]:
    sides = SIDES if args.sides == "all" else (args.sides,)
    warmup = min(args.messages, 100)
    print(f"warm-up: {warmup} messages of each side ...", flush=True)
    for side in sides:
        bench.round(side, warmup)
    rounds: list[Round] = []
    for number in range(1, args.rounds + 1):
        # Each round starts with the next side, so that no side always follows the same one.
        shift = (number - 1) % len(sides)
        for side in sides[shift:] + sides[:shift]:
            result = bench.round(side, args.messages)
            rounds.append(result)
            print(
                f"  round {number} {side}: {result.messages} messages in "
                f"{result.seconds:.2f}s = {result.rate:,.0f}/s",
                flush=True,
            )
    if "activity" in sides:
        bench.check_ledger()
    return rounds


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="hilo-bench-send-") as folder:
        bench = Bench(args, Path(folder))
        try:
            with contextlib.ExitStack() as stack:
                print(
                    f"starting the receiver; {args.customers} customers in a SQLite store; "
                    f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} ...",
                    flush=True,
                )
                bench.setup(stack)
                rounds = measure(bench, args)
                report(args, rounds)
        except RuntimeError as error:
            print(f"benchmark failed: {error}", file=sys.stderr)
            if bench.receiver is not None:
                print(f"--- receiver log (last lines):\n{bench.receiver.tail()}", file=sys.stderr)
            return 1
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=2000, help="messages per round (2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each side (3)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="sending threads (16); above 20 httpx's keep-alive pool starts closing connections",
    )
    parser.add_argument("--customers", type=int, default=500, help="profiles messaged (500)")
    parser.add_argument(
        "--sides",
        choices=("all", *SIDES),
        default="all",
        help="run one side only (to profile it); the ratios need all",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 200 messages, 1 round")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.rounds, args.customers = 200, 1, 50
    if min(args.messages, args.rounds, args.concurrency, args.customers) < 1:
        parser.error("--messages, --rounds, --concurrency and --customers must be at least 1")
    return args


def interrupted(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.port)
        return 0
    # SIGTERM ends the run like Ctrl-C: the receiver stops and the temp dir goes.
    signal.signal(signal.SIGTERM, interrupted)
    try:
        return main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
