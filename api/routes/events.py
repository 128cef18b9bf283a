"""Events in: each one starts the journeys it triggers and reaches the instances listening."""

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from api.deps import ADMIN_ONLY, RouterDep
from hilo.events import CustomerEvent

router = APIRouter(prefix="/events", tags=["events"], dependencies=ADMIN_ONLY)


class EventRouted(BaseModel):
    duplicate: bool = Field(description="The message_id was seen before; nothing was done.")
    started: list[str] = Field(description="Workflow ids of the journeys this event started.")
    signalled: list[str] = Field(description="Workflow ids of running instances it reached.")
    not_entered: dict[str, str] = Field(description="Journey key → why the customer did not enter.")


@router.post("", status_code=status.HTTP_202_ACCEPTED)
async def send_event(event: CustomerEvent, router: RouterDep) -> EventRouted:
    """Record an event once (by message_id) and route it."""
    result = await router.route(event)
    return EventRouted(
        duplicate=result.duplicate,
        started=result.started,
        signalled=result.signalled,
        not_entered=result.not_entered,
    )
