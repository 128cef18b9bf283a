"""What a customer did, as Hilo sees it: a named event with properties."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

# What pydantic reads as a datetime, as the JSON Schema says it: an ISO-8601 string, or Unix
# time (seconds; milliseconds past 2e10) from the year 1 to the end of 9999.
DATE_TIME_OR_UNIX_TIME: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "format": "date-time"},
        {"type": "number", "minimum": -62135596800000, "exclusiveMaximum": 253402300800000},
    ]
}


class CustomerEvent(BaseModel):
    """One event of one customer (``Cart Abandoned``, ``Order Completed`` ...)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, examples=["Cart Abandoned"])
    customer_id: str = Field(min_length=1, max_length=200, examples=["42"])
    properties: dict[str, Any] = Field(default_factory=dict)
    timestamp: Annotated[datetime, WithJsonSchema(DATE_TIME_OR_UNIX_TIME)] = Field(
        default_factory=lambda: datetime.now(UTC),
        description="ISO-8601 (without an offset it is UTC), or Unix time.",
    )
    message_id: str = Field(
        default_factory=lambda: f"evt_{uuid.uuid4().hex}",
        min_length=1,
        max_length=200,
        description="Deduplication key: a known message_id is stored and routed once.",
    )
    source: str = Field("api", max_length=100)

    @field_validator("name", "customer_id")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        # Naive timestamps are taken as UTC, as Segment does.
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    def as_context(self) -> dict[str, Any]:
        """The shape conditions and templates see under ``event``/``trigger``."""
        return {
            "name": self.name,
            "customer_id": self.customer_id,
            "properties": self.properties,
            "timestamp": self.timestamp.isoformat(),
            "message_id": self.message_id,
        }
