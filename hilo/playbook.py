"""The brand playbook: words a brand never uses and elements its messages always carry.

One YAML file (see ``examples/playbook.yaml``) checked against every send step at publish;
a journey that breaks it is refused, each problem naming the step path::

    brand: Hilo Shop
    language: es                    # the brand's language when a journey's sample has no locale
    forbidden_words:
      all: [guaranteed]             # in every language
      es: [gratis, urgente, "última oportunidad"]
      en: [free, "act now"]
    required_elements:
      sms:
        - any_of: [Hilo Shop, STOP]
          category: marketing
      email:
        - any_of: ["{{ unsubscribe_url }}", Hilo Shop]
    max_exclamation_marks: 1

Words are matched whole and without regard to case in what the brand wrote: the template's
text and the quoted text in its Liquid, not the customer's data (a product called "Free Run"
is not the brand's word). A journey's language is its sample profile's ``locale`` (``es-AR``
is ``es``), else the playbook's ``language``; a WhatsApp template's own language wins for its
step. Where no language is known every list applies. A required element written as Liquid
(``{{ unsubscribe_url }}``) must appear in the template; any other must appear in the text.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hilo.errors import InvalidInput
from hilo.journeys.templates import sample_messages, whatsapp_template

if TYPE_CHECKING:
    from hilo.journeys.definitions import JourneyDefinition, JourneyProblem
    from hilo.journeys.templates import SampleMessage

__all__ = ["Playbook", "PlaybookInvalid", "RequiredElement", "check_playbook", "load_playbook"]

ALL_LANGUAGES = "all"
MessageChannel = Literal["email", "sms", "whatsapp", "push"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequiredElement(_Strict):
    """Something every message of a channel must contain: one of ``any_of``."""

    any_of: list[str] = Field(min_length=1, examples=[["Hilo Shop", "STOP"]])
    category: Literal["marketing", "transactional"] | None = Field(
        None, description="Only messages of this category; both when not given."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # "STOP" or [Hilo Shop, STOP] stand for {any_of: [...]}.
        if isinstance(value, str):
            return {"any_of": [value]}
        if isinstance(value, list):
            return {"any_of": value}
        return value

    @field_validator("any_of")
    @classmethod
    def _not_blank(cls, value: list[str]) -> list[str]:
        if any(not element.strip() for element in value):
            raise ValueError("an element is empty; write the text or Liquid it must contain")
        return value


class Playbook(_Strict):
    brand: str | None = Field(None, max_length=200, description="Named in problems.")
    language: str | None = Field(
        None,
        pattern=r"^[a-z]{2,3}$",
        description="The brand's language, for journeys whose sample has no locale.",
    )
    forbidden_words: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Language code (or 'all') -> words and phrases never to use; "
        "a plain list applies to every language.",
    )
    required_elements: dict[MessageChannel, list[RequiredElement]] = Field(default_factory=dict)
    max_exclamation_marks: int | None = Field(
        None, ge=0, description="In any one subject, title or body."
    )

    @field_validator("forbidden_words", mode="before")
    @classmethod
    def _plain_list(cls, value: Any) -> Any:
        return {ALL_LANGUAGES: value} if isinstance(value, list) else value

    @field_validator("forbidden_words")
    @classmethod
    def _languages_and_words(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for language, words in value.items():
            if language != ALL_LANGUAGES and not re.fullmatch(r"[a-z]{2,3}", language):
                raise ValueError(
                    f"'{language}' is not a language; use a code such as es or en, or 'all'"
                )
            blank = [index for index, word in enumerate(words) if not word.strip()]
            if blank:
                raise ValueError(f"{language}[{blank[0]}] is empty; remove it or write the word")
        return value

    @classmethod
    def from_yaml(cls, text: str, source: str = "playbook") -> Playbook:
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise PlaybookInvalid(source, [f"(root): not valid YAML: {error}"]) from None
        if not isinstance(raw, dict):
            raise PlaybookInvalid(
                source, ["(root): a playbook is a mapping (forbidden_words, required_elements ...)"]
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            raise PlaybookInvalid(source, _problems(error)) from None

    def words_for(self, language: str | None) -> dict[str, list[str]]:
        """The forbidden words that apply to text in ``language`` (every list when None)."""
        if language is None:
            return self.forbidden_words
        return {
            lang: words
            for lang, words in self.forbidden_words.items()
            if lang in (ALL_LANGUAGES, language)
        }


class PlaybookInvalid(InvalidInput):
    """A playbook file that cannot be used, with every problem in it."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(
            f"{source}: brand playbook is invalid:\n"
            + "\n".join(f"  - {problem}" for problem in problems)
        )


def _problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        path = ""
        for part in item["loc"]:
            if part == "[key]" or str(part).startswith("function-"):
                continue  # pydantic's marks for a dict key and a validator, not fields
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field; check its spelling"
        elif item["type"] == "missing":
            message = f"'{item['loc'][-1]}' is required"
        elif item["type"] == "literal_error" and "[key]" in item["loc"]:
            message = (
                f"{item['input']!r} is not a channel with messages; use email, sms, "
                "whatsapp or push"
            )
        problems.append(f"{path.lstrip('.') or '(root)'}: {message}")
    return problems


