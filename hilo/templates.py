"""Liquid templates: rendered for a customer at send time, checked at publish."""

from __future__ import annotations

import functools
import html
import re
from typing import TYPE_CHECKING, Any

from liquid import BoundTemplate, Environment, StrictUndefined
from liquid.exceptions import LiquidError

if TYPE_CHECKING:
    from hilo.journeys import JourneyDefinition, JourneyProblem

_lenient = Environment()
_strict = Environment(undefined=StrictUndefined)

# GSM 03.38 basic set; anything else makes an SMS UCS-2 (70/67 characters a segment).
_GSM7 = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "ÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà^{}\\[~]|€"
)
SMS_MAX_SEGMENTS = 4
PUSH_TITLE_MAX = 65
PUSH_BODY_MAX = 240


@functools.lru_cache(maxsize=2048)
def _parsed(source: str) -> BoundTemplate:
    # A journey's few templates are rendered for every customer: parse each once.
    return _lenient.from_string(source)


def render(source: str, context: dict[str, Any]) -> str:
    return _parsed(source).render(**context)


def sms_segments(text: str) -> int:
    if all(char in _GSM7 for char in text):
        single, multi = 160, 153
    else:
        single, multi = 70, 67
    if len(text) <= single:
        return 1
    return -(-len(text) // multi)


def check_templates(definition: JourneyDefinition) -> list[JourneyProblem]:
    from hilo.journeys import HandoffStep, JourneyProblem, SendStep, walk_steps

    problems: list[JourneyProblem] = []
    sample = definition.sample
    context = {
        "profile": (sample.profile if sample else {}) or {"traits": {}},
        "trigger": (sample.trigger if sample else {}) or {"properties": {}},
        "journey": {"key": definition.key, "name": definition.name},
    }
    environment = _strict if sample else _lenient
    for step, path in walk_steps(definition.steps):
        label = f"{path} ({step.id})"
        if isinstance(step, SendStep):
            sources = step.content()
        elif isinstance(step, HandoffStep):
            sources = {"note": step.note}
        else:
            continue
        rendered: dict[str, str] = {}
        for field, source in sources.items():
            try:
                rendered[field] = environment.from_string(source).render(**context)
            except LiquidError as error:
                hint = (
                    "; add it to the journey's sample or fix the variable name"
                    if "undefined" in str(error).lower()
                    else ""
                )
                problems.append(
                    JourneyProblem(
                        path=f"{label}.{field}",
                        message=f"template does not render: {str(error).splitlines()[0]}{hint}",
                    )
                )
        if isinstance(step, SendStep) and step.channel == "sms" and "body" in rendered:
            segments = sms_segments(rendered["body"])
            if segments > SMS_MAX_SEGMENTS:
                problems.append(
                    JourneyProblem(
                        path=f"{label}.body",
                        message=f"SMS body is {len(rendered['body'])} characters, "
                        f"{segments} segments; keep it to {SMS_MAX_SEGMENTS} segments "
                        f"({SMS_MAX_SEGMENTS * 153} GSM-7 or {SMS_MAX_SEGMENTS * 67} "
                        "Unicode characters)",
                    )
                )
        if isinstance(step, SendStep) and step.channel == "push":
            for field, limit in (("title", PUSH_TITLE_MAX), ("body", PUSH_BODY_MAX)):
                if field in rendered and len(rendered[field]) > limit:
                    problems.append(
                        JourneyProblem(
                            path=f"{label}.{field}",
                            message=f"push {field} is {len(rendered[field])} characters; "
                            f"keep it to {limit} so it is not cut on the lock screen",
                        )
                    )
    return problems


_TAG = re.compile(r"<[a-zA-Z!/][^>]*>")


def email_parts(rendered: dict[str, str]) -> dict[str, str]:
    """A journey's email ``body`` as the text and HTML parts providers send.

    A body with markup is the HTML part, and its text part is the same words without tags
    (mail clients that show text only, and spam filters, expect both); a plain body is text.
    """
    if "body" not in rendered or "text" in rendered or "html" in rendered:
        return rendered
    parts = {name: value for name, value in rendered.items() if name != "body"}
    body = rendered["body"]
    if _TAG.search(body):
        parts["html"] = body
        parts["text"] = html.unescape(_TAG.sub("", body)).strip()
    else:
        parts["text"] = body
    return parts
