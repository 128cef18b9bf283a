"""``hilo dev``: the whole stack on one machine, resumable.

Temporal dev server (SQLite file, UI on), Hilo's search attributes, the worker, the API and
the example journeys. Stopped with Ctrl-C and started again, every journey resumes from the
state folder: waiting timers fire, and the message ledger keeps sends to one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from urllib.parse import quote

import uvicorn

from hilo.catalog import JourneyCatalog
from hilo.devserver import DevServer
from hilo.playbook import load_playbook
from hilo.settings import Settings
from hilo.storage import Store


def _port(address: str) -> int:
    try:
        return int(address.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        raise SystemExit(
            f"HILO_TEMPORAL_ADDRESS={address!r} has no port; write host:port, e.g. localhost:7233"
        ) from None


async def run_dev(settings: Settings, publish_examples: bool = True) -> None:
    from api.app import create_app
    from worker.main import build_worker, configured_activities, connect

    state = settings.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    server = DevServer(
        db_file=state / "temporal.db",
        port=_port(settings.temporal_address),
        ui_port=settings.temporal_ui_port,
        namespace=settings.temporal_namespace,
        log_file=state / "temporal.log",
    )
    print(f"Starting Temporal dev server (state in {state}) ...", flush=True)
    await server.start()
    try:
        settings = settings.model_copy(update={"temporal_address": server.address})
        client = await connect(settings)
        store = Store(settings.resolved_database_url)
        store.migrate()
        if publish_examples and settings.examples_dir.is_dir():
            catalog = JourneyCatalog(store, load_playbook(settings.playbook_file))
            for published in catalog.publish_folder(settings.examples_dir):
                note = "published" if published.created else "unchanged"
                print(f"  journey {published.key} v{published.version} ({note})")
                for warning in published.warnings:
                    print(f"    warning: {warning}")
        worker = build_worker(
            client,
            store,
            settings.task_queue,
            settings.max_concurrent_activities,
            activities=configured_activities(store),
            sandboxed=settings.workflow_sandbox,
        )
        app = create_app(settings, store=store, client=client)
        api = _Api(
            uvicorn.Config(app, host=settings.api_host, port=settings.api_port, log_level="warning")
        )
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, api.request_exit)
        try:
            # The worker starts before the API answers and stops after it.
            async with worker:
                _print_urls(settings, server)
                await api.serve()  # returns on Ctrl-C
                print("\nStopping: API, worker, then Temporal ...", flush=True)
        finally:
            store.dispose()
    finally:
        server.stop()
        print("Stopped. `hilo dev` again resumes every journey where it was.", flush=True)


class _Api(uvicorn.Server):
    """uvicorn without its own signal handling: Ctrl-C must stop the worker and Temporal too.

    (uvicorn re-raises the signal after serving, which would cancel the shutdown midway.)
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def request_exit(self) -> None:
        self.should_exit = True


def _print_urls(settings: Settings, server: DevServer) -> None:
    ui = server.ui_url
    namespace = settings.temporal_namespace
    api = f"http://{settings.api_host}:{settings.api_port}"
    query = quote("HiloJourney = 'abandoned_cart'")
    print(
        "\nHilo is running.\n"
        f"  Temporal UI      {ui}/namespaces/{namespace}/workflows\n"
        f"  Temporal server  {server.address} (namespace {namespace})\n"
        f"  Hilo API         {api}/docs   (admin token: HILO_ADMIN_TOKEN)\n"
        "\nTry a journey:\n"
        "  hilo send-event 'Cart Abandoned' --customer 42 "
        "-p cart_id=c1 -p cart_value=80 -p product_name=Mug\n"
        f"  then open {ui}/namespaces/{namespace}/workflows?query={query}\n"
        "\nCtrl-C stops everything.\n",
        flush=True,
    )
