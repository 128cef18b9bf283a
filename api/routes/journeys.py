"""The journey catalog: validate, publish, read, pause, resume and archive journeys."""

import json
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response, status
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.deps import (
    ADMIN_ONLY,
    CatalogDep,
    ClientDep,
    StoreDep,
    StrictJSONRoute,
    unstorable_places,
)
from api.openapi import (
    SETTINGS_INVALID,
    UNAUTHORIZED,
    Responses,
    ValidationProblems,
    message,
)
from hilo.db.models import Journey
from hilo.journeys.definitions import (
    JourneyDefinition,
    JourneyInvalid,
    JourneyProblem,
    journey_json_schema,
    walk_steps,
)
from hilo.journeys.validate import load_journey_yaml, parse_journey

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml")
JSON_TYPES = ("application/json",)

# The body is read by hand (YAML or JSON), so OpenAPI is told what it may be.
DEFINITION_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A journey definition; its JSON Schema is at GET /journeys/schema.",
        "content": {
            **{media: {"schema": {"type": "string"}} for media in YAML_TYPES},
            "application/json": {"schema": {"type": "object"}},
        },
    }
}


# Versions count from 1 in an INTEGER column (32 bits on PostgreSQL): a number past it
# could never have been stored, and the database refuses to compare with it.
VersionNumber = Annotated[int, Path(ge=1, le=2**31 - 1, description="A published version.")]


class InvalidJourney(BaseModel):
    detail: list[JourneyProblem]


INVALID: Responses = {
    422: {
        "model": InvalidJourney | ValidationProblems,
        "description": "Every problem in the definition.",
    }
}
NOT_FOUND = message(404, "No journey with that key.")
UNSUPPORTED = message(415, "Not YAML or JSON: say which in Content-Type.")
CONFLICT = message(409, "Not allowed in the journey's status.")


class ValidJourney(BaseModel):
    valid: bool = True
    key: str
    steps: int = Field(description="How many steps the journey has, nested ones included.")
    warnings: list[str] = Field(
        default_factory=list, description="What publishing would warn about."
    )


class PublishedVersion(BaseModel):
    key: str
    version: int
    created: bool = Field(description="False when the definition equals the latest version.")
    warnings: list[str] = Field(
        default_factory=list, description="Published anyway, e.g. a promotion that expired."
    )


class JourneySummary(BaseModel):
    key: str
    name: str
    status: str = Field(description="active, paused or archived")
    latest_version: int


class VersionSummary(BaseModel):
    version: int
    checksum: str
    published_at: datetime


class JourneyDetail(JourneySummary):
    definition: dict[str, Any] | None = Field(description="The latest version's definition.")
    versions: list[VersionSummary]


class JourneyVersionDetail(VersionSummary):
    key: str
    definition: dict[str, Any]


class JourneyStatus(BaseModel):
    key: str
    status: str


class ArchivedJourney(JourneyStatus):
    stopped: int = Field(description="Running instances that were told to stop.")


def _summary(journey: Journey) -> JourneySummary:
    return JourneySummary(
        key=journey.key,
        name=journey.name,
        status=journey.status,
        latest_version=journey.latest_version,
    )


def _not_found(key: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no journey with key '{key}'")


def _invalid(problems: list[JourneyProblem]) -> HTTPException:
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT, [problem.model_dump() for problem in problems]
    )


async def definition_body(request: Request) -> JourneyDefinition:
    """The request body as a checked definition, or 422 listing every problem."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in YAML_TYPES + JSON_TYPES:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            "send the definition as YAML (content-type application/yaml) or JSON "
            f"(application/json); got {media or 'no content-type'}",
        )
    try:
        text = (await request.body()).decode()
    except UnicodeDecodeError:
        raise _invalid([JourneyProblem(path="(root)", message="body is not UTF-8 text")]) from None
    # Checking renders every template: in a thread, so other requests (/health) go on.
    return await run_in_threadpool(_checked_definition, text, media)


def _checked_definition(text: str, media: str) -> JourneyDefinition:
    try:
        if media in YAML_TYPES:
            return _storable(load_journey_yaml(text))
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            where = f"line {error.lineno}, column {error.colno}"
            message = f"not valid JSON: {error.msg}"
            raise _invalid([JourneyProblem(path=where, message=message)]) from None
        return _storable(parse_journey(raw))
    except JourneyInvalid as error:
        raise _invalid(error.problems) from None


def _storable(definition: JourneyDefinition) -> JourneyDefinition:
    """YAML's "\\0" makes a NUL too, which the database cannot store."""
    places = unstorable_places(definition.model_dump(mode="json", exclude_none=True), ())
    problems = [
        JourneyProblem(path=".".join(map(str, place)) or "(root)", message=problem)
        for place, problem in places
    ]
    if problems:
        raise _invalid(problems)
    return definition


