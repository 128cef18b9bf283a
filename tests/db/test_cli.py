"""The ``hilo`` command line: validate, publish, list, simulate."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hilo.cli.app import app
from hilo.db.store import Store
from hilo.settings import Settings
from tests.helpers.examples import EXAMPLES

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
    listed = runner.invoke(app, ["journeys", "list"])
    assert "abandoned_cart" in listed.output and "v1" in listed.output
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


def without_unsubscribe_link(env: Path) -> Path:
    # The abandoned cart's marketing emails, without the unsubscribe link publish requires.
    text = (EXAMPLES / "journeys" / "abandoned_cart.yaml").read_text()
    path = env / "no_unsubscribe.yaml"
    path.write_text(text.replace("Unsubscribe: {{ unsubscribe_url }}", "Bye"))
    return path


def test_validate_refuses_what_publish_refuses(env: Path) -> None:
    journey = without_unsubscribe_link(env)
    validated = runner.invoke(app, ["journeys", "validate", str(journey)])
    published = runner.invoke(app, ["journeys", "publish", str(journey)])
    assert (validated.exit_code, published.exit_code) == (1, 1)
    for result in (validated, published):
        assert "steps[5] (second_reminder).body: a marketing email must link" in result.output
    assert "no journeys published yet" in runner.invoke(app, ["journeys", "list"]).output


def test_publishing_an_unchanged_file_keeps_its_version(env: Path) -> None:
    journey = EXAMPLES / "journeys" / "welcome.yaml"
    first = runner.invoke(app, ["journeys", "publish", str(journey)])
    assert first.exit_code == 0 and "published welcome v1" in first.output
    again = runner.invoke(app, ["journeys", "publish", str(journey)])
    assert again.exit_code == 0, again.output
    assert "unchanged welcome v1" in again.output
    assert "v1" in runner.invoke(app, ["journeys", "list"]).output
    # Archived journeys refuse a publish, changed or not, as the API does (409).
    store = Store(Settings().resolved_database_url)
    store.set_journey_status("welcome", "archived")
    store.dispose()
    refused = runner.invoke(app, ["journeys", "publish", str(journey)])
    assert refused.exit_code == 1 and "archived" in refused.output


def test_simulate_finds_a_published_journey_by_its_key(env: Path) -> None:
    # A journey that exists only in the database: published from a file since deleted.
    text = (EXAMPLES / "journeys" / "abandoned_cart.yaml").read_text()
    source = env / "cart_rescue.yaml"
    source.write_text(text.replace("key: abandoned_cart", "key: cart_rescue", 1))
    assert runner.invoke(app, ["journeys", "publish", str(source)]).exit_code == 0
    source.unlink()
    scenario = env / "purchase.yaml"
    scenario.write_text(SCENARIO)
    result = runner.invoke(app, ["simulate", "cart_rescue", "--scenario", str(scenario)])
    assert result.exit_code == 0, result.output
    assert "cart_rescue: published version 1" in result.output
    assert "expectations met" in result.output
    unknown = runner.invoke(app, ["simulate", "no_such_journey", "--scenario", str(scenario)])
    assert unknown.exit_code == 2
    assert "no published journey with that key" in unknown.output


def test_expectations_compare_offsets_as_durations(env: Path) -> None:
    scenario = env / "zero.yaml"
    scenario.write_text(
        SCENARIO.replace("+45m email", "+0d45m email").replace("+2h end", "+120m end")
    )
    result = runner.invoke(app, ["simulate", "abandoned_cart", "--scenario", str(scenario)])
    assert result.exit_code == 0, result.output
    assert "expectations met" in result.output
    bad = env / "bad_expect.yaml"
    bad.write_text(SCENARIO.replace("+2h end exited (purchased)", "2h end"))
    refused = runner.invoke(app, ["simulate", "abandoned_cart", "--scenario", str(bad)])
    assert refused.exit_code == 2
    assert "expect[1]" in refused.output and "is not a timeline line" in refused.output


def test_zero_offsets_are_the_same_moment() -> None:
    from hilo.devtools.simulation import SimulationReport

    report = SimulationReport(
        timeline=["+0s email hello"], results={}, expected=["+0m email hello"]
    )
    assert report.matches, report.mismatch()
    assert not SimulationReport(["+1m email hello"], {}, ["+0m email hello"]).matches
