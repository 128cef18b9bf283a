"""The journey catalog: validate, publish immutable versions, pause, resume, archive."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from hilo.journey_runs import SIGNAL_STOP, StopRequest
from hilo.journeys import JourneyDefinition, load_journey_yaml
from hilo.storage import Journey, Store


@dataclass
class Published:
    key: str
    version: int
    created: bool


class JourneyCatalog:
    def __init__(self, store: Store) -> None:
        self.store = store

    def publish(self, definition: JourneyDefinition) -> int:
        """Store ``definition`` as a new version; running instances keep theirs."""
        return self.store.publish(
            definition.key,
            definition.name,
            definition.checksum(),
            definition.model_dump(mode="json"),
        )

    def publish_if_changed(self, definition: JourneyDefinition) -> Published:
        latest = self.store.latest_version(definition.key)
        if latest is not None and latest.checksum == definition.checksum():
            return Published(definition.key, latest.version, created=False)
        return Published(definition.key, self.publish(definition), created=True)

    def publish_folder(self, folder: Path) -> list[Published]:
        return [
            self.publish_if_changed(load_journey_yaml(path.read_text(), source=str(path.name)))
            for path in sorted(folder.glob("*.yaml"))
        ]

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
