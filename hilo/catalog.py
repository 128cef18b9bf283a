"""The journey catalog: validate, publish immutable versions, pause, resume, archive.

Publishing checks what a definition alone cannot tell (:func:`~hilo.journeys.check_journey`
already ran when it was parsed): the brand playbook, the unsubscribe link of marketing
email, the promotions its templates name, as they are in the store now, and the preference
topics its sends name (those the preference page offers). Problems refuse
the version (:class:`~hilo.journeys.JourneyInvalid`); warnings (a promotion that expired or
has not started: its sends will be skipped) come back with the version number.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from hilo.journey_runs import SIGNAL_STOP, StopRequest
from hilo.journeys import (
    JourneyDefinition,
    JourneyInvalid,
    JourneyProblem,
    SendStep,
    load_journey_yaml,
    walk_steps,
)
from hilo.playbook import Playbook, check_playbook
from hilo.promotions import check_promotions
from hilo.storage import Journey, Store, utcnow
from hilo.templates import check_unsubscribe_links, sample_gaps


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
            + problems
        )
        return PublishCheck(problems=problems, warnings=warnings + sample_gaps(definition))

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
