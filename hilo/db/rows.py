"""Plain rows the send path reads: tuples, not models (building models was its cost)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple


class LedgerRow(NamedTuple):
    """What a send reads of its ledger row (a retry finds it)."""

    message_id: str
    status: str
    reason: str | None
    provider_message_id: str | None
    content: dict[str, Any]


class ProfileRow(NamedTuple):
    """What the journeys read of a profile."""

    customer_id: str
    traits: dict[str, Any]
    consent: dict[str, Any]
    timezone: str | None
    locale: str | None
    merged_into: str | None


class EventRow(NamedTuple):
    """What templates see of the triggering event."""

    message_id: str
    customer_id: str
    name: str
    properties: dict[str, Any]
    timestamp: datetime


class DeviceRow(NamedTuple):
    address: str
    data: dict[str, Any]
