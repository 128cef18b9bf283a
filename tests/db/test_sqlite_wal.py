"""SQLite as several writers share it: the WAL copied by the store's own thread, not by a
request; the turn to write handed from process to process."""

from __future__ import annotations

import multiprocessing
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from hilo.db.store import WAL_AUTOCHECKPOINT_PAGES, Store
from hilo.db.writers import writer_turn


def profiles_in_main_file(database: Path, scratch: Path) -> int:
    """Profiles the database file holds on its own, WAL aside: what checkpoints copied."""
    shutil.copyfile(database, scratch)  # without the -wal file beside it
    connection = sqlite3.connect(f"file:{scratch}?immutable=1", uri=True)
    try:
        return int(connection.execute("SELECT count(*) FROM profiles").fetchone()[0])
    except sqlite3.DatabaseError:
        return 0  # not even the schema copied yet
    finally:
        connection.close()


def test_writes_reach_the_database_file_through_the_stores_checkpoint_thread(
    tmp_path: Path,
) -> None:
    database = tmp_path / "hilo.db"
    store = Store(f"sqlite:///{database}")
    try:
        store.migrate()
        with store.engine.connect() as connection:
            threshold = connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar()
        # Commits do not copy the WAL themselves: far more pages than this test writes.
        assert threshold == WAL_AUTOCHECKPOINT_PAGES
        for index in range(300):
            store.upsert_profile(f"c{index}", traits={"email": f"c{index}@example.com"})
        found = 0
        deadline = time.monotonic() + 10
        while found < 300 and time.monotonic() < deadline:
            time.sleep(0.2)
            found = profiles_in_main_file(database, tmp_path / "copy.db")
        assert found == 300
    finally:
        store.dispose()


def test_the_checkpoint_thread_ends_with_the_store(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'hilo.db'}")
    checkpointer = store._checkpointer
    assert checkpointer is not None and checkpointer._thread.is_alive()
    store.dispose()
    assert not checkpointer._thread.is_alive()


def hold_the_writer_turn(url: str, held: Any, release: Any) -> None:
    """Another process: takes the turn to write, says so, keeps it until told."""
    store = Store(url)
    try:
        with writer_turn(store.engine):
            held.set()
            release.wait(timeout=30)
    finally:
        store.dispose()


def test_the_turn_to_write_is_shared_with_other_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hilo.db'}"
    store = Store(url)
    context = multiprocessing.get_context("spawn")
    held, release = context.Event(), context.Event()
    other = context.Process(target=hold_the_writer_turn, args=(url, held, release))
    other.start()
    try:
        assert held.wait(timeout=60)
        got_it = threading.Event()

        def take_turn() -> None:
            with writer_turn(store.engine):
                got_it.set()

        waiter = threading.Thread(target=take_turn)
        waiter.start()
        # The other process holds the turn: this one waits for it...
        assert not got_it.wait(timeout=1.0)
        release.set()
        # ... and has it as soon as it is given back, not after a busy handler's sleep.
        assert got_it.wait(timeout=5)
        waiter.join()
    finally:
        release.set()
        other.join(timeout=30)
        store.dispose()
