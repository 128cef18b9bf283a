"""The journey catalog: validate, publish immutable versions, pause, resume, archive.

Publishing checks what a definition alone cannot tell
(:func:`~hilo.journeys.validate.check_journey` already ran when it was parsed): the brand
playbook, the unsubscribe link of marketing email, the promotions its templates name, as they are
in the store now, and the preference topics its sends name (those the preference page offers).
Problems refuse the version (:class:`~hilo.journeys.definitions.JourneyInvalid`); warnings come
back with the version number: a promotion that expired or has not started (its sends will be
skipped), an event name nothing produces (Hilo does not emit it, Segment's specs do not name it,
no event has carried it yet), a template variable the sample does not have.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from hilo.clock import utcnow
from hilo.customers.consent import PREFERENCES_TRAIT
from hilo.db.models import Journey
from hilo.db.store import Store
from hilo.events import EMITTED_EVENTS, SEGMENT_SPEC_EVENTS, SPEC_NAME_FOR
from hilo.feedback.preferences import FREQUENCIES
from hilo.journeys.definitions import (
    JourneyDefinition,
    JourneyInvalid,
    JourneyProblem,
    SendStep,
    UpdateProfileStep,
    WaitForStep,
    walk_steps,
)
from hilo.journeys.runs import SIGNAL_STOP, StopRequest
from hilo.journeys.templates import check_unsubscribe_links, sample_gaps
from hilo.journeys.validate import load_journey_yaml
from hilo.playbook import Playbook, check_playbook
from hilo.promotions import check_promotions

SPEC_NAMES = sorted(SEGMENT_SPEC_EVENTS)


@dataclass
class Published:
    key: str
    version: int
    created: bool
    warnings: list[str] = field(default_factory=list)


class Version(int):
    """A published version number, carrying what publishing warned about."""

    warnings: list[str]

    def __new__(cls, number: int, warnings: list[str] | None = None) -> Version:
        version = super().__new__(cls, number)
        version.warnings = list(warnings or [])
        return version


@dataclass
class PublishCheck:
    """What publishing a definition now would answer."""

    problems: list[JourneyProblem]
    warnings: list[JourneyProblem]


def check_topics(definition: JourneyDefinition, topics: Collection[str]) -> list[JourneyProblem]:
    """Every send's ``topic`` must be one the preference page offers, or nobody could leave it."""
    problems = []
    for step, path in walk_steps(definition.steps):
        if isinstance(step, SendStep) and step.topic is not None and step.topic not in topics:
            known = ", ".join(sorted(topics)) or "none yet"
            problems.append(
                JourneyProblem(
                    path=f"{path} ({step.id}).topic",
                    message=f"'{step.topic}' is not a topic of the preference page (known: "
                    f"{known}); add it to HILO_PREFERENCE_TOPICS, e.g. "
                    f'[{{"key": "{step.topic}", "name": "..."}}], or fix the spelling',
                )
            )
    return problems


