"""Events in: each one starts the journeys it triggers and reaches the instances listening."""

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from api.deps import ADMIN_ONLY, RouterDep
from hilo.events import CustomerEvent
from hilo.storage import Store

router = APIRouter(prefix="/events", tags=["events"], dependencies=ADMIN_ONLY)


class EventRouted(BaseModel):
    duplicate: bool = Field(description="The message_id was seen before; nothing was done.")
    started: list[str] = Field(description="Workflow ids of the journeys this event started.")
    signalled: list[str] = Field(description="Workflow ids of running instances it reached.")
    not_entered: dict[str, str] = Field(description="Journey key → why the customer did not enter.")


def _closed_journeys(store: Store, event_name: str) -> dict[str, str]:
    """Paused and archived journeys this event would trigger, so the caller learns why not."""
    reasons: dict[str, str] = {}
    for journey in store.list_journeys():
        if journey.status == "active" or journey.latest_version == 0:
            continue
        version = store.latest_version(journey.key)
        trigger = version.definition.get("trigger", {}) if version else {}
        if trigger.get("event") == event_name:
            reasons[journey.key] = f"journey is {journey.status}"
    return reasons


@router.post("", status_code=status.HTTP_202_ACCEPTED)
async def send_event(event: CustomerEvent, router: RouterDep) -> EventRouted:
    """Record an event once (by message_id) and route it."""
    result = await router.route(event)
    not_entered = dict(result.not_entered)
    if not result.duplicate:
        for key, reason in _closed_journeys(router.store, event.name).items():
            not_entered.setdefault(key, reason)
    return EventRouted(
        duplicate=result.duplicate,
        started=result.started,
        signalled=result.signalled,
        not_entered=not_entered,
    )
