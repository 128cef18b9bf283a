"""Customer profiles and what was sent to them.

PUT is a minimal stand-in until Segment-compatible ingestion exists.
"""

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.deps import ADMIN_ONLY, StoreDep

router = APIRouter(prefix="/profiles", tags=["profiles"], dependencies=ADMIN_ONLY)


class ProfileUpdate(BaseModel):
    """Merged into the profile: given traits and consent replace those names only."""

    model_config = ConfigDict(extra="forbid")

    traits: dict[str, Any] | None = Field(None, examples=[{"first_name": "Ana"}])
    consent: dict[str, bool] | None = Field(
        None, description="By channel, e.g. {push: true}.", examples=[{"push": True}]
    )
    timezone: str | None = Field(None, max_length=64, examples=["Europe/Madrid"])
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


@router.put("/{customer_id}")
def upsert_profile(customer_id: str, update: ProfileUpdate, store: StoreDep) -> CustomerProfile:
    profile = store.upsert_profile(
        customer_id,
        traits=update.traits,
        consent=update.consent,
        timezone=update.timezone,
        locale=update.locale,
    )
    return CustomerProfile.model_validate(profile, from_attributes=True)


@router.get("/{customer_id}/messages")
def messages(customer_id: str, store: StoreDep) -> list[SentMessage]:
    """Oldest first; an unknown customer simply has none."""
    return [SentMessage.model_validate(row) for row in store.messages(customer_id=customer_id)]
