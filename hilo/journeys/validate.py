"""The one validation of a journey, used by ``hilo validate``, ``hilo publish`` and the API:
the schema (pydantic), then what a schema cannot see (unique ids, reachable steps, condition
roots, exit rules), then the templates (they render with the sample, fit their channel).

The catalog adds what depends on the store at publish (playbook, promotions, topics).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from hilo.journeys.conditions import Condition
from hilo.journeys.definitions import (
    STEP_TYPES,
    AnyStep,
    BranchStep,
    ExitStep,
    JourneyDefinition,
    JourneyInvalid,
    JourneyProblem,
    WaitForStep,
    child_lists,
    walk_steps,
)
from hilo.journeys.templates import check_templates


def parse_journey(raw: Any, source: str | None = None) -> JourneyDefinition:
    """Validate raw data (from YAML/JSON) into a definition, or raise JourneyInvalid."""
    if not isinstance(raw, dict):
        problem = JourneyProblem(
            path="(root)", message="a journey is a mapping with key, name, trigger and steps"
        )
        raise JourneyInvalid([problem], source)
    try:
        definition = JourneyDefinition.model_validate(raw)
    except ValidationError as error:
        raise JourneyInvalid(_problems_from(error, raw), source) from None
    problems = check_journey(definition)
    if problems:
        raise JourneyInvalid(problems, source)
    return definition


def load_journey_yaml(text: str, source: str | None = None) -> JourneyDefinition:
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(root)"
        problem = JourneyProblem(path=where, message=f"not valid YAML: {error}")
        raise JourneyInvalid([problem], source) from None
    return parse_journey(raw, source)


def _problems_from(error: ValidationError, raw: Any) -> list[JourneyProblem]:
    problems: list[JourneyProblem] = []
    for item in error.errors():
        path = _readable_path(item["loc"], raw)
        message = item["msg"]
        if item["type"] == "missing":
            message = f"'{item['loc'][-1]}' is required"
            if item["loc"][-1] == "timeout":
                message += ": a wait_for must say how long to wait, e.g. timeout: 4h"
        elif item["type"] == "extra_forbidden":
            message = f"unknown field '{item['loc'][-1]}'; check its spelling"
        elif item["type"] == "unknown_step_type":
            message = (
                f"unknown step type {item['input'].get('type')!r}"
                if isinstance(item["input"], dict) and "type" in item["input"]
                else "step has no 'type'"
            ) + f"; 'type' must be one of {', '.join(STEP_TYPES)}"
        elif item["type"] in ("send_field_missing", "send_field_invalid"):
            path += f".{item['ctx']['field']}"
        elif item["type"] == "literal_error":
            message = f"{item['msg']} (got {item['input']!r})"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        problems.append(JourneyProblem(path=path, message=message))
    return problems


def _readable_path(loc: tuple[Any, ...], raw: Any) -> str:
    """Turn pydantic's location into ``steps[2] (push_reminder).title``."""
    parts: list[str] = []
    node = raw
    step_types = set(STEP_TYPES)
    for segment in loc:
        if isinstance(segment, int):
            if parts:
                parts[-1] += f"[{segment}]"
            node = node[segment] if isinstance(node, list) and segment < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("id"), str) and "type" in node:
                parts[-1] += f" ({node['id']})"
            continue
        if segment in step_types and isinstance(node, dict) and node.get("type") == segment:
            continue  # the discriminator tag, not a field
        if segment in ("function-after[_one_form(), Condition]",):
            continue
        parts.append(str(segment))
        node = node.get(segment) if isinstance(node, dict) else None
    return ".".join(parts) or "(root)"


def check_journey(definition: JourneyDefinition) -> list[JourneyProblem]:
    """What the schema cannot see: ids, reachability, paths, templates."""
    problems: list[JourneyProblem] = []
    seen: dict[str, str] = {}
    for step, path in walk_steps(definition.steps):
        label = f"{path} ({step.id})"
        if step.id in seen:
            problems.append(
                JourneyProblem(
                    path=label,
                    message=f"step id '{step.id}' is already used at {seen[step.id]}; "
                    "step ids must be unique in a journey",
                )
            )
        else:
            seen[step.id] = path
        if isinstance(step, BranchStep):
            for i, branch in enumerate(step.branches):
                problems += _check_condition_roots(
                    branch.when, f"{label}.branches[{i}].when", allowed=("trigger", "profile")
                )
        if isinstance(step, WaitForStep):
            # The same event may appear in several outcomes told apart by 'where' (a low and
            # a high score); the first that matches wins, so an earlier outcome without
            # 'where' that asks no more of the trigger makes a later one unreachable.
            for later_index, later in enumerate(step.events):
                for index, earlier in enumerate(step.events[:later_index]):
                    if (
                        earlier.event == later.event
                        and earlier.where is None
                        and set(earlier.match_trigger) <= set(later.match_trigger)
                    ):
                        problems.append(
                            JourneyProblem(
                                path=f"{label}.events[{later_index}]",
                                message=f"unreachable: events[{index}] already takes every "
                                f"'{later.event}' event; give events[{index}] a 'where' "
                                "or move it last",
                            )
                        )
                        break
    for lst_path, steps in _all_lists(definition.steps, "steps"):
        for index, step in enumerate(steps[:-1]):
            if isinstance(step, ExitStep):
                after = steps[index + 1]
                problems.append(
                    JourneyProblem(
                        path=f"{lst_path}[{index + 1}] ({after.id})",
                        message=f"unreachable: it follows exit step '{step.id}'; "
                        "remove it or move the exit after it",
                    )
                )
    if definition.trigger.where:
        problems += _check_condition_roots(
            definition.trigger.where, "trigger.where", allowed=("event",)
        )
    for i, rule in enumerate(definition.exit):
        if rule.event == definition.trigger.event and not rule.match_trigger and not rule.where:
            problems.append(
                JourneyProblem(
                    path=f"exit[{i}].event",
                    message=f"'{rule.event}' is the trigger event: every instance would exit "
                    "at once; pick another event or add match_trigger/where",
                )
            )
    problems += check_templates(definition)
    return problems


def _all_lists(steps: list[AnyStep], path: str) -> Iterator[tuple[str, list[AnyStep]]]:
    yield path, steps
    for index, step in enumerate(steps):
        for label, children in child_lists(step):
            yield from _all_lists(children, f"{path}[{index}] ({step.id}).{label}")


def _check_condition_roots(
    condition: Condition, path: str, allowed: tuple[str, ...]
) -> list[JourneyProblem]:
    return [
        JourneyProblem(
            path=path,
            message=f"path '{p}' cannot be read here; use one of "
            + ", ".join(f"{root}." for root in allowed),
        )
        for p in condition.paths()
        if p.split(".", 1)[0] not in allowed
    ]
