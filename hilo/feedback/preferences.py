"""The preference page behind our signed links: render it, read its form, say it's done.

The elegant exit: before someone leaves, offer less often, a 30-day pause, or fewer topics,
and make leaving one click all the same. Pure functions: the API verifies the link, loads
and stores the customer's preferences; nothing here touches a database or the network.

Form fields the page posts (one value each, so a plain ``Mapping[str, str]`` holds them):
``frequency`` (normal | weekly | monthly), ``pause`` (no | 30d | keep), ``topic:<key>``
("yes" when checked) and ``opt_out`` ("yes" from the unsubscribe button).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, get_args

from liquid import CachingFileSystemLoader, Environment
from pydantic import BaseModel, ConfigDict, Field

from hilo.clock import utcnow
from hilo.errors import InvalidInput
from hilo.feedback.links import LinkClaims

__all__ = [
    "PAUSE_DAYS",
    "Frequency",
    "PreferenceChange",
    "PreferenceFormError",
    "PreferenceState",
    "Topic",
    "parse_preference_form",
    "render_confirmation",
    "render_invalid_link",
    "render_preference_page",
]

Frequency = Literal["normal", "weekly", "monthly"]
FREQUENCIES: tuple[Frequency, ...] = get_args(Frequency)
PauseChoice = Literal["no", "30d", "keep"]
PAUSE_CHOICES: tuple[PauseChoice, ...] = get_args(PauseChoice)
PAUSE_DAYS = 30
_FREQUENCY_BY_TEXT: dict[str, Frequency] = {value: value for value in FREQUENCIES}
TOPIC_FIELD = "topic:"


class Topic(BaseModel):
    """Something we write about that a customer can choose to hear about or not."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", examples=["new-arrivals"])
    name: str = Field(min_length=1, max_length=100, examples=["New arrivals"])
    description: str = Field("", max_length=300)


class PreferenceState(BaseModel):
    """A customer's marketing preferences as stored."""

    frequency: Frequency = "normal"
    pause_until: datetime | None = None
    topics: list[str] = Field(default_factory=list, description="Keys of the chosen topics.")
    opt_out: bool = False


class PreferenceChange(BaseModel):
    """What the customer chose on the page: the whole new state, not a diff."""

    frequency: Frequency
    pause_until: datetime | None
    topics: list[str]
    opt_out: bool