def load_playbook(path: Path | None) -> Playbook | None:
    """The playbook in ``path`` (YAML), or None when no file is configured."""
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError as error:
        raise PlaybookInvalid(str(path), [f"(root): cannot be read: {error.strerror}"]) from None
    return Playbook.from_yaml(text, source=str(path))


# ---------------------------------------------------------------- checking


def check_playbook(
    definition: JourneyDefinition, playbook: Playbook | None
) -> list[JourneyProblem]:
    """Every send step that breaks ``playbook``, each problem naming the step and field."""
    from hilo.journeys.definitions import JourneyProblem

    if playbook is None:
        return []
    whose = f"the {playbook.brand} playbook" if playbook.brand else "the brand playbook"
    journey_language = _language(definition) or playbook.language
    required_by_channel: dict[str, list[RequiredElement]] = {
        channel: elements for channel, elements in playbook.required_elements.items()
    }
    problems: list[JourneyProblem] = []
    for message in sample_messages(definition):
        step = message.step
        language = _whatsapp_language(message) or journey_language
        texts = {
            field: _brand_text(step.channel, field, source)
            for field, source in message.sources.items()
        }
        for field, text in texts.items():
            found = _forbidden(text, playbook.words_for(language))
            if found:
                words = ", ".join(f"'{word}'" for word in found)
                problems.append(
                    JourneyProblem(
                        path=f"{message.label}.{field}",
                        message=f"{words} {'is' if len(found) == 1 else 'are'} forbidden by "
                        f"{whose}; rephrase without {'it' if len(found) == 1 else 'them'}",
                    )
                )
            marks = text.count("!")  # ¡Hola! is one exclamation, not two
            limit = playbook.max_exclamation_marks
            if limit is not None and marks > limit:
                problems.append(
                    JourneyProblem(
                        path=f"{message.label}.{field}",
                        message=f"{field} has {marks} exclamation marks; {whose} allows at "
                        f"most {limit}",
                    )
                )
        for index, required in enumerate(required_by_channel.get(step.channel, [])):
            if required.category not in (None, step.category):
                continue
            if any(_contains(message, texts, element) for element in required.any_of):
                continue
            field = "body" if "body" in message.sources else next(iter(message.sources), "")
            options = " or ".join(f"'{element}'" for element in required.any_of)
            problems.append(
                JourneyProblem(
                    path=f"{message.label}.{field}" if field else message.label,
                    message=f"{whose} requires {options} in every "
                    f"{required.category + ' ' if required.category else ''}{step.channel} "
                    f"message (required_elements.{step.channel}[{index}]); add "
                    f"{'it' if len(required.any_of) == 1 else 'one of them'}",
                )
            )
    return problems


def _language(definition: JourneyDefinition) -> str | None:
    locale = (definition.sample.profile.get("locale") if definition.sample else None) or ""
    primary = re.split(r"[-_]", str(locale), maxsplit=1)[0].lower()
    return primary or None


def _whatsapp_language(message: SampleMessage) -> str | None:
    if message.step.channel != "whatsapp" or "body" not in message.sources:
        return None
    try:
        approved = whatsapp_template(message.sources["body"])
    except ValidationError:
        return None
    return approved.language.split("_", 1)[0] if approved else None


_MARKUP = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)
_COMMENT = re.compile(r"\{%-?\s*comment\s*-?%\}.*?\{%-?\s*endcomment\s*-?%\}", re.DOTALL)
_QUOTED = re.compile(r"\"([^\"]*)\"|'([^']*)'")
_TAG = re.compile(r"<[a-zA-Z!/][^>]*>")
_URL = re.compile(r"\b(?:https?://|www\.)\S+")


def _brand_text(channel: str, field: str, source: str) -> str:
    """What the brand wrote in a field: its text and the quoted text in its Liquid."""
    if channel == "whatsapp" and field == "body":
        try:
            approved = whatsapp_template(source)
        except ValidationError:
            approved = None
        if approved is not None:
            source = "\n".join([approved.text, *approved.params])
    source = _COMMENT.sub(" ", source)

    def keep_quoted(match: re.Match[str]) -> str:
        quoted = [a or b for a, b in _QUOTED.findall(match.group(0))]
        return " " + " ".join(quoted) + " "

    text = _MARKUP.sub(keep_quoted, source)
    return _URL.sub(" ", _TAG.sub(" ", text))


def _phrase(words: str) -> re.Pattern[str]:
    body = r"\s+".join(re.escape(part) for part in words.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def _forbidden(text: str, lists: dict[str, list[str]]) -> list[str]:
    found: list[str] = []
    for words in lists.values():
        for word in words:
            if word not in found and _phrase(word).search(text):
                found.append(word)
    return found


def _liquid(text: str) -> str:
    """Liquid with its spacing normalised: {{unsubscribe_url}} equals {{ unsubscribe_url }}."""
    text = re.sub(r"\{\{-?\s*", "{{ ", text)
    text = re.sub(r"\s*-?\}\}", " }}", text)
    text = re.sub(r"\{%-?\s*", "{% ", text)
    return re.sub(r"\s*-?%\}", " %}", text)


def _contains(message: SampleMessage, texts: dict[str, str], element: str) -> bool:
    if "{{" in element or "{%" in element:
        wanted = _liquid(element)
        return any(wanted in _liquid(source) for source in message.sources.values())
    pattern = _phrase(element)
    return any(pattern.search(text) for text in [*texts.values(), *message.rendered.values()])
