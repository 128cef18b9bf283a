"""The ``hilo`` command line: validate, publish, list, simulate."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hilo.cli import app
from tests.conftest import EXAMPLES

runner = CliRunner()

SCENARIO = """
name: purchase after two hours
customer:
  id: "42"
  traits: {email: ana@example.com, first_name: Ana}
  consent: {push: true}
events:
  - event: Cart Abandoned
    properties: {cart_id: c1, cart_value: 80, product_name: Mug}
  - at: 2h
    event: Order Completed
    properties: {cart_id: c1, total: 80}
expect:
  - +45m email cart_reminder_1
  - +2h end exited (purchased)
"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HILO_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def test_simulate_meets_expectations(env: Path) -> None:
    scenario = env / "purchase.yaml"
    scenario.write_text(SCENARIO)
    result = runner.invoke(app, ["simulate", "abandoned_cart", "--scenario", str(scenario)])
    assert result.exit_code == 0, result.output
    assert "+45m email cart_reminder_1" in result.output
    assert "expectations met" in result.output


def test_simulate_exits_non_zero_when_the_timeline_differs(env: Path) -> None:
    scenario = env / "wrong.yaml"
    scenario.write_text(
        SCENARIO.replace("+45m email cart_reminder_1", "+30m email cart_reminder_1")
    )
    result = runner.invoke(app, ["simulate", "abandoned_cart", "--scenario", str(scenario)])
    assert result.exit_code == 1
    assert "expectations NOT met" in result.output
    assert "✗ +30m email cart_reminder_1" in result.output


def test_simulate_names_a_bad_scenario_field(env: Path) -> None:
    scenario = env / "bad.yaml"
    scenario.write_text("events:\n  - at: soon\n    event: Cart Abandoned\n")
    result = runner.invoke(app, ["simulate", "abandoned_cart", "--scenario", str(scenario)])
    assert result.exit_code == 2
    assert "events.0.at" in result.output and "not a duration" in result.output


def test_validate_publish_list_pause_resume(env: Path) -> None:
    journey = EXAMPLES / "journeys" / "abandoned_cart.yaml"
    assert runner.invoke(app, ["journeys", "validate", str(journey)]).exit_code == 0
    published = runner.invoke(app, ["journeys", "publish", str(journey)])
    assert published.exit_code == 0 and "published abandoned_cart v1" in published.output
    again = runner.invoke(app, ["journeys", "publish", str(journey)])
    assert "published abandoned_cart v2" in again.output
    listed = runner.invoke(app, ["journeys", "list"])
    assert "abandoned_cart" in listed.output and "v2" in listed.output
    assert "paused" in runner.invoke(app, ["journeys", "pause", "abandoned_cart"]).output
    assert "active" in runner.invoke(app, ["journeys", "resume", "abandoned_cart"]).output
    unknown = runner.invoke(app, ["journeys", "pause", "nope"])
    assert unknown.exit_code == 1 and "no journey 'nope'" in unknown.output


def test_validate_reports_step_paths(env: Path) -> None:
    broken = env / "broken.yaml"
    broken.write_text(
        "key: broken\nname: Broken\ntrigger: {event: X}\nsteps:\n"
        "  - {id: look, type: wait_for, events: [{event: Y}]}\n"
    )
    result = runner.invoke(app, ["journeys", "validate", str(broken)])
    assert result.exit_code == 1
    assert "steps[0] (look).timeout" in result.output


def test_schema_is_written(env: Path) -> None:
    target = env / "journey.schema.json"
    assert runner.invoke(app, ["journeys", "schema", "-o", str(target)]).exit_code == 0
    assert '"wait_for"' in target.read_text()
