"""Shared fixtures: a real time-skipping Temporal server and a real SQLite database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from hilo.journeys import JourneyDefinition, load_journey_yaml
from hilo.settings import PROJECT_ROOT
from hilo.simulation import JourneyLab, start_time_skipping
from hilo.storage import Store

EXAMPLES = PROJECT_ROOT / "examples"


def example(key: str) -> JourneyDefinition:
    path = EXAMPLES / "journeys" / f"{key}.yaml"
    return load_journey_yaml(path.read_text(), source=path.name)


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


@pytest.fixture
async def lab(time_env: WorkflowEnvironment, store: Store) -> AsyncIterator[JourneyLab]:
    async with JourneyLab.open(time_env, store) as journey_lab:
        yield journey_lab
