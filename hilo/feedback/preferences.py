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
from html import escape
from typing import Literal, get_args

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

_STYLE = """
:root{color-scheme:light dark;--ink:#1d1d1f;--muted:#555;--paper:#fff;--line:#ccc;
--accent:#0b57d0;--error:#b3261e}
@media (prefers-color-scheme:dark){:root{--ink:#f2f2f2;--muted:#c4c4c4;--paper:#161616;
--line:#555;--accent:#8ab4f8;--error:#f2b8b5}}
*{box-sizing:border-box}
body{margin:0;background:var(--paper);color:var(--ink);
font:1rem/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:34rem;margin:0 auto;padding:2rem 1.25rem}
h1{font-size:1.5rem;line-height:1.25;margin:0 0 .5rem}
p{margin:.5rem 0}
.muted{color:var(--muted)}
fieldset{border:1px solid var(--line);border-radius:.5rem;margin:1.25rem 0;padding:.75rem 1rem}
legend{font-weight:600;padding:0 .25rem}
label{display:flex;gap:.6rem;align-items:flex-start;padding:.35rem 0;cursor:pointer}
input{width:1.15rem;height:1.15rem;margin:.2rem 0 0;accent-color:var(--accent);flex:none}
.hint{display:block;color:var(--muted);font-size:.9rem}
button{font:inherit;border-radius:.5rem;padding:.7rem 1.1rem;cursor:pointer;width:100%}
.primary{background:var(--accent);color:var(--paper);border:2px solid var(--accent);
font-weight:600}
.quiet{background:transparent;color:var(--ink);border:1px solid var(--line);margin-top:.5rem}
:focus-visible{outline:3px solid var(--accent);outline-offset:2px}
.errors{border:2px solid var(--error);border-radius:.5rem;padding:.5rem 1rem;margin:1rem 0}
.error{color:var(--error);font-weight:600;display:block}
a{color:var(--accent)}
hr{border:0;border-top:1px solid var(--line);margin:2rem 0 1rem}
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # The signed token is in this page's URL: keep it out of Referer headers and indexes.
        '<meta name="referrer" content="no-referrer">\n'
        '<meta name="robots" content="noindex, nofollow">\n'
        f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n<main>\n{body}</main>\n</body>\n</html>\n"
    )


def _date(value: datetime) -> str:
    return f"{value.day} {value:%B %Y}"


def _choice(
    name: str, value: str, label: str, checked: bool, *, kind: str = "radio", hint: str = ""
) -> str:
    element_id = f"{name}-{value}" if kind == "radio" else name.replace(":", "-")
    hint_html = f'<span class="hint">{escape(hint)}</span>' if hint else ""
    return (
        f'<label for="{escape(element_id)}"><input type="{kind}" id="{escape(element_id)}" '
        f'name="{escape(name)}" value="{escape(value)}"{" checked" if checked else ""}>'
        f"<span>{escape(label)}{hint_html}</span></label>\n"
    )


def _fieldset(name: str, legend: str, inner: str, errors: Mapping[str, str]) -> str:
    field_id = escape(name)
    error = errors.get(name)
    if not error:
        return (
            f'<fieldset id="{field_id}">\n<legend>{escape(legend)}</legend>\n{inner}</fieldset>\n'
        )
    return (
        f'<fieldset id="{field_id}" aria-invalid="true" aria-describedby="{field_id}-error">\n'
        f"<legend>{escape(legend)}</legend>\n"
        f'<span class="error" id="{field_id}-error">{escape(error)}</span>\n'
        f"{inner}</fieldset>\n"
    )


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
    noun = _CHANNEL_NOUN.get(channel, "messages")
    paused = current.pause_until is not None and current.pause_until > now
    parts: list[str] = ["<h1>Choose what you hear from us</h1>\n"]
    if claims is not None and claims.kind == "unsubscribe":
        parts.append(
            f"<p>Too many {escape(_CHANNEL_PLURAL.get(channel, 'messages'))}? "
            "Before you go, a few gentler options. "
            "Or leave with one click at the bottom.</p>\n"
        )
    else:
        parts.append("<p>Change as much or as little as you like.</p>\n")
    if current.opt_out:
        parts.append(
            f'<p class="muted">You\'re unsubscribed from marketing {escape(noun)} right now. '
            "Saving your choices below subscribes you again.</p>\n"
        )
    if errors:
        items = "".join(
            f'<li><a href="#{escape(field.replace(":", "-"))}">{escape(field)}</a>: '
            f"{escape(message)}</li>\n"
            for field, message in errors.items()
        )
        parts.append(
            '<div class="errors" role="alert">\n<p><strong>Please check these:</strong></p>\n'
            f"<ul>\n{items}</ul>\n</div>\n"
        )
    parts.append(f'<form method="post" action="{escape(action_url, quote=True)}">\n')

    frequency_inner = "".join(
        _choice("frequency", value, _FREQUENCY_LABEL[value], current.frequency == value)
        for value in FREQUENCIES
    )
    parts.append(_fieldset("frequency", "Receive less often", frequency_inner, errors))

    pause_inner = _choice("pause", "no", "Keep them coming", not paused)
    if paused and current.pause_until is not None:
        pause_inner += _choice(
            "pause", "keep", f"Stay paused until {_date(current.pause_until)}", True
        )
    pause_inner += _choice(
        "pause",
        "30d",
        f"Pause for {PAUSE_DAYS} days",
        False,
        hint=f"We'll pick up again on {_date(now + timedelta(days=PAUSE_DAYS))}.",
    )
    parts.append(_fieldset("pause", "Take a break", pause_inner, errors))

    if topics:
        chosen = set(current.topics)
        topic_inner = "".join(
            _choice(
                f"{TOPIC_FIELD}{topic.key}",
                "yes",
                topic.name,
                topic.key in chosen,
                kind="checkbox",
                hint=topic.description,
            )
            for topic in topics
        )
        topic_messages = [
            f"{field[len(TOPIC_FIELD) :]}: {message}"
            for field, message in errors.items()
            if field.startswith(TOPIC_FIELD)
        ]
        topic_errors = {"topics": "; ".join(topic_messages)} if topic_messages else {}
        parts.append(_fieldset("topics", "Only the topics you like", topic_inner, topic_errors))

    parts.append('<button type="submit" class="primary">Save my choices</button>\n')
    parts.append(
        "<hr>\n"
        f'<p class="muted">Rather leave? No hard feelings. Receipts and account messages '
        "still arrive.</p>\n"
        '<button type="submit" class="quiet" name="opt_out" value="yes">'
        f"Unsubscribe from all marketing {escape(noun)}</button>\n"
        "</form>\n"
    )
    return _page("Your preferences", "".join(parts))


def render_confirmation(
    change: PreferenceChange,
    topics: list[Topic],
    *,
    preferences_url: str | None = None,
    channel: str | None = None,
) -> str:
    """What we'll do now, in a sentence or three, with a way back."""
    noun = _CHANNEL_NOUN.get(channel or "email", "messages")
    back = (
        f'<p><a href="{escape(preferences_url, quote=True)}">Changed your mind? '
        "Update your choices</a></p>\n"
        if preferences_url
        else ""
    )
    if change.opt_out:
        body = (
            "<h1>You're unsubscribed</h1>\n"
            f"<p>You won't get marketing {escape(noun)} from us any more. "
            "Receipts and account messages still arrive.</p>\n"
            "<p>Thanks for having been with us.</p>\n"
        )
        return _page("You're unsubscribed", body + back)
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
    items = "".join(f"<li>{escape(line)}</li>\n" for line in lines)
    body = f"<h1>Saved. Thanks for telling us</h1>\n<ul>\n{items}</ul>\n"
    return _page("Preferences saved", body + back)
