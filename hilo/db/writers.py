"""One turn to write an SQLite file, for all of its busy writers: ingestion, the dispatcher,
the contact policy.

SQLite has one writer at a time anyway. Waiting here, the next writer goes as soon as the
turn is free, in the order writers asked for it; SQLite's busy handler would sleep in steps of
up to 100 ms and let a steady stream of requests starve the dispatcher. The turn is taken
first among this process's threads (a hand-over lock, :class:`InTurn`), then among the
processes sharing the file (an advisory lock on a file beside the database, kept open:
:class:`ProcessTurn`). PostgreSQL has row locks and needs none of this.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections import deque
from typing import Any

from filelock import FileLock
from sqlalchemy.engine import Engine

__all__ = ["InTurn", "ProcessTurn", "WriterTurn", "writer_turn"]

# Where flock is missing: how often a process waiting for another's turn looks again.
POLL_SECONDS = 0.002


class InTurn:
    """A lock its waiters get in the order they asked for it.

    A ``threading.Lock`` goes to whichever thread runs first once it is free: most often the
    one that just let it go, still holding the GIL, so a busy thread can take many turns in a
    row while another waits. Here the holder hands it to the first waiter.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held = False
        self._waiting: deque[threading.Lock] = deque()

    def __enter__(self) -> None:
        with self._guard:
            if not self._held:
                self._held = True
                return
            baton = threading.Lock()
            baton.acquire()
            self._waiting.append(baton)
        try:
            baton.acquire()  # released by the holder: the lock is ours
        except BaseException:
            with self._guard:
                handed = baton not in self._waiting
                if not handed:
                    self._waiting.remove(baton)
            if handed:
                self.__exit__()
            raise

    def __exit__(self, *_exc: object) -> None:
        with self._guard:
            if self._waiting:
                self._waiting.popleft().release()
            else:
                self._held = False


class ProcessTurn:
    """The turn among processes: an advisory lock on ``path``, a file kept open.

    On POSIX, ``flock`` on the open file: under a microsecond a turn, and a waiter wakes the
    moment the turn is free. ``filelock`` opens and closes its file on every turn (76 us a
    turn against 0.9 measured here), which halved SQLite decisions/s in
    ``bench/contact_policy.py``; it stays the fallback where ``fcntl`` does not exist, so the
    API still imports on any platform.
    """

    def __init__(self, path: str) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX
            self._fallback: FileLock | None = FileLock(path, thread_local=False, mode=0o600)
            return
        self._fallback = None
        self._flock = fcntl.flock
        self._exclusive, self._unlock = fcntl.LOCK_EX, fcntl.LOCK_UN
        self._file = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        weakref.finalize(self, os.close, self._file)

    def acquire(self) -> None:
        if self._fallback is not None:
            self._fallback.acquire(poll_interval=POLL_SECONDS)
        else:
            self._flock(self._file, self._exclusive)

    def release(self) -> None:
        if self._fallback is not None:
            self._fallback.release()
        else:
            self._flock(self._file, self._unlock)


class WriterTurn:
    """The turn to write one SQLite file: first in this process, then among processes."""

    def __init__(self, database: str | None) -> None:
        self._threads = InTurn()
        self._file = (
            ProcessTurn(f"{database}-writer") if database and database != ":memory:" else None
        )

    def __enter__(self) -> None:
        self._threads.__enter__()
        if self._file is None:
            return
        try:
            self._file.acquire()
        except BaseException:
            self._threads.__exit__()
            raise

    def __exit__(self, *_exc: object) -> None:
        try:
            if self._file is not None:
                self._file.release()
        finally:
            self._threads.__exit__()


_turns: weakref.WeakKeyDictionary[Engine, WriterTurn] = weakref.WeakKeyDictionary()
_turns_guard = threading.Lock()


def writer_turn(engine: Engine) -> contextlib.AbstractContextManager[Any]:
    """The one turn to write ``engine``'s database, shared by every writer in this process."""
    if engine.dialect.name != "sqlite":
        return contextlib.nullcontext()
    with _turns_guard:
        turn = _turns.get(engine)
        if turn is None:
            turn = _turns[engine] = WriterTurn(engine.url.database)
        return turn
