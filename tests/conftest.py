"""Shared fixtures: a real time-skipping Temporal server, real SQLite and real PostgreSQL."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from hilo.db.store import Store
from hilo.devtools.simulation import JourneyLab, start_time_skipping
from tests.helpers.postgres import PostgresServer


@pytest.fixture(scope="session")
async def time_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await start_time_skipping()
    yield env
    await env.shutdown()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    db = Store(f"sqlite:///{tmp_path / 'hilo.db'}")
    db.migrate()
    yield db
    db.dispose()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer | str]:
    """One PostgreSQL server for the session (or the one HILO_TEST_POSTGRES_URL names)."""
    external = os.environ.get("HILO_TEST_POSTGRES_URL")
    if external:
        yield external
        return
    server = PostgresServer().start()
    yield server
    server.stop()


_databases = itertools.count(1)


@pytest.fixture
def pg_store(postgres: PostgresServer | str) -> Iterator[Store]:
    """A fresh, migrated PostgreSQL database for one test."""
    if isinstance(postgres, str):
        db = Store(postgres)
    else:
        db = Store(postgres.create_database(f"test_{os.getpid()}_{next(_databases)}"))
    db.migrate()
    yield db
    db.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest) -> Store:
    """The same test on SQLite and on PostgreSQL."""
    fixture = "store" if request.param == "sqlite" else "pg_store"
    store: Store = request.getfixturevalue(fixture)
    return store


@pytest.fixture
async def lab(time_env: WorkflowEnvironment, store: Store) -> AsyncIterator[JourneyLab]:
    # Sandboxed: the journey tests also keep the interpreter free of what the sandbox forbids
    # (production runs it without; the example simulations run it that way).
    async with JourneyLab.open(time_env, store, sandboxed=True) as journey_lab:
        yield journey_lab
