"""Liquid templates: rendered for a customer at send time, checked at publish.

Every template is rendered at publish with the journey's sample (strictly: an unknown
variable is an error) in the context a send has: ``profile``, ``customer`` (the traits),
``trigger``, ``journey``, ``message``, ``promotions`` and the customer's signed links:
``unsubscribe_url``, ``preferences_url`` (the preference page) and ``pause_url`` (the same
page at its pause choices), so a journey need not carry links in its events. The rendered
sample must then fit its channel: an SMS in :data:`SMS_MAX_SEGMENTS` segments, a push title
and body in what a lock screen shows, a WhatsApp template's parameters in its placeholders.

WhatsApp. A step whose ``body`` is a mapping with ``language``, ``text`` and ``params`` is an
approved template message (WhatsApp only delivers those outside the 24-hour window after the
customer wrote): ``template`` is its name in WhatsApp Manager, ``text`` its approved text with
numbered placeholders, and each of ``params`` the Liquid that fills one placeholder::

    channel: whatsapp
    template: cart_reminder
    body: |
      language: es_AR
      text: "Hola {{1}}, tu {{2}} te espera."
      params: ["{{ profile.traits.first_name }}", "{{ trigger.properties.product_name }}"]

Any other body is a text message, for replies inside the window.

HTML. An email body whose template has markup is HTML, and every value it outputs is
escaped: a customer's name holding ``<a href=...>`` reads as that text, and never becomes a
link (click tracking signs only the template's own links, see
:func:`hilo.feedback.links.rewrite_links`). A trusted fragment is marked with ``| safe``.
Everything else (subjects, plain-text bodies, SMS, WhatsApp, push) is text and is not escaped.
"""

from __future__ import annotations