class JourneyCatalog:
    def __init__(
        self,
        store: Store,
        playbook: Playbook | None = None,
        topics: Collection[str] | None = None,
    ) -> None:
        """``topics``: the preference page's topic keys; None leaves step topics unchecked."""
        self.store = store
        self.playbook = playbook
        self.topics = topics

    def check(self, definition: JourneyDefinition, now: datetime | None = None) -> PublishCheck:
        """The playbook, unsubscribe-link, promotion and topic checks, without publishing.

        The one check behind ``journeys validate`` and ``publish``, on the command line and
        in the API: what validates is what publishes.
        """
        problems, warnings = check_promotions(definition, self.store, now or utcnow())
        problems = (
            check_unsubscribe_links(definition)
            + check_playbook(definition, self.playbook)
            + (check_topics(definition, self.topics) if self.topics is not None else [])
            + check_preference_writes(definition)
            + problems
        )
        warnings += self.unheard_events(definition) + sample_gaps(definition)
        return PublishCheck(problems=problems, warnings=warnings)

    def unheard_events(self, definition: JourneyDefinition) -> list[JourneyProblem]:
        """Warnings: event names the journey starts on, waits for, exits or converts on that
        nothing produces: Hilo does not emit them, Segment's specs do not name them (what
        Segment, RudderStack and Jitsu sources send) and no event of that name has reached
        Hilo yet. A typo, or another tool's name, would leave that path silent for ever."""
        paths: dict[str, list[str]] = {}
        for path, name in event_names(definition):
            paths.setdefault(name, []).append(path)
        unknown = paths.keys() - EMITTED_EVENTS.keys() - SEGMENT_SPEC_EVENTS
        unheard = unknown - self.store.received_event_names(sorted(unknown))
        warnings = []
        for name, where in paths.items():
            if name not in unheard:
                continue
            message = (
                f"no '{name}' event has reached Hilo yet, and neither Hilo nor Segment's "
                "specs produce one: check the name your sources send"
            )
            # Another tool's name for a spec event, else a typo of one.
            close = SPEC_NAME_FOR.get(name) or next(
                iter(difflib.get_close_matches(name, SPEC_NAMES, n=1, cutoff=0.8)), None
            )
            if close:
                message += f"; Segment's spec names it '{close}'"
            if len(where) > 1:
                message += f" (also at {', '.join(where[1:])})"
            warnings.append(JourneyProblem(path=where[0], message=message))
        return warnings

    def publish(self, definition: JourneyDefinition, now: datetime | None = None) -> Version:
        """Store ``definition`` as a new version; running instances keep theirs.

        Raises JourneyInvalid when the publish checks find problems.
        """
        checked = self._checked(definition, now)
        number = self.store.publish(
            definition.key,
            definition.name,
            definition.checksum(),
            definition.model_dump(mode="json"),
        )
        return Version(number, checked)

    def publish_if_changed(
        self, definition: JourneyDefinition, now: datetime | None = None
    ) -> Published:
        """How the command line and the API publish: a new version only when it differs.

        Raises JourneyInvalid when the publish checks find problems, and ValueError when
        the journey is archived (even with an unchanged definition).
        """
        journey = self.store.get_journey(definition.key)
        if journey is not None and journey.status == "archived":
            raise ValueError(f"journey '{definition.key}' is archived; publish it under a new key")
        latest = self.store.latest_version(definition.key)
        if latest is not None and latest.checksum == definition.checksum():
            # Checked again: the playbook or a promotion may have changed since.
            warnings = self._checked(definition, now)
            return Published(definition.key, latest.version, created=False, warnings=warnings)
        version = self.publish(definition, now)
        return Published(definition.key, int(version), created=True, warnings=version.warnings)

    def _checked(self, definition: JourneyDefinition, now: datetime | None) -> list[str]:
        checked = self.check(definition, now)
        if checked.problems:
            raise JourneyInvalid(checked.problems)
        return [str(warning) for warning in checked.warnings]

    def publish_folder(self, folder: Path) -> list[Published]:
        published = []
        for path in sorted(folder.glob("*.yaml")):
            definition = load_journey_yaml(path.read_text(), source=str(path.name))
            try:
                published.append(self.publish_if_changed(definition))
            except JourneyInvalid as error:
                raise JourneyInvalid(error.problems, source=path.name) from None
        return published

    def list(self) -> list[Journey]:
        return self.store.list_journeys()

    def pause(self, key: str) -> Journey:
        """No new entries; running instances go on."""
        return self.store.set_journey_status(key, "paused")

    def resume(self, key: str) -> Journey:
        return self.store.set_journey_status(key, "active")

    async def archive(self, key: str, client: Client | None) -> tuple[Journey, int]:
        """No new entries, and every running instance ends now."""
        journey = self.store.set_journey_status(key, "archived")
        stopped = 0
        for instance in self.store.active_instances_of(key):
            if client is None:
                break
            handle = client.get_workflow_handle(instance.workflow_id)
            try:
                await handle.signal(
                    SIGNAL_STOP, StopRequest(reason="journey archived", status="archived")
                )
                stopped += 1
            except RPCError as error:
                if error.status != RPCStatusCode.NOT_FOUND:
                    raise
        return journey, stopped


def event_names(definition: JourneyDefinition) -> list[tuple[str, str]]:
    """Every event name a definition reacts to, with the path that names it."""
    named = [("trigger.event", definition.trigger.event)]
    named += [(f"exit[{i}].event", rule.event) for i, rule in enumerate(definition.exit)]
    if definition.goal:
        named.append(("goal.event", definition.goal.event))
    for step, path in walk_steps(definition.steps):
        if isinstance(step, WaitForStep):
            named += [
                (f"{path} ({step.id}).events[{i}].event", outcome.event)
                for i, outcome in enumerate(step.events)
            ]
    return named


# What a journey may write under the preferences trait: what the preference page stores and
# the contact policy reads (a pause is a date the customer picks, so journeys leave it be).
JOURNEY_PREFERENCES = ("frequency", "topics")


def check_preference_writes(definition: JourneyDefinition) -> list[JourneyProblem]:
    """An update_profile that writes the customer's preferences writes what the contact
    policy reads: ``preferences.frequency`` as one of the page's choices."""
    problems = []
    for step, path in walk_steps(definition.steps):
        if not isinstance(step, UpdateProfileStep):
            continue
        written = dict(step.set)
        whole = written.pop(PREFERENCES_TRAIT, None)
        if isinstance(whole, dict):
            written |= {f"{PREFERENCES_TRAIT}.{name}": value for name, value in whole.items()}
        for name, value in written.items():
            head, _, field = name.partition(".")
            if head != PREFERENCES_TRAIT:
                continue
            where = f"{path} ({step.id}).set.{name}"
            if field not in JOURNEY_PREFERENCES:
                problems.append(
                    JourneyProblem(
                        path=where,
                        message=f"the contact policy reads no preference '{field}'; a journey "
                        f"may set {PREFERENCES_TRAIT}.frequency ({', '.join(FREQUENCIES)}) or "
                        f"{PREFERENCES_TRAIT}.topics",
                    )
                )
            elif field == "frequency" and value not in FREQUENCIES:
                problems.append(
                    JourneyProblem(
                        path=where,
                        message=f"{value!r} is not a frequency the contact policy knows; "
                        f"use one of {', '.join(FREQUENCIES)}",
                    )
                )
    return problems
