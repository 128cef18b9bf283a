"""Replay: recorded journey histories still replay on today's workflow code."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from hilo.devtools.simulation import JourneyLab
from tests.helpers.examples import example
from tests.helpers.incompatible_journey import SendsBeforeWaiting
from workflows.journey import JourneyWorkflow

HISTORIES = sorted((Path(__file__).parents[1] / "histories").glob("*.json"))


def history(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(path.stem, path.read_text())


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: p.stem)
async def test_recorded_history_replays(path: Path) -> None:
    replayer = Replayer(workflows=[JourneyWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history(path))


def test_histories_were_recorded() -> None:
    assert {p.stem for p in HISTORIES} >= {
        "abandoned_cart_completed",
        "abandoned_cart_back_on_site",
        "abandoned_cart_purchased",
        # Recorded before the same-value rule: a cart started with 555 (a number) that an
        # Order Completed with "555" did not end; it replays as it ran.
        "abandoned_cart_number_id_text_purchase",
    }


async def test_replay_catches_an_incompatible_change() -> None:
    replayer = Replayer(workflows=[SendsBeforeWaiting], data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(history(HISTORIES[0]), raise_on_replay_failure=False)
    assert result.replay_failure is not None
    assert "Nondeterminism" in type(result.replay_failure).__name__


async def test_fresh_run_replays(lab: JourneyLab) -> None:
    lab.store.upsert_profile("7", traits={"email": "b@example.com"}, consent={"push": True})
    lab.publish(example("abandoned_cart"))
    route = await lab.send("Cart Abandoned", "7", cart_id="x", cart_value=500)
    await lab.result(route.started[0])
    fresh = await lab.handles[route.started[0]].fetch_history()
    replayer = Replayer(workflows=[JourneyWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(fresh)