class PreferenceFormError(InvalidInput):
    """The form could not be read; ``errors`` maps each field name to what was wrong."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        super().__init__("; ".join(f"{field}: {message}" for field, message in self.errors.items()))


# --- reading the form --------------------------------------------------------------------------


def parse_preference_form(
    form: Mapping[str, str],
    now: datetime,
    *,
    current: PreferenceState | None = None,
    known_topics: Collection[str] | None = None,
) -> PreferenceChange:
    """The customer's choices, or PreferenceFormError naming every field that was wrong.

    ``current`` is needed for ``pause=keep``; ``known_topics`` refuses topics we don't send.
    """
    now = now if now.tzinfo else now.replace(tzinfo=UTC)
    errors: dict[str, str] = {}

    frequency_text = (form.get("frequency") or "").strip()
    frequency: Frequency = _FREQUENCY_BY_TEXT.get(frequency_text, "normal")
    if not frequency_text:
        errors["frequency"] = "choose how often to hear from us: normal, weekly or monthly"
    elif frequency_text not in _FREQUENCY_BY_TEXT:
        errors["frequency"] = f"{frequency_text!r} is not one of normal, weekly or monthly"

    pause_text = (form.get("pause") or "no").strip()
    pause_until: datetime | None = None
    if pause_text == "30d":
        pause_until = now + timedelta(days=PAUSE_DAYS)
    elif pause_text == "keep":
        kept = current.pause_until if current else None
        pause_until = kept if kept is not None and kept > now else None
    elif pause_text != "no":
        errors["pause"] = f"{pause_text!r} is not one of no, 30d or keep"

    topics: list[str] = []
    for field, value in form.items():
        if not field.startswith(TOPIC_FIELD):
            continue
        key = field[len(TOPIC_FIELD) :]
        if known_topics is not None and key not in known_topics:
            errors[field] = f"{key!r} is not a topic we send"
        elif value != "yes":
            errors[field] = f"expected 'yes' when the box is ticked, got {value!r}"
        else:
            topics.append(key)

    opt_out_text = (form.get("opt_out") or "").strip()
    if opt_out_text == "yes":
        # Leaving always works: a stray value elsewhere on the page must never block it.
        return PreferenceChange(
            frequency=frequency, pause_until=None, topics=sorted(topics), opt_out=True
        )
    if opt_out_text not in ("", "no"):
        errors["opt_out"] = f"expected 'yes' from the unsubscribe button, got {opt_out_text!r}"
    if errors:
        raise PreferenceFormError(errors)
    return PreferenceChange(
        frequency=frequency, pause_until=pause_until, topics=sorted(topics), opt_out=False
    )


# --- rendering -------------------------------------------------------------------------------

_CHANNEL_NOUN = {"email": "email", "sms": "text messages", "whatsapp": "WhatsApp messages"}
_CHANNEL_PLURAL = {"email": "emails", "sms": "texts", "whatsapp": "WhatsApp messages"}
_FREQUENCY_LABEL: dict[Frequency, str] = {
    "normal": "Whenever we have something for you",
    "weekly": "At most once a week",
    "monthly": "At most once a month",
}
_FREQUENCY_SENTENCE: dict[Frequency, str] = {
    "normal": "You'll hear from us whenever we have something for you.",
    "weekly": "You'll hear from us at most once a week.",
    "monthly": "You'll hear from us at most once a month.",
}


# The pages are Liquid templates in ``pages/`` (autoescaped), rendered with plain values here.
_pages = Environment(
    loader=CachingFileSystemLoader(Path(__file__).parent / "pages"), autoescape=True
)


def _page(title: str, content: str, **values: Any) -> str:
    return _pages.get_template("page.liquid").render(
        title=title, content=f"{content}.liquid", **values
    )


def render_invalid_link() -> str:
    """The page for a link we will not act on: it says why in words a customer can use."""
    return _page("This link doesn't work", "invalid_link")


def _date(value: datetime) -> str:
    return f"{value.day} {value:%B %Y}"


def _choice(
    name: str, value: str, label: str, checked: bool, *, kind: str = "radio", hint: str = ""
) -> dict[str, Any]:
    element_id = f"{name}-{value}" if kind == "radio" else name.replace(":", "-")
    return {
        "id": element_id,
        "kind": kind,
        "name": name,
        "value": value,
        "label": label,
        "checked": checked,
        "hint": hint,
    }


def _fieldset(
    name: str, legend: str, choices: list[dict[str, Any]], errors: Mapping[str, str]
) -> dict[str, Any]:
    return {"name": name, "legend": legend, "choices": choices, "error": errors.get(name)}


def render_preference_page(
    claims: LinkClaims | None,
    current: PreferenceState,
    topics: list[Topic],
    action_url: str,
    *,
    errors: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> str:
    """A self-contained HTML5 page (no scripts, no external assets) posting to ``action_url``.

    ``errors`` (from PreferenceFormError.errors) shows the page again with what was wrong.
    """
    errors = errors or {}
    now = now or utcnow()
    channel = (claims.channel if claims else None) or "email"
    paused = current.pause_until is not None and current.pause_until > now
    frequency = [
        _choice("frequency", value, _FREQUENCY_LABEL[value], current.frequency == value)
        for value in FREQUENCIES
    ]
    pause = [_choice("pause", "no", "Keep them coming", not paused)]
    if paused and current.pause_until is not None:
        pause.append(
            _choice("pause", "keep", f"Stay paused until {_date(current.pause_until)}", True)
        )
    pause.append(
        _choice(
            "pause",
            "30d",
            f"Pause for {PAUSE_DAYS} days",
            False,
            hint=f"We'll pick up again on {_date(now + timedelta(days=PAUSE_DAYS))}.",
        )
    )
    fieldsets = [
        _fieldset("frequency", "Receive less often", frequency, errors),
        _fieldset("pause", "Take a break", pause, errors),
    ]
    if topics:
        chosen = set(current.topics)
        topic_choices = [
            _choice(
                f"{TOPIC_FIELD}{topic.key}",
                "yes",
                topic.name,
                topic.key in chosen,
                kind="checkbox",
                hint=topic.description,
            )
            for topic in topics
        ]
        topic_messages = [
            f"{field[len(TOPIC_FIELD) :]}: {message}"
            for field, message in errors.items()
            if field.startswith(TOPIC_FIELD)
        ]
        topic_errors = {"topics": "; ".join(topic_messages)} if topic_messages else {}
        fieldsets.append(
            _fieldset("topics", "Only the topics you like", topic_choices, topic_errors)
        )
    return _page(
        "Your preferences",
        "preferences",
        unsubscribing=claims is not None and claims.kind == "unsubscribe",
        plural=_CHANNEL_PLURAL.get(channel, "messages"),
        noun=_CHANNEL_NOUN.get(channel, "messages"),
        opted_out=current.opt_out,
        errors=[
            {"anchor": field.replace(":", "-"), "field": field, "message": message}
            for field, message in errors.items()
        ],
        action_url=action_url,
        fieldsets=fieldsets,
    )


def render_confirmation(
    change: PreferenceChange,
    topics: list[Topic],
    *,
    preferences_url: str | None = None,
    channel: str | None = None,
) -> str:
    """What we'll do now, in a sentence or three, with a way back."""
    noun = _CHANNEL_NOUN.get(channel or "email", "messages")
    if change.opt_out:
        return _page(
            "You're unsubscribed",
            "confirmation",
            opted_out=True,
            noun=noun,
            preferences_url=preferences_url,
        )
    lines = [_FREQUENCY_SENTENCE[change.frequency]]
    if change.pause_until is not None:
        lines.insert(0, f"We're taking a break until {_date(change.pause_until)}.")
    if topics:
        names = {topic.key: topic.name for topic in topics}
        chosen = [names[key] for key in change.topics if key in names]
        lines.append(
            f"Topics: {', '.join(chosen)}."
            if chosen
            else f"No topics ticked, so no marketing {noun} until you pick one."
        )
    return _page(
        "Preferences saved",
        "confirmation",
        opted_out=False,
        noun=noun,
        lines=lines,
        preferences_url=preferences_url,
    )
