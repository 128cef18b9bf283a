"""What a customer did, as Hilo sees it: a named event with properties."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class CustomerEvent(BaseModel):
    """One event of one customer (``Cart Abandoned``, ``Order Completed`` ...)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, examples=["Cart Abandoned"])
    customer_id: str = Field(min_length=1, max_length=200, examples=["42"])
    properties: dict[str, Any] = Field(default_factory=dict)
    timestamp: datetime = Field(default_factory=lambda: datetime.now(UTC))
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
