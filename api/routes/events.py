"""Hilo's own event endpoint: one event, stored before the answer, routed by the dispatcher.

It waits a moment for the routing so that the answer can say what the event did; when
Temporal is unreachable the answer is 202 with ``queued: true`` and the dispatcher
delivers the event once Temporal is back.
"""

from fastapi import APIRouter, Request, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from api.deps import ADMIN_ONLY, IngestorDep, SettingsDep, StrictJSONRoute, get_dispatcher
from api.openapi import NOT_JSON, UNAUTHORIZED
from hilo.events import CustomerEvent

router = APIRouter(
    prefix="/events",
    tags=["events"],
    dependencies=ADMIN_ONLY,
    responses=UNAUTHORIZED,
    route_class=StrictJSONRoute,
)


class EventRouted(BaseModel):
    duplicate: bool = Field(description="The message_id was seen before; nothing was done.")
    queued: bool = Field(
        False, description="Stored, and not routed yet: the dispatcher will deliver it."
    )
    started: list[str] = Field(description="Workflow ids of the journeys this event started.")
    signalled: list[str] = Field(description="Workflow ids of running instances it reached.")
    not_entered: dict[str, str] = Field(description="Journey key → why the customer did not enter.")


@router.post("", status_code=status.HTTP_202_ACCEPTED, responses=NOT_JSON)
async def send_event(
    event: CustomerEvent, request: Request, ingestor: IngestorDep, settings: SettingsDep
) -> EventRouted:
    """Store an event once (by message_id) and route it."""
    accepted = await run_in_threadpool(ingestor.accept_events, [event], event.source)
    if not accepted.stored:
        return EventRouted(duplicate=True, started=[], signalled=[], not_entered={})
    dispatcher = get_dispatcher(request)
    result = (
        await dispatcher.routed(event.message_id, settings.event_wait_seconds)
        if dispatcher is not None
        else None
    )
    if result is None:
        return EventRouted(duplicate=False, queued=True, started=[], signalled=[], not_entered={})
    return EventRouted(
        duplicate=False,
        started=result.started,
        signalled=result.signalled,
        not_entered=result.not_entered,
    )
