"""``hilo dev``: the whole stack on one machine, resumable.

Temporal dev server (SQLite file, UI on), Hilo's search attributes, the worker, the API and
the example journeys. Stopped with Ctrl-C and started again, every journey resumes from the
state folder: waiting timers fire, and the message ledger keeps sends to one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import uvicorn

from hilo.devtools.devserver import HOST, DevServer
from hilo.settings import Settings


def _port(address: str) -> int:
    try:
        return int(address.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        raise SystemExit(
            f"HILO_TEMPORAL_ADDRESS={address!r} has no port; write host:port, e.g. localhost:7233"
        ) from None


def port_problems(settings: Settings) -> list[str]:
    """One line per port ``hilo dev`` needs and cannot have, naming the setting that moves it.

    Checked before anything starts: otherwise the Temporal server dies with "address already
    in use" in its log only, or the stack attaches to a server it did not start.
    """
    temporal_port = _port(settings.temporal_address)
    # (port, host it binds, what it is, the setting that moves it, how the setting is written)
    wanted = [
        (temporal_port, HOST, "Temporal frontend", "HILO_TEMPORAL_ADDRESS", f"{HOST}:{{}}"),
        (settings.temporal_ui_port, HOST, "Temporal UI", "HILO_TEMPORAL_UI_PORT", "{}"),
        (settings.api_port, settings.api_host, "Hilo API", "HILO_API_PORT", "{}"),
    ]
    ours = {port for port, *_ in wanted}
    problems = []
    for index, (port, host, what, setting, written) in enumerate(wanted):
        shared = [other for other, *_rest in wanted[:index] if other == port]
        if shared:
            first = next(row[3] for row in wanted if row[0] == port)
            problems.append(f"{first} and {setting} are both {port}; give each its own port")
            continue
        error = _bind_error(host, port)
        if error == errno.EADDRINUSE:
            free = _next_free_port(host, port, avoid=ours)
            problems.append(
                f"port {port} ({what}) is in use; set {setting}={written.format(free)} "
                "or stop what holds it"
            )
        elif error is not None:
            problems.append(
                f"cannot listen on {host}:{port} ({what}): {os.strerror(error)}; check {setting}"
                + (" and HILO_API_HOST" if setting == "HILO_API_PORT" else "")
            )
    return problems


def _bind_error(host: str, port: int) -> int | None:
    """The errno binding ``host:port`` gives, as the server about to start would meet it."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return errno.EADDRNOTAVAIL
    for family, kind, protocol, _name, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            # As servers do: a port whose last connection is in TIME_WAIT is free to them.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                return error.errno or errno.EADDRINUSE
    return None


def _next_free_port(host: str, port: int, avoid: set[int]) -> int:
    for candidate in range(port + 1, min(port + 200, 65536)):
        if candidate not in avoid and _bind_error(host, candidate) is None:
            return candidate
    return port + 1


async def run_dev(settings: Settings, publish_examples: bool = True) -> None:
    state = settings.state_dir.resolve()
    server = DevServer(
        db_file=state / "temporal.db",
        port=_port(settings.temporal_address),
        ui_port=settings.temporal_ui_port,
        namespace=settings.temporal_namespace,
        log_file=state / "temporal.log",
        pid_file=state / "temporal.pid",
    )
    # Before the ports: a server an earlier hilo dev left running holds them.
    try:
        stopped = server.clear_leftover()
    except RuntimeError as running:
        raise SystemExit(str(running)) from None
    if stopped:
        print(stopped, flush=True)
    problems = port_problems(settings)
    if problems:
        raise SystemExit("\n".join(problems))  # a line each, no traceback: the user acts on it

    # Imported after the check, so a refusal comes in a moment, not after seconds of imports.
    from api.app import create_app
    from hilo.catalog import JourneyCatalog
    from hilo.db.store import Store
    from hilo.playbook import load_playbook
    from worker.main import build_worker, configured_activities, connect

    state.mkdir(parents=True, exist_ok=True)
    print(f"Starting Temporal dev server (state in {state}) ...", flush=True)
    await server.start()
    death = asyncio.create_task(_server_death(server))
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
            activities=configured_activities(store, settings),
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
                serving = asyncio.create_task(api.serve())  # returns on Ctrl-C
                await asyncio.wait([serving, death], return_when=asyncio.FIRST_COMPLETED)
                api.request_exit()
                await serving
                print("\nStopping: API, worker, then Temporal ...", flush=True)
        finally:
            store.dispose()
    except Exception:
        if not death.done():
            raise
        # What failed, failed because the server is gone, which _server_death has said.
    finally:
        death.cancel()  # before the stop below, which is no death
        server.stop()
        print("Stopped. `hilo dev` again resumes every journey where it was.", flush=True)
    if death.done() and not death.cancelled():
        raise SystemExit(1)


