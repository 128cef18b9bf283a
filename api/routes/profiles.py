"""Customer profiles: who the customer is, what they agreed to, what happened to them.

GET gives the profile (a merged anonymous id gives the known customer's), ``/timeline``
what happened newest first, ``/consent`` records a consent statement with its source, and
``/messages`` the message ledger. PUT sets traits and consent directly.
"""

from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, HTTPException, Path, Query, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from api.deps import ADMIN_ONLY, StoreDep, StrictJSONRoute
from api.openapi import NOT_BLANK, NOT_JSON, SPACE, TIME_ZONES, UNAUTHORIZED, DateTimeText, message
from hilo.customers.identity import resolve_customer
from hilo.customers.profiles import (
    MAX_TIMELINE,
    ConsentError,
    ProfileView,
    TimelineEntry,
    profile_view,
    record_consent,
    timeline,
)
from hilo.ids import MAX_ID_CHARS

router = APIRouter(
    prefix="/profiles",
    tags=["profiles"],
    dependencies=ADMIN_ONLY,
    responses=UNAUTHORIZED,
    route_class=StrictJSONRoute,
)


NOT_FOUND = message(404, "Hilo has seen no call with this userId or anonymousId.")


# The profile's key column: a longer id could never have been stored.
CustomerId = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)]


# The channels consent is kept for; another key is refused with its name.
ConsentChannel = Literal["email", "sms", "whatsapp", "push", "webpush"]


class ProfileUpdate(BaseModel):
    """Merged into the profile: given traits and consent replace those names only."""

    model_config = ConfigDict(extra="forbid")

    traits: dict[str, Any] | None = Field(None, examples=[{"first_name": "Ana"}])
    consent: dict[ConsentChannel, StrictBool] | None = Field(
        None,
        description="By channel (email, sms, whatsapp, push, webpush), e.g. {push: true}; "
        "each change is recorded with source 'api'.",
        examples=[{"push": True}],
    )
    timezone: str | None = Field(
        None,
        max_length=64,
        examples=["Europe/Madrid"],
        json_schema_extra=TIME_ZONES,
    )
    locale: str | None = Field(None, max_length=35, examples=["es-ES"])

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        # Rejected here rather than when a time-window wait first needs it.
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(
                    f"unknown time zone '{value}'; use an IANA name such as Europe/Madrid"
                ) from None
        return value


class CustomerProfile(BaseModel):
    customer_id: str
    traits: dict[str, Any]
    consent: dict[str, Any]
    timezone: str | None
    locale: str | None
    updated_at: datetime


class SentMessage(BaseModel):
    """One row of the message ledger, including skipped and failed sends."""

    model_config = ConfigDict(from_attributes=True)

    message_id: str
    journey_key: str
    step_id: str
    channel: str
    template: str
    status: str = Field(description="sent, skipped or failed")
    reason: str | None
    scheduled_at: datetime
    content: dict[str, Any]


@router.put("/{customer_id}", responses=NOT_JSON)
def upsert_profile(
    customer_id: CustomerId, update: ProfileUpdate, store: StoreDep
) -> CustomerProfile:
    profile = store.upsert_profile(
        customer_id,
        traits=update.traits,
        consent={str(channel): granted for channel, granted in (update.consent or {}).items()},
        timezone=update.timezone,
        locale=update.locale,
        source="api",
    )
    return CustomerProfile.model_validate(profile, from_attributes=True)


@router.get("/{customer_id}/messages")
def messages(customer_id: CustomerId, store: StoreDep) -> list[SentMessage]:
    """Oldest first; an unknown customer simply has none."""
    return [SentMessage.model_validate(row) for row in store.messages(customer_id=customer_id)]


# The schema states what record_consent checks, so that a client (or a fuzzer) can tell a
# device it would refuse; the checks and their messages stay in one place, there.
class WebPushKeys(BaseModel):
    p256dh: str = Field(
        description="The browser's 65-byte P-256 public key, base64url.",
        json_schema_extra={"pattern": "^[A-Za-z0-9_-]{87}=?$"},
    )
    auth: str = Field(
        description="The 16-byte authentication secret, base64url.",
        json_schema_extra={"pattern": "^[A-Za-z0-9_-]{22}={0,2}$"},
    )


