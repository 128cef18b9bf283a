"""The contact policy (Política de Contacto): read, replace, audit, preview, suppressions.

Every change is a new version that records who made it (``actor`` in the body, or the
``X-Hilo-Actor`` header), an optional note, and what changed.
"""

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from api.deps import ADMIN_ONLY, StoreDep, StrictJSONRoute
from api.openapi import (
    NOT_JSON,
    TIME_ZONES,
    UNAUTHORIZED,
    DateTimeText,
    Responses,
    ValidationProblems,
)
from hilo.clock import utcnow
from hilo.journeys.definitions import CHANNELS
from hilo.policy import (
    ContactPolicy,
    ContactPolicyService,
    PolicyDecision,
    PolicyInvalid,
    PolicyProblem,
    SendIntent,
)

router = APIRouter(
    prefix="/policy",
    tags=["policy"],
    dependencies=ADMIN_ONLY,
    responses=UNAUTHORIZED,
    route_class=StrictJSONRoute,
)

ACTOR_HEADER = "X-Hilo-Actor"


def get_contact_policy(request: Request, store: StoreDep) -> ContactPolicyService:
    """One service per app and store, so its policy cache and pool are shared."""
    service = getattr(request.app.state, "contact_policy", None)
    if not isinstance(service, ContactPolicyService) or service.store is not store:
        service = ContactPolicyService(store)
        request.app.state.contact_policy = service
    return service


ContactPolicyDep = Annotated[ContactPolicyService, Depends(get_contact_policy)]


class PolicyOut(BaseModel):
    version: int = Field(description="0 while no policy was ever set: the defaults apply.")
    policy: dict[str, Any] = Field(description="The policy document.")
    actor: str | None = None
    note: str | None = None
    created_at: datetime | None = None


class PolicyChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: dict[str, Any] = Field(
        description="The whole new policy document (it replaces the current one).",
        examples=[{"global": {"caps": [{"count": 3, "window": "7d"}]}}],
    )
    actor: str | None = Field(
        None, max_length=200, description=f"Who changes it; or the {ACTOR_HEADER} header."
    )
    note: str | None = Field(None, max_length=1000, description="Why, for the audit.")


class PolicyVersionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    version: int
    actor: str
    note: str | None
    summary: str
    changes: list[dict[str, Any]]
    created_at: datetime


class InvalidPolicy(BaseModel):
    detail: list[PolicyProblem]


# The policy's own checks name each problem by field; FastAPI's name a field not as declared.
INVALID: Responses = {
    422: {"model": InvalidPolicy | ValidationProblems, "description": "Every problem, by field."},
    **NOT_JSON,
}


class PreviewRequest(SendIntent):
    # Strict here, as the schema says: pydantic would read 0 as false and "5" as 5.
    priority: StrictInt | None = Field(None, description="Overrides the journey's priority.")
    ignore_policy: StrictBool = Field(
        False, description="The step ignores caps, gaps, quiet hours and priority."
    )
    timezone: str | None = Field(
        None, description="Overrides the profile's time zone.", json_schema_extra=TIME_ZONES
    )
    at: DateTimeText | None = Field(None, description="Decide as of this moment; now by default.")


class SuppressionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channel: str = Field(examples=["email"], json_schema_extra={"enum": list(CHANNELS)})
    address: str = Field(min_length=1, max_length=320, examples=["ana@example.com"])
    reason: str = Field(min_length=1, max_length=500, examples=["hard bounce"])
    source: str = Field("api", max_length=100)


class SuppressionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    channel: str
    address: str
    reason: str
    source: str
    created_at: datetime


class DecisionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    message_id: str
    customer_id: str
    journey_key: str
    channel: str
    category: str
    priority: int
    decision: str
    reason: str
    rule: str | None
    defer_until: datetime | None
    reservation_id: int | None
    policy_version: int
    timezone: str | None
    decided_at: datetime


def _invalid(problems: list[PolicyProblem]) -> HTTPException:
    return HTTPException(
        422,
        [problem.model_dump() for problem in problems],
    )


def _known_channel(channel: str) -> None:
    if channel not in CHANNELS:
        raise _invalid(
            [
                PolicyProblem(
                    field="channel",
                    problem=f"unknown channel {channel!r}; channels are {', '.join(CHANNELS)}",
                )
            ]
        )


@router.get("")
def read_policy(service: ContactPolicyDep) -> PolicyOut:
    """The policy in force and its version."""
    current = service.get_policy()
    return PolicyOut(
        version=current.version,
        policy=current.policy.document(),
        actor=current.actor,
        note=current.note,
        created_at=current.created_at,
    )


@router.put("", responses=INVALID)
def replace_policy(
    change: PolicyChange,
    service: ContactPolicyDep,
    actor_header: Annotated[str | None, Header(alias=ACTOR_HEADER)] = None,
) -> PolicyVersionOut:
    """Replace the whole policy; the new version is audited."""
    actor = change.actor or actor_header
    if not actor:
        raise _invalid(
            [
                PolicyProblem(
                    field="actor",
                    problem=f"say who changes the policy: 'actor' in the body or the "
                    f"{ACTOR_HEADER} header",
                )
            ]
        )
    try:
        version = service.set_policy(change.policy, actor=actor, note=change.note)
    except PolicyInvalid as error:
        raise _invalid(error.problems) from None
    return PolicyVersionOut.model_validate(version)


@router.get("/schema")
def policy_schema() -> dict[str, Any]:
    """The JSON Schema of the policy document, for editors."""
    return ContactPolicy.model_json_schema(by_alias=True)


@router.get("/history")
def policy_history(
    service: ContactPolicyDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[PolicyVersionOut]:
    """Every version, newest first: who, when, why and what changed."""
    return [PolicyVersionOut.model_validate(row) for row in service.history(limit=limit)]


@router.post("/decisions/preview", responses=NOT_JSON)
def preview_decision(request: PreviewRequest, service: ContactPolicyDep) -> PolicyDecision:
    """What the policy would answer for this send, without reserving or storing anything."""
    intent = SendIntent.model_validate(request.model_dump(exclude={"at"}))
    return service.preview(intent, request.at or utcnow())


@router.get("/decisions")
def list_decisions(
    service: ContactPolicyDep,
    customer_id: str | None = None,
    message_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[DecisionOut]:
    """Stored decisions, newest first (for a profile's timeline)."""
    rows = service.decisions(customer_id=customer_id, message_id=message_id, limit=limit)
    return [DecisionOut.model_validate(row) for row in rows]


@router.get("/suppressions")
def list_suppressions(
    service: ContactPolicyDep,
    channel: str | None = None,
    address: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[SuppressionOut]:
    """Suppressed addresses, newest first; filter by channel and address."""
    rows = service.suppressions(channel=channel, address=address, limit=limit)
    return [SuppressionOut.model_validate(row) for row in rows]


@router.post("/suppressions", status_code=status.HTTP_201_CREATED, responses=INVALID)
def add_suppression(body: SuppressionIn, service: ContactPolicyDep) -> SuppressionOut:
    """Stop every send to an address on a channel (kept as first recorded if already there)."""
    _known_channel(body.channel)
    row = service.suppress(body.channel, body.address, body.reason, body.source)
    return SuppressionOut.model_validate(row)


@router.delete(
    "/suppressions",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={404: {"description": "That address is not suppressed on that channel."}},
)
def remove_suppression(service: ContactPolicyDep, channel: str, address: str) -> Response:
    """Allow sends to an address again (e.g. the customer fixed their mailbox)."""
    if not service.unsuppress(channel, address):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"{address!r} is not suppressed on {channel}"
        )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
