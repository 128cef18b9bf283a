"""A throwaway PostgreSQL server for tests and benchmarks, from the Debian packages.

``make test`` installs PostgreSQL when it is missing; this module runs ``initdb`` and
``postgres`` from it in a temporary folder on a free port, so tests never share a server
with anything else. PostgreSQL refuses to run as root, so under root it runs as the
``postgres`` user the Debian package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hilo.devtools.devserver import free_port


def postgres_bin_dir() -> Path | None:
    """Where ``initdb`` and ``postgres`` live: Debian keeps them out of PATH."""
    found = shutil.which("initdb")
    if found:  # often a symlink into the versioned folder that has the other tools
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


@dataclass
class PostgresServer:
    port: int = field(default_factory=free_port)
    database: str = "hilo"
    user: str = "hilo"
    folder: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    _owned_folder: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> PostgresServer:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise RuntimeError(
                "PostgreSQL is not installed; `make test` installs it "
                "(apt-get install postgresql), or set HILO_TEST_POSTGRES_URL"
            )
        if self.folder is None:
            self._owned_folder = tempfile.TemporaryDirectory(prefix="hilo-pg-")
            self.folder = Path(self._owned_folder.name)
        data = self.folder / "data"
        run_as = _unprivileged_user()
        if run_as is not None:
            os.chown(self.folder, run_as.pw_uid, run_as.pw_gid)
        self._run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            run_as,
        )
        self.process = subprocess.Popen(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(self.folder),
                # A test server: durability off buys speed, and the data is thrown away.
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "postgres.log", "wb"),  # noqa: SIM115 - lives with the process
            preexec_fn=_demote(run_as),
        )
        self._wait_ready(bin_dir)
        self.create_database(self.database)
        return self

    def create_database(self, name: str) -> str:
        """A fresh database on this server; its SQLAlchemy URL."""
        bin_dir = postgres_bin_dir()
        assert bin_dir is not None
        self._run(
            [
                str(bin_dir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                self.user,
                name,
            ],
            _unprivileged_user(),
        )
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # smart shutdown
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._owned_folder is not None:
            self._owned_folder.cleanup()
            self._owned_folder = None
            self.folder = None

    def _wait_ready(self, bin_dir: Path) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                log = (self.folder / "postgres.log").read_text() if self.folder else ""
                raise RuntimeError(f"PostgreSQL exited at start:\n{log[-2000:]}")
            ready = subprocess.run(
                [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("PostgreSQL did not become ready in 30 s")

    @staticmethod
    def _run(command: list[str], run_as: pwd.struct_passwd | None) -> None:
        done = subprocess.run(command, capture_output=True, preexec_fn=_demote(run_as))
        if done.returncode != 0:
            raise RuntimeError(
                f"{Path(command[0]).name} failed: {done.stderr.decode(errors='replace')}"
            )


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


def _unprivileged_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError(
            "PostgreSQL cannot run as root and there is no 'postgres' user"
        ) from None


def _demote(user: pwd.struct_passwd | None) -> Callable[[], None] | None:
    if user is None:
        return None

    def change_user() -> None:
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return change_user