async def _server_death(server: DevServer, every: float = 0.5) -> None:
    """Returns once the Temporal server has ended on its own, having said so in one line.

    Hilo then stops too rather than start the server again: a server that dies has a reason
    (killed, out of memory or disk, a damaged database) that a restart would hide or repeat,
    while every journey waits safely in the state folder for the next ``hilo dev``.
    """
    # A Popen has no awaitable exit, and a thread blocked in its wait() outlives a cancel.
    while (code := server.exit_code()) is None:  # noqa: ASYNC110
        await asyncio.sleep(every)
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    print(
        f"The Temporal dev server stopped on its own ({how}; its log: {server.log_file}); "
        "Hilo stops too, and `hilo dev` starts both again with every journey where it was.",
        file=sys.stderr,
        flush=True,
    )


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
    print(banner(settings, server), flush=True)


def banner(settings: Settings, server: DevServer) -> str:
    """What ``hilo dev`` prints once everything answers: where each part is, the secrets a
    developer needs (they are development values), and commands that run as printed."""
    ui = server.ui_url
    namespace = settings.temporal_namespace
    api = settings.api_url
    token = settings.admin_token
    write_key = next(iter(settings.sources), "")
    query = "HiloJourney = 'abandoned_cart'"
    namespace_option = f" --namespace {namespace}" if namespace != "default" else ""
    return (
        "\nHilo is running.\n"
        f"  Temporal UI        {ui}/namespaces/{namespace}/workflows\n"
        f"  Temporal server    {server.address} (namespace {namespace})\n"
        f"  Hilo API           {api}/docs\n"
        f"  Admin token        {token}   (header  Authorization: Bearer {token})\n"
        f"  Segment write key  {write_key}   (the Basic auth user of /v1 calls)\n"
        "\nTry a journey:\n"
        f"  {_beside_python('hilo')} send-event 'Cart Abandoned' --customer 42 "
        "-p cart_id=c1 -p cart_value=80 -p product_name=Mug\n"
        f"  then open {ui}/namespaces/{namespace}/workflows?query={quote(query)}\n"
        "  or ask the API and the Temporal CLI (which needs the server's --address):\n"
        f"  curl -H 'Authorization: Bearer {token}' {api}/profiles/42/timeline\n"
        f"  {_beside_python('temporal')} workflow list --address {server.address}"
        f'{namespace_option} --query "{query}"\n'
        "\nPorts move with HILO_API_PORT, HILO_TEMPORAL_ADDRESS and HILO_TEMPORAL_UI_PORT, in\n"
        "the environment or in a .env file where you run hilo (every hilo command reads it).\n"
        "\nCtrl-C stops everything.\n"
    )


def _beside_python(program: str) -> str:
    """How to run a program installed beside this Python (the virtualenv is rarely on PATH):
    relative to the current folder when it is inside it, as ``.venv/bin/hilo``."""
    path = Path(sys.executable).parent / program
    if not path.exists():
        return program if shutil.which(program) else f"{sys.executable} -m hilo.cli.app"
    with contextlib.suppress(ValueError):
        return str(path.absolute().relative_to(Path.cwd()))
    return str(path.absolute())