class WebPushSubscription(BaseModel):
    """The browser's ``PushSubscription.toJSON()``."""

    endpoint: str = Field(
        examples=["https://fcm.googleapis.com/fcm/send/abc"],
        json_schema_extra={"pattern": "^https://[A-Za-z0-9.-]+(:[0-9]+)?(/|$)", "maxLength": 2000},
    )
    keys: WebPushKeys
    expiration_time: int | None = Field(None, alias="expirationTime")


class ConsentRequest(BaseModel):
    """One consent statement, kept with its source and time."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            # A token is only for push, a subscription only for webpush.
            "allOf": [
                {
                    "anyOf": [
                        {"properties": {"token": {"type": "null"}}},
                        {"properties": {"channel": {"const": "push"}}},
                    ]
                },
                {
                    "anyOf": [
                        {"properties": {"subscription": {"type": "null"}}},
                        {"properties": {"channel": {"const": "webpush"}}},
                    ]
                },
            ]
        },
    )

    channel: Literal["email", "sms", "whatsapp", "push", "webpush"]
    granted: StrictBool
    source: str = Field(
        min_length=1,
        max_length=100,
        description="Who recorded it: a preference centre, an agent, an import.",
        examples=["preference-center"],
        json_schema_extra={"pattern": NOT_BLANK},
    )
    topic: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="A topic within the channel; the channel's own consent stays as it is.",
        examples=["newsletter"],
        json_schema_extra={"pattern": NOT_BLANK},
    )
    detail: str | None = Field(None, max_length=500, examples=["ticket 4711"])
    token: str | None = Field(
        None,
        description="push: the device's FCM token, one word.",
        json_schema_extra={"pattern": f"^[^{SPACE}]+$", "maxLength": 2000},
    )
    subscription: WebPushSubscription | None = Field(
        None, description="webpush: the browser's push subscription."
    )


def _not_found(customer_id: str) -> HTTPException:
    return HTTPException(
        status.HTTP_404_NOT_FOUND,
        f"no profile '{customer_id}': Hilo has seen no call with this userId or anonymousId "
        f"(send an identify, or PUT /profiles/{customer_id})",
    )


@router.get("/{customer_id}", responses=NOT_FOUND)
def get_profile(customer_id: CustomerId, store: StoreDep) -> ProfileView:
    """The profile; an anonymous id merged into a known customer gives that customer's."""
    view = profile_view(store, customer_id)
    if view is None:
        raise _not_found(customer_id)
    return view


@router.get("/{customer_id}/timeline", responses=NOT_FOUND)
def get_timeline(
    customer_id: CustomerId,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=MAX_TIMELINE)] = 200,
    before: Annotated[
        DateTimeText | None,
        Query(description="Only what happened before this; the last entry's `at` pages on."),
    ] = None,
) -> list[TimelineEntry]:
    """Events, journey entries and exits, messages, consent changes and contact-policy
    decisions, newest first."""
    if resolve_customer(store, customer_id) is None:
        raise _not_found(customer_id)
    return timeline(store, customer_id, limit=limit, before=before)


@router.post("/{customer_id}/consent", responses=NOT_JSON)
async def post_consent(
    customer_id: CustomerId, body: ConsentRequest, store: StoreDep
) -> ProfileView:
    """Record consent for a channel (or one of its topics); a push token or web-push
    subscription given with it becomes one of the customer's devices."""
    device: str | dict[str, Any] | None = body.token
    if body.subscription is not None:
        if body.token is not None:
            raise _invalid("token", "send either token (push) or subscription (webpush)")
        device = body.subscription.model_dump(by_alias=True, exclude_none=True)
    try:
        await run_in_threadpool(
            record_consent,
            store,
            customer_id,
            body.channel,
            body.granted,
            body.source,
            topic=body.topic,
            detail=body.detail,
            device=device,
        )
    except ConsentError as error:
        raise _invalid(error.field, error.message) from None
    view = await run_in_threadpool(profile_view, store, customer_id)
    assert view is not None  # just written
    return view


def _invalid(field: str, message: str) -> RequestValidationError:
    """A 422 shaped as FastAPI's own, so clients read one format."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", *field.split(".")), "msg": message}]
    )
