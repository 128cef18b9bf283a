"""Every example scenario runs its journey on the time-skipping server and gets its timeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from hilo.devtools.simulation import JourneyLab, Scenario, run_scenario
from hilo.journeys.validate import load_journey_yaml
from tests.helpers.examples import EXAMPLES, example

JOURNEYS = sorted((EXAMPLES / "journeys").glob("*.yaml"))
SCENARIOS = sorted((EXAMPLES / "scenarios").glob("*.yaml"))
SEED_JOURNEYS = {"abandoned_cart", "welcome", "post_purchase", "win_back", "support_follow_up"}


def _scenario(path: Path) -> Scenario:
    return Scenario.from_yaml(path.read_text(), source=path.name)


def test_the_five_seed_journeys_load() -> None:
    assert {path.stem for path in JOURNEYS} == SEED_JOURNEYS
    for path in JOURNEYS:
        definition = load_journey_yaml(path.read_text(), source=path.name)
        assert definition.key == path.stem
        assert definition.sample is not None, f"{path.name}: templates are checked with a sample"


def test_every_journey_has_scenarios_with_expectations() -> None:
    per_journey: dict[str, int] = {}
    for path in SCENARIOS:
        key, case, suffix = path.name.split(".")
        assert key in SEED_JOURNEYS and case and suffix == "yaml", path.name
        assert _scenario(path).expect is not None, f"{path.name} has no expect:"
        per_journey[key] = per_journey.get(key, 0) + 1
    assert per_journey.keys() == SEED_JOURNEYS
    assert min(per_journey.values()) >= 2


def test_scenario_customers_are_unique() -> None:
    # The session's Temporal server outlives each test's database: a closed workflow of a
    # 're-entry once' journey would refuse another scenario's customer with the same id.
    ids = [_scenario(path).customer.id for path in SCENARIOS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("path", SCENARIOS, ids=[path.stem for path in SCENARIOS])
async def test_scenario(lab: JourneyLab, path: Path) -> None:
    definition = example(path.name.split(".")[0])
    report = await run_scenario(lab, definition, _scenario(path))
    assert report.matches, f"{path.name}: timeline differs\n{report.mismatch()}"