DefinitionDep = Annotated[JourneyDefinition, Depends(definition_body)]

# Public so editors can fetch the schema; included before `router` so that
# /journeys/schema is not taken for a journey key.
public_router = APIRouter(prefix="/journeys", tags=["journeys"], route_class=StrictJSONRoute)
router = APIRouter(
    prefix="/journeys",
    tags=["journeys"],
    dependencies=ADMIN_ONLY,
    responses=UNAUTHORIZED,
    route_class=StrictJSONRoute,
)


@public_router.get("/schema")
def schema() -> dict[str, Any]:
    """The JSON Schema of a journey definition."""
    return journey_json_schema()


@router.post(
    "/validate",
    responses={**INVALID, **UNSUPPORTED, **SETTINGS_INVALID},
    openapi_extra=DEFINITION_BODY,
)
def validate(definition: DefinitionDep, catalog: CatalogDep) -> ValidJourney:
    """Check a definition as publishing would (the same checks), without publishing it."""
    checked = catalog.check(definition)
    if checked.problems:
        raise _invalid(checked.problems)
    return ValidJourney(
        key=definition.key,
        steps=sum(1 for _ in walk_steps(definition.steps)),
        warnings=[str(warning) for warning in checked.warnings],
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        **INVALID,
        **CONFLICT,
        **UNSUPPORTED,
        **SETTINGS_INVALID,
        200: {"model": PublishedVersion},
    },
    openapi_extra=DEFINITION_BODY,
)
def publish(definition: DefinitionDep, catalog: CatalogDep, response: Response) -> PublishedVersion:
    """Publish a new version; 200 and created=false when it equals the latest one."""
    try:
        published = catalog.publish_if_changed(definition)
    except JourneyInvalid as error:  # the playbook, promotions or the unsubscribe link
        raise _invalid(error.problems) from None
    except ValueError as error:  # an archived journey
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    if not published.created:
        response.status_code = status.HTTP_200_OK
    return PublishedVersion(
        key=published.key,
        version=published.version,
        created=published.created,
        warnings=published.warnings,
    )


@router.get("", responses=SETTINGS_INVALID)
def list_journeys(catalog: CatalogDep) -> list[JourneySummary]:
    return [_summary(journey) for journey in catalog.list()]


@router.get("/{key}", responses=NOT_FOUND)
def get_journey(key: str, store: StoreDep) -> JourneyDetail:
    journey = store.get_journey(key)
    if journey is None:
        raise _not_found(key)
    versions = store.list_versions(key)
    latest = next((v for v in versions if v.version == journey.latest_version), None)
    return JourneyDetail(
        **_summary(journey).model_dump(),
        definition=latest.definition if latest else None,
        versions=[
            VersionSummary(version=v.version, checksum=v.checksum, published_at=v.published_at)
            for v in versions
        ],
    )


@router.get("/{key}/versions/{version}", responses=NOT_FOUND)
def get_version(key: str, version: VersionNumber, store: StoreDep) -> JourneyVersionDetail:
    found = store.get_version(key, version)
    if found is None:
        if store.get_journey(key) is None:
            raise _not_found(key)
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"journey '{key}' has no version {version}")
    return JourneyVersionDetail(
        key=key,
        version=found.version,
        checksum=found.checksum,
        published_at=found.published_at,
        definition=found.definition,
    )


@router.post("/{key}/pause", responses={**NOT_FOUND, **CONFLICT, **SETTINGS_INVALID})
def pause(key: str, catalog: CatalogDep) -> JourneyStatus:
    """No new entries; running instances go on."""
    return _change_status(key, catalog.pause)


@router.post("/{key}/resume", responses={**NOT_FOUND, **CONFLICT, **SETTINGS_INVALID})
def resume(key: str, catalog: CatalogDep) -> JourneyStatus:
    return _change_status(key, catalog.resume)


def _change_status(key: str, change: Callable[[str], Journey]) -> JourneyStatus:
    try:
        journey = change(key)
    except KeyError:
        raise _not_found(key) from None
    except ValueError as error:  # e.g. resuming an archived journey
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    return JourneyStatus(key=journey.key, status=journey.status)


@router.post("/{key}/archive", responses={**NOT_FOUND, **SETTINGS_INVALID})
async def archive(key: str, catalog: CatalogDep, client: ClientDep) -> ArchivedJourney:
    """No new entries, and every running instance stops now. There is no way back."""
    try:
        journey, stopped = await catalog.archive(key, client)
    except KeyError:
        raise _not_found(key) from None
    return ArchivedJourney(key=journey.key, status=journey.status, stopped=stopped)