import functools
import html
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml
from liquid import BoundTemplate, Environment, RenderContext, StrictUndefined
from liquid.exceptions import (
    BlockNestingError,
    ContextDepthError,
    LiquidError,
    LocalNamespaceLimitError,
    LoopIterationLimitError,
    OutputStreamLimitError,
    ResourceLimitError,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from hilo.journeys.definitions import AnyStep, JourneyDefinition, JourneyProblem, SendStep

# A message needs far less than these; they stop a template (or a customer's data) from
# holding a worker or the API: a 5,000,000-step loop took 3.6 s to validate without them.
MAX_LOOP_ITERATIONS = 10_000  # all loops of one render together
MAX_OUTPUT_BYTES = 1_000_000
MAX_ASSIGNED_BYTES = 1_000_000  # what assign and capture hold


class _CountingContext(RenderContext):
    """Counts the iterations of every loop in one render: python-liquid's own limit bounds
    nested loops only, and a thousand loops side by side are as slow as nested ones."""

    __slots__ = ("iterations",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.iterations = 0

    def raise_for_loop_limit(self, length: int = 1) -> None:
        super().raise_for_loop_limit(length)
        self.iterations += length
        if self.iterations > MAX_LOOP_ITERATIONS:
            raise LoopIterationLimitError("loop iteration limit reached", token=None)


class _BoundedTemplate(BoundTemplate):
    context_class = _CountingContext


class _BoundedEnvironment(Environment):
    template_class = _BoundedTemplate
    loop_iteration_limit = MAX_LOOP_ITERATIONS
    output_stream_limit = MAX_OUTPUT_BYTES
    local_namespace_limit = MAX_ASSIGNED_BYTES


_lenient = _BoundedEnvironment()
_strict = _BoundedEnvironment(undefined=StrictUndefined)
# An email's HTML body escapes what the context puts in it: a customer's name is text, never
# markup or a link. Authors mark trusted fragments with the `safe` filter.
_lenient_html = _BoundedEnvironment(autoescape=True)
_strict_html = _BoundedEnvironment(autoescape=True, undefined=StrictUndefined)

# GSM 03.38 basic set; anything else makes an SMS UCS-2 (70/67 characters a segment).
_GSM7 = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "ÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà^{}\\[~]|€"
)
_GSM7_EXTENSION = set("^{}\\[~]|€")
SMS_MAX_SEGMENTS = 4
PUSH_TITLE_MAX = 65
PUSH_BODY_MAX = 240
# What ``{{ unsubscribe_url }}`` renders to at publish; a send gets the customer's own link.
SAMPLE_UNSUBSCRIBE_URL = "https://example.com/l/u/sample-unsubscribe-token"
# The other signed links a send has (LinkSigner.message_links), as publish renders them.
SAMPLE_LINKS = {
    "unsubscribe_url": SAMPLE_UNSUBSCRIBE_URL,
    "preferences_url": "https://example.com/l/p/sample-preferences-token",
    "pause_url": "https://example.com/l/p/sample-preferences-token#pause",
}


@functools.lru_cache(maxsize=2048)
def parsed(source: str, *, html: bool = False) -> BoundTemplate:
    # A journey's few templates are rendered for every customer: parse each once.
    return (_lenient_html if html else _lenient).from_string(source)


def render(source: str, context: dict[str, Any], *, html: bool = False) -> str:
    """``source`` rendered with ``context``; ``html`` escapes every value it outputs."""
    return parsed(source, html=html).render(**context)


_TAG = re.compile(r"<[a-zA-Z!/][^>]*>")


def is_html(channel: str, field: str, source: str) -> bool:
    """Whether a step's field is HTML: an email body whose template itself has markup.

    The template decides, never the rendered text: a plain-text body stays text even when
    a customer's name holds a tag. Everything else (subjects, SMS, WhatsApp, push) is text.
    """
    return channel == "email" and field == "body" and _TAG.search(source) is not None


def limit_reached(error: ResourceLimitError) -> str:
    """What a template did past its limits, and what would be right, in a person's words."""
    if isinstance(error, LoopIterationLimitError):
        return (
            f"its loops would run more than {MAX_LOOP_ITERATIONS:,} times in all; loop over "
            "fewer items, e.g. {% for item in items limit: 50 %}"
        )
    if isinstance(error, OutputStreamLimitError):
        return f"it renders more than {MAX_OUTPUT_BYTES:,} bytes; a message needs far less"
    if isinstance(error, LocalNamespaceLimitError):
        return (
            f"its assign and capture variables hold more than {MAX_ASSIGNED_BYTES:,} bytes; "
            "keep what a template builds small"
        )
    if isinstance(error, ContextDepthError | BlockNestingError):
        return f"its tags nest too deeply ({str(error).splitlines()[0]}); flatten them"
    return str(error).splitlines()[0]


def sms_segments(text: str) -> int:
    if all(char in _GSM7 for char in text):
        # An extension character (€, [, ~ ...) is sent as an escape and a character.
        units = len(text) + sum(char in _GSM7_EXTENSION for char in text)
        single, multi = 160, 153
    else:
        # UCS-2 counts UTF-16 code units: an emoji takes two.
        units = len(text.encode("utf-16-le")) // 2
        single, multi = 70, 67
    if units <= single:
        return 1
    return -(-units // multi)


# ---------------------------------------------------------------- WhatsApp templates

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_TEMPLATE_FIELDS = frozenset({"language", "text", "params"})


class WhatsAppTemplate(BaseModel):
    """An approved WhatsApp template message, as a step's ``body`` writes it."""

    model_config = ConfigDict(extra="forbid")

    language: str = Field(
        pattern=r"^[a-z]{2,3}(_[A-Z]{2})?$",
        description="The language the template was approved in, e.g. es_AR or en_US.",
    )
    text: str = Field(min_length=1, description="The approved text, with {{1}}, {{2}} ...")
    params: list[str] = Field(
        default_factory=list, description="Liquid for each placeholder, in order."
    )

    def placeholders(self) -> list[str]:
        return [match.group(1) for match in _PLACEHOLDER.finditer(self.text)]

    def preview(self, params: list[str]) -> str:
        """The text the customer reads, with ``params`` in the placeholders."""

        def fill(match: re.Match[str]) -> str:
            number = match.group(1)
            if number.isdigit() and 1 <= int(number) <= len(params):
                return params[int(number) - 1]
            return match.group(0)

        return _PLACEHOLDER.sub(fill, self.text)


@functools.lru_cache(maxsize=512)
def whatsapp_template(body: str) -> WhatsAppTemplate | None:
    """The template a WhatsApp ``body`` describes, or None when it is a text message.

    Raises pydantic's ValidationError when the body is meant as a template (it names
    ``language``, ``text`` or ``params``) but is not a valid one.
    """
    try:
        raw = yaml.safe_load(body)
    except yaml.YAMLError:
        return None  # Liquid such as "{{ name }}, hola" is not YAML: a text message
    if not isinstance(raw, dict) or not _TEMPLATE_FIELDS & {str(key) for key in raw}:
        return None
    return WhatsAppTemplate.model_validate(raw)


def render_content(
    channel: str, template: str, content: Mapping[str, str], context: dict[str, Any]
) -> dict[str, str]:
    """A step's Liquid ``content`` rendered for one customer, in the shape providers read.

    A WhatsApp template becomes ``template_name``, ``language``, ``params`` (a JSON list)
    and ``body`` (the text as the customer reads it, for the ledger); any other content is
    rendered field by field.
    """
    if channel == "whatsapp" and "body" in content:
        approved = whatsapp_template(content["body"])
        if approved is not None:
            params = [render(param, context) for param in approved.params]
            return {
                "template_name": template,
                "language": approved.language,
                "params": json.dumps(params, ensure_ascii=False),
                "body": approved.preview(params),
            }
    return {
        field: render(source, context, html=is_html(channel, field, source))
        for field, source in content.items()
    }


# ---------------------------------------------------------------- the sample


class _SamplePromotions(dict[str, dict[str, Any]]):
    """Any promotion a template names, so templates render before promotions are checked
    against the store (at publish, by the catalog)."""

    def __missing__(self, key: str) -> dict[str, Any]:
        return {
            "key": key,
            "code": key.upper(),
            "description": f"{key} offer",
            "discount": "10%",
            "valid_from": "2026-01-01T00:00:00+00:00",
            "valid_until": "2026-12-31T23:59:00+00:00",
            "active": True,
        }


def sample_context(definition: JourneyDefinition) -> dict[str, Any]:
    """The context a send has, filled from the journey's sample."""
    sample = definition.sample
    profile = (sample.profile if sample else {}) or {"traits": {}}
    return {
        "profile": profile,
        "customer": profile.get("traits", {}),
        "trigger": (sample.trigger if sample else {}) or {"properties": {}},
        "journey": {"key": definition.key, "name": definition.name, "version": 1},
        "message": {"id": "sample-message"},
        **SAMPLE_LINKS,
        "promotions": _SamplePromotions(),
    }


@dataclass
class SampleMessage:
    """A send step rendered with the sample: what its customer would read."""

    step: SendStep
    label: str  # steps[2] (push_reminder)
    sources: dict[str, str]
    rendered: dict[str, str]  # a field that does not render keeps its source


def sample_messages(definition: JourneyDefinition) -> Iterator[SampleMessage]:
    """Every send step with readable content, rendered leniently with the sample."""
    from hilo.journeys.definitions import SendStep, walk_steps

    context = sample_context(definition)
    for step, path in walk_steps(definition.steps):
        if not isinstance(step, SendStep) or step.channel in ("webhook", "audience"):
            continue
        sources = step.content()
        rendered: dict[str, str] = {}
        for field, source in sources.items():
            try:
                if step.channel == "whatsapp" and field == "body":
                    rendered[field] = render_content(
                        "whatsapp", step.template, {"body": source}, context
                    )["body"]
                else:
                    rendered[field] = render(
                        source, context, html=is_html(step.channel, field, source)
                    )
            except (LiquidError, ValidationError):
                rendered[field] = source
        yield SampleMessage(step, f"{path} ({step.id})", sources, rendered)


# ---------------------------------------------------------------- publish checks


def template_sources(
    definition: JourneyDefinition,
) -> Iterator[tuple[AnyStep, str, dict[str, str]]]:
    """Each step that holds templates (sends, hand-off notes): the step, its path, and its
    templates by field."""
    from hilo.journeys.definitions import HandoffStep, SendStep, walk_steps

    for step, path in walk_steps(definition.steps):
        if isinstance(step, SendStep):
            yield step, path, step.content()
        elif isinstance(step, HandoffStep):
            yield step, path, {"note": step.note}


def check_templates(definition: JourneyDefinition) -> list[JourneyProblem]:
    from hilo.journeys.definitions import JourneyProblem, SendStep

    problems: list[JourneyProblem] = []
    context = sample_context(definition)
    strict = bool(definition.sample)

    def rendered_or_problem(source: str, where: str, html: bool = False) -> str | None:
        try:
            if strict:
                return (_strict_html if html else _strict).from_string(source).render(**context)
            return render(source, context, html=html)
        except ResourceLimitError as error:
            problems.append(
                JourneyProblem(path=where, message=f"template is too heavy: {limit_reached(error)}")
            )
            return None
        except LiquidError as error:
            hint = (
                "; add it to the journey's sample or fix the variable name"
                if "undefined" in str(error).lower()
                else ""
            )
            problems.append(
                JourneyProblem(
                    path=where,
                    message=f"template does not render: {str(error).splitlines()[0]}{hint}",
                )
            )
            return None

    for step, path, sources in template_sources(definition):
        label = f"{path} ({step.id})"
        rendered: dict[str, str] = {}
        for field, source in sources.items():
            if isinstance(step, SendStep) and step.channel == "whatsapp" and field == "body":
                text = _check_whatsapp(step, f"{label}.body", rendered_or_problem, problems)
            else:
                markup = isinstance(step, SendStep) and is_html(step.channel, field, source)
                text = rendered_or_problem(source, f"{label}.{field}", markup)
            if text is not None:
                rendered[field] = text
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
        if isinstance(step, SendStep) and step.channel in ("push", "webpush"):
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


def _check_whatsapp(
    step: SendStep,
    where: str,
    rendered_or_problem: Callable[[str, str], str | None],
    problems: list[JourneyProblem],
) -> str | None:
    """A WhatsApp body: a text message renders as any template; an approved template has
    numbered placeholders 1..n, one param each, each param rendering to one line."""
    from hilo.journeys.definitions import JourneyProblem

    body = step.body or ""
    try:
        approved = whatsapp_template(body)
    except ValidationError as error:
        for item in error.errors():
            field = ".".join(str(part) for part in item["loc"])
            if item["type"] == "extra_forbidden":
                message = "unknown field; a WhatsApp template has language, text and params"
            elif item["type"] == "missing":
                message = {
                    "language": "'language' is required: the language the template was "
                    "approved in, e.g. es_AR",
                    "text": "'text' is required: the approved text, with {{1}}, {{2}} ...",
                }.get(field, f"'{field}' is required")
            elif item["type"] == "string_pattern_mismatch":
                message = f"{item['input']!r} is not a WhatsApp language code; write e.g. "
                message += "es, es_AR or en_US"
            else:
                message = item["msg"]
            problems.append(JourneyProblem(path=f"{where}.{field}", message=message))
        return None
    if approved is None:
        return rendered_or_problem(body, where)
    if not re.fullmatch(r"[a-z0-9_]{1,512}", step.template):
        problems.append(
            JourneyProblem(
                path=where.removesuffix(".body") + ".template",
                message=f"'{step.template}' cannot be a WhatsApp template name: it is the name "
                "approved in WhatsApp Manager, lowercase letters, digits and underscores",
            )
        )
    placeholders = approved.placeholders()
    named = sorted({name for name in placeholders if not name.isdigit()})
    numbers = sorted({int(name) for name in placeholders if name.isdigit()})
    if named:
        problems.append(
            JourneyProblem(
                path=f"{where}.text",
                message="placeholders must be numbered {{1}}, {{2}} ...; got "
                + ", ".join(f"{{{{{name}}}}}" for name in named),
            )
        )
        return None
    if numbers != list(range(1, len(numbers) + 1)):
        problems.append(
            JourneyProblem(
                path=f"{where}.text",
                message="placeholders must be numbered from {{1}} without gaps; got "
                + ", ".join(f"{{{{{number}}}}}" for number in numbers),
            )
        )
        return None
    if len(approved.params) != len(numbers):
        problems.append(
            JourneyProblem(
                path=f"{where}.params",
                message=f"the template text has {len(numbers)} placeholder"
                f"{'' if len(numbers) == 1 else 's'} but params has {len(approved.params)}; "
                "give one param per placeholder, in order",
            )
        )
        return None
    params: list[str] = []
    for index, source in enumerate(approved.params):
        value = rendered_or_problem(source, f"{where}.params[{index}]")
        if value is None:
            continue
        # WhatsApp refuses empty params and params with new lines, tabs or 5+ spaces.
        if not value.strip() or re.search(r"[\n\t]| {5}", value):
            problems.append(
                JourneyProblem(
                    path=f"{where}.params[{index}]",
                    message=f"renders as {value!r} with the sample; WhatsApp needs a "
                    "non-empty param without new lines, tabs or more than 4 spaces in a row",
                )
            )
        params.append(value)
    if len(params) != len(approved.params):
        return None
    return approved.preview(params)


# What a customer's data and their event fill in; the rest of a send's context (links,
# journey, message, promotions) is Hilo's own and always there.
SAMPLED_ROOTS = ("trigger", "profile", "customer")


def sample_gaps(definition: JourneyDefinition) -> list[JourneyProblem]:
    """Warnings: template variables the journey's sample does not have.

    Rendering strictly finds a variable the sample lacks only where the sample's own path
    goes; this reads every variable of every template (inside an ``if`` not taken, a loop
    over an empty list, a ``default``), so a field that would render blank for a real event
    shaped otherwise (``product_name`` where Segment sends ``products[].name``) is named.
    """
    from hilo.journeys.definitions import JourneyProblem

    context = sample_context(definition)
    hint = (
        "add them to the journey's sample as your events and profiles carry them"
        if definition.sample
        else "the journey has no sample: add one shaped as your events and profiles"
    )
    warnings: list[JourneyProblem] = []
    for step, path, sources in template_sources(definition):
        for field, source in sources.items():
            missing = [
                name
                for name in _variables(source)
                if name.split(".", 1)[0] in SAMPLED_ROOTS and not _in_sample(context, name)
            ]
            if missing:
                warnings.append(
                    JourneyProblem(
                        path=f"{path} ({step.id}).{field}",
                        message=f"reads {', '.join(missing)}, which the sample does not have "
                        f"(it renders blank for an event or profile without it); {hint}",
                    )
                )
    return warnings


def _variables(source: str) -> list[str]:
    """The global variables a template reads, as dotted paths, in order, once each."""
    try:
        found = parsed(source).analyze().globals
    except LiquidError:
        return []  # does not parse: check_templates says why
    names: dict[str, None] = {}
    for variables in found.values():
        for variable in variables:
            parts = []
            for segment in variable.segments:
                if not isinstance(segment, str | int):
                    break  # a lookup by another variable (a[b]): known only when sent
                parts.append(str(segment))
            names[".".join(parts)] = None
    return list(names)


def _in_sample(context: Mapping[str, Any], name: str) -> bool:
    """Whether Liquid would find ``name`` in ``context`` (``first``, ``last``, ``size`` and
    indexes on lists as Liquid reads them)."""
    current: Any = context
    for segment in name.split("."):
        if isinstance(current, Mapping):
            if segment in current:
                current = current[segment]
                continue
            return segment == "size"
        if isinstance(current, list | tuple | str):
            if segment == "size":
                return True
            index = {"first": 0, "last": -1}.get(segment)
            if index is None and segment.lstrip("-").isdigit():
                index = int(segment)
            if index is None or not -len(current) <= index < len(current):
                return False
            current = current[index]
            continue
        return False
    return True


def check_unsubscribe_links(definition: JourneyDefinition) -> list[JourneyProblem]:
    """Every marketing email must show the customer's unsubscribe link in its body."""
    from hilo.journeys.definitions import JourneyProblem

    problems: list[JourneyProblem] = []
    for message in sample_messages(definition):
        step = message.step
        if step.channel != "email" or step.category != "marketing":
            continue
        body = message.rendered.get("body", "")
        if SAMPLE_UNSUBSCRIBE_URL in body:
            continue
        if body == message.sources.get("body") and _names_unsubscribe_url(body):
            continue  # does not render with the sample: check_templates says why
        problems.append(
            JourneyProblem(
                path=f"{message.label}.body",
                message="a marketing email must link to the customer's unsubscribe page: "
                'add {{ unsubscribe_url }} to the body, e.g. <a href="{{ unsubscribe_url }}">'
                "Unsubscribe</a> (or set category: transactional if it is one)",
            )
        )
    return problems


def _names_unsubscribe_url(source: str) -> bool:
    try:
        return "unsubscribe_url" in parsed(source).analyze().globals
    except LiquidError:
        return "unsubscribe_url" in source


def email_parts(rendered: dict[str, str], sources: Mapping[str, str]) -> dict[str, str]:
    """A journey's email ``body`` as the text and HTML parts providers send.

    A body whose template has markup (``sources``, see :func:`is_html`) is the HTML part,
    and its text part is the same words without the template's tags (mail clients that show
    text only, and spam filters, expect both): values the HTML escaped read as typed there.
    A plain body is text, whatever its values hold.
    """
    if "body" not in rendered or "text" in rendered or "html" in rendered:
        return rendered
    parts = {name: value for name, value in rendered.items() if name != "body"}
    body = rendered["body"]
    if is_html("email", "body", sources.get("body", "")):
        parts["html"] = body
        # Escaped values are no tags: they survive the strip and unescape to their text.
        parts["text"] = html.unescape(_TAG.sub("", body)).strip()
    else:
        parts["text"] = body
    return parts
