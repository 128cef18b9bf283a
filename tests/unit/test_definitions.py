"""Malformed journey definitions are refused at publish, each problem naming its step path."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from temporalio.contrib.pydantic import pydantic_data_converter

from hilo.journeys.definitions import (
    STEP_TYPES,
    JourneyDefinition,
    JourneyInvalid,
    JourneyProblem,
    journey_json_schema,
)
from hilo.journeys.validate import load_journey_yaml, parse_journey
from tests.helpers.examples import EXAMPLES

Raw = dict[str, Any]

# A valid journey; each case below breaks one thing in a copy of it.
BASE: Raw = {
    "key": "demo",
    "name": "Demo",
    "trigger": {"event": "Cart Abandoned", "key": "properties.cart_id"},
    "sample": {
        "profile": {"traits": {"first_name": "Ana"}},
        "trigger": {"properties": {"product_name": "Mug"}},
    },
    "steps": [
        {"id": "first_delay", "type": "wait", "duration": "45m"},
        {
            "id": "reminder",
            "type": "send",
            "channel": "email",
            "template": "cart_reminder",
            "subject": "Hi {{ profile.traits.first_name }}",
            "body": "Your {{ trigger.properties.product_name }} is waiting.",
        },
        {
            "id": "push_reminder",
            "type": "send",
            "channel": "push",
            "template": "cart_push",
            "title": "Still thinking it over?",
            "body": "Your cart is still here.",
        },
        {
            "id": "consent_check",
            "type": "branch",
            "branches": [
                {
                    "when": {"path": "profile.consent.sms", "op": "eq", "value": True},
                    "steps": [
                        {
                            "id": "sms_reminder",
                            "type": "send",
                            "channel": "sms",
                            "template": "cart_sms",
                            "body": "Your cart is waiting.",
                        }
                    ],
                }
            ],
        },
    ],
}
NESTED = "steps[3] (consent_check).branches[0]"


def _step(index: int, **changes: Any) -> Callable[[Raw], None]:
    return lambda raw: raw["steps"][index].update(changes)


def _sms(**changes: Any) -> Callable[[Raw], None]:
    return lambda raw: raw["steps"][3]["branches"][0]["steps"][0].update(changes)


def _when(condition: Raw) -> Callable[[Raw], None]:
    return lambda raw: raw["steps"][3]["branches"][0].update(when=condition)


def _append(step: Raw) -> Callable[[Raw], None]:
    return lambda raw: raw["steps"].append(step)


def _insert(index: int, step: Raw) -> Callable[[Raw], None]:
    return lambda raw: raw["steps"].insert(index, step)


def _split(*weights: float) -> Callable[[Raw], None]:
    variants = [{"name": f"v{i}", "weight": weight} for i, weight in enumerate(weights)]
    return _append({"id": "ab_test", "type": "split", "variants": variants})


def _problems(raw: Any) -> list[JourneyProblem]:
    with pytest.raises(JourneyInvalid) as refused:
        parse_journey(raw, source="demo.yaml")
    assert str(refused.value).startswith("demo.yaml: journey definition is invalid")
    return refused.value.problems


def test_the_base_definition_is_valid() -> None:
    assert parse_journey(copy.deepcopy(BASE)).key == "demo"


CASES = [
    pytest.param(
        _step(0, type="sleep"),
        "steps[0] (first_delay)",
        "unknown step type 'sleep'; 'type' must be one of send, wait, wait_for",
        id="unknown-step-type",
    ),
    pytest.param(
        _append({"id": "browsing", "type": "wait_for", "events": [{"event": "Page Viewed"}]}),
        "steps[4] (browsing).timeout",
        "a wait_for must say how long to wait, e.g. timeout: 4h",
        id="wait-for-without-timeout",
    ),
    pytest.param(
        _append({"id": "reminder", "type": "wait", "duration": "1h"}),
        "steps[4] (reminder)",
        "step id 'reminder' is already used at steps[1]",
        id="duplicate-step-id",
    ),
    pytest.param(
        _insert(2, {"id": "stop", "type": "exit"}),
        "steps[3] (push_reminder)",
        "unreachable: it follows exit step 'stop'",
        id="unreachable-after-exit",
    ),
    pytest.param(
        _step(0, duration="4 hours"),
        "steps[0] (first_delay).duration",
        "'4 hours' is not a duration; write a number and a unit",
        id="bad-duration",
    ),
    pytest.param(
        lambda raw: raw["steps"][1].pop("subject"),
        "steps[1] (reminder).subject",
        "email sends need subject (required for email: subject, body)",
        id="email-without-subject",
    ),
    pytest.param(
        _step(1, channel="fax"),
        "steps[1] (reminder).channel",
        "'email', 'sms', 'whatsapp', 'push', 'webpush', 'webhook' or 'audience' (got 'fax')",
        id="unknown-channel",
    ),
    pytest.param(
        _step(1, category="transactional", topic="promotions"),
        "steps[1] (reminder).topic",
        "a transactional send reaches the customer whatever topics they chose",
        id="topic-on-a-transactional-send",
    ),
    pytest.param(
        _append(
            {
                "id": "crm",
                "type": "send",
                "channel": "webhook",
                "template": "crm",
                "url": "https://crm.example/hook",
                "topic": "promotions",
            }
        ),
        "steps[4] (crm).topic",
        "a webhook does not reach the customer, so no topic choice applies",
        id="topic-on-a-webhook",
    ),  # fmt: skip
    pytest.param(
        _step(1, action="remove"),
        "steps[1] (reminder).action",
        "'action' (add or remove) applies to audience sends only",
        id="action-on-an-email",
    ),
    pytest.param(
        _step(1, topic="Big Promotions!"),
        "steps[1] (reminder).topic",
        "String should match pattern",
        id="topic-not-a-topic-key",
    ),
    pytest.param(
        _sms(body="Your cart is waiting. " * 30),
        f"{NESTED}.steps[0] (sms_reminder).body",
        "5 segments; keep it to 4 segments",
        id="sms-over-segment-limit",
    ),
    pytest.param(
        _step(2, title="Still thinking about your cart, your lovely cart, your very own cart?"),
        "steps[2] (push_reminder).title",
        "push title is 69 characters; keep it to 65",
        id="push-title-too-long",
    ),
    pytest.param(
        _step(1, subject="Hi {{ profile.traits.first_name "),
        "steps[1] (reminder).subject",
        "template does not render: expected '}}'",
        id="template-syntax-error",
    ),
    pytest.param(
        _step(1, body="{{ trigger.properties.product }} is waiting"),
        "steps[1] (reminder).body",
        "trigger.properties.product is undefined; add it to the journey's sample",
        id="template-undefined-variable",
    ),
    pytest.param(
        _when({"path": "customer.consent.sms", "op": "eq", "value": True}),
        f"{NESTED}.when",
        "path 'customer.consent.sms' must start with one of trigger, event, profile",
        id="condition-bad-root",
    ),
    pytest.param(
        _when({"path": "event.properties.channel", "op": "eq", "value": "sms"}),
        f"{NESTED}.when",
        "path 'event.properties.channel' cannot be read here; use one of trigger., profile.",
        id="branch-reads-event",
    ),
    pytest.param(
        _when({"path": "profile.consent.sms", "op": "equals", "value": True}),
        f"{NESTED}.when.op",
        "Input should be 'eq', 'ne'",
        id="condition-unknown-operator",
    ),
    pytest.param(
        _split(100),
        "steps[4] (ab_test).variants",
        "at least 2 items",
        id="split-one-variant",
    ),
    pytest.param(
        _split(50, 0),
        "steps[4] (ab_test).variants[1].weight",
        "greater than 0",
        id="split-zero-weight",
    ),
    pytest.param(
        _step(0, until={"start": "09:00", "end": "21:00"}),
        "steps[0] (first_delay)",
        "a wait needs exactly one of 'duration' (e.g. 4h), 'until'",
        id="wait-duration-and-until",
    ),
    pytest.param(
        _step(0, duration=None, until={"start": "25:00", "end": "21:00"}),
        "steps[0] (first_delay).until.start",
        "'25:00' is not a time of day; write HH:MM",
        id="bad-time-window",
    ),
    pytest.param(
        lambda raw: raw.update(entry={"reentry": "after_cooldown"}),
        "entry",
        "reentry 'after_cooldown' needs 'cooldown', e.g. cooldown: 7d",
        id="cooldown-missing",
    ),
    pytest.param(
        lambda raw: raw.update(exit=[{"event": "Cart Abandoned"}]),
        "exit[0].event",
        "is the trigger event: every instance would exit at once",
        id="exit-on-trigger-event",
    ),
    pytest.param(
        lambda raw: raw["trigger"].update(
            where={"path": "trigger.properties.cart_value", "op": "gt", "value": 0}
        ),
        "trigger.where",
        "cannot be read here; use one of event.",
        id="trigger-filter-reads-trigger",
    ),
    pytest.param(
        _step(2, titel="Still there?"),
        "steps[2] (push_reminder).titel",
        "unknown field 'titel'; check its spelling",
        id="unknown-field",
    ),
    pytest.param(
        _sms(channel="pigeon"),
        f"{NESTED}.steps[0] (sms_reminder).channel",
        "(got 'pigeon')",
        id="nested-schema-error",
    ),
    pytest.param(
        lambda raw: raw["steps"][3]["branches"][0]["steps"].insert(
            0, {"id": "stop", "type": "exit"}
        ),
        f"{NESTED}.steps[1] (sms_reminder)",
        "unreachable: it follows exit step 'stop'",
        id="nested-check-error",
    ),
    pytest.param(
        _append(
            {
                "id": "browsing",
                "type": "wait_for",
                "timeout": "4h",
                "events": [{"event": "Page Viewed"}, {"event": "Page Viewed", "steps": []}],
            }
        ),
        "steps[4] (browsing).events[1]",
        "unreachable: events[0] already takes every 'Page Viewed' event",
        id="wait-for-shadowed-outcome",
    ),
]


@pytest.mark.parametrize(("break_it", "path", "message"), CASES)
def test_malformed_definition_is_refused(
    break_it: Callable[[Raw], None], path: str, message: str
) -> None:
    raw = copy.deepcopy(BASE)
    break_it(raw)
    problems = _problems(raw)
    assert [problem.path for problem in problems] == [path], problems
    assert message in problems[0].message


def test_every_problem_is_reported_at_once() -> None:
    raw = copy.deepcopy(BASE)
    _step(0, duration="4 hours")(raw)
    _step(2, titel="Still there?")(raw)
    paths = [problem.path for problem in _problems(raw)]
    assert paths == ["steps[0] (first_delay).duration", "steps[2] (push_reminder).titel"]


def test_one_event_in_several_outcomes_told_apart_by_where() -> None:
    raw = copy.deepcopy(BASE)
    low = {"path": "event.properties.score", "op": "lte", "value": 6}
    _append(
        {
            "id": "survey",
            "type": "wait_for",
            "timeout": "3d",
            "events": [
                {"event": "Survey Answered", "where": low},
                {"event": "Survey Answered"},
            ],
        }
    )(raw)
    assert parse_journey(raw).listens_to() == {"Survey Answered"}


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(JourneyInvalid) as refused:
        load_journey_yaml("key: demo\nsteps: [\n  - id: x\n", source="demo.yaml")
    [problem] = refused.value.problems
    assert problem.path == "line 3, column 3"
    assert problem.message.startswith("not valid YAML")


def test_a_journey_is_a_mapping() -> None:
    [problem] = _problems(["key", "steps"])
    assert (problem.path, problem.message) == (
        "(root)",
        "a journey is a mapping with key, name, trigger and steps",
    )


def test_json_schema_lists_every_step_type() -> None:
    schema = json.loads(json.dumps(journey_json_schema()))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    definitions = schema["$defs"]
    step_refs = [option["$ref"] for option in schema["properties"]["steps"]["items"]["oneOf"]]
    step_types = {
        definitions[ref.removeprefix("#/$defs/")]["properties"]["type"]["const"]
        for ref in step_refs
    }
    assert step_types == set(STEP_TYPES)
    # Every reference resolves, so an editor can follow it.
    assert {ref.removeprefix("#/$defs/") for ref in _refs(schema)} <= definitions.keys()
    # Durations are written as text ("45m"), and the schema says so.
    [duration, _null] = definitions["WaitStep"]["properties"]["duration"]["anyOf"]
    assert duration["type"] == "string" and "pattern" in duration


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


@pytest.mark.parametrize(
    "path", sorted((EXAMPLES / "journeys").glob("*.yaml")), ids=lambda path: path.stem
)
def test_definition_round_trips_as_it_travels_in_histories(path: Path) -> None:
    definition = load_journey_yaml(path.read_text(), source=path.name)
    dumped = definition.model_dump(mode="json")
    again = JourneyDefinition.model_validate(json.loads(json.dumps(dumped)))
    assert again == definition
    assert again.model_dump(mode="json") == dumped
    assert again.checksum() == definition.checksum()
    converter = pydantic_data_converter.payload_converter
    [payload] = converter.to_payloads([definition])
    [decoded] = converter.from_payloads([payload], [JourneyDefinition])
    assert decoded == definition


def test_api_paths_are_not_journey_keys() -> None:
    raw = {
        "key": "schema",
        "name": "Schema",
        "trigger": {"event": "X"},
        "steps": [{"id": "pause", "type": "wait", "duration": "1h"}],
    }
    with pytest.raises(JourneyInvalid) as refused:
        parse_journey(raw)
    [problem] = refused.value.problems
    assert problem.path == "key" and "reserved" in problem.message


def test_a_default_spelled_out_keeps_the_checksum() -> None:
    # A field the grammar gains later reaches every stored definition as its default: an
    # unchanged file must still publish as the version it already is.
    plain = parse_journey(copy.deepcopy(BASE))
    spelled = copy.deepcopy(BASE)
    spelled["steps"][1]["category"] = "marketing"
    spelled["steps"][1]["on_failure"] = "continue"
    spelled["entry"] = {"reentry": "always", "holdout_percent": 0}
    assert parse_journey(spelled).checksum() == plain.checksum()
    # Golden: a new field with a default must leave this value as it is.
    assert plain.checksum() == "f5d149daed4372159cb69fa700c3441abbe93d9d3456e4a8fc8e2fc1938befc5"
    changed = copy.deepcopy(BASE)
    changed["steps"][1]["category"] = "transactional"
    assert parse_journey(changed).checksum() != plain.checksum()
