"""The Segment Tracking API as Hilo takes it: its limits, the calls a client sends, what Hilo
keeps of them, and how a refusal is written back (Segment's own error body)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import IntEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.alias_generators import to_camel

from hilo.errors import Rejected
from hilo.events import PAGE_VIEWED, SCREEN_VIEWED
from hilo.ids import MAX_ID_CHARS

__all__ = [
    "AliasCall",
    "CALL_MODELS",
    "CALL_TYPES",
    "CallType",
    "FieldError",
    "GroupCall",
    "IdentifyCall",
    "KINDS",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_CALLS",
    "MAX_CALL_BYTES",
    "MAX_MESSAGE_ID_CHARS",
    "MAX_NESTING",
    "PageCall",
    "RejectionStatus",
    "ScreenCall",
    "SegmentCall",
    "SegmentContext",
    "SegmentRejected",
    "SegmentRequest",
    "TrackCall",
    "json_size",
    "segment_error_body",
    "segment_success_body",
]

CallType = Literal["track", "identify", "page", "screen", "group", "alias"]
CALL_TYPES: tuple[CallType, ...] = ("track", "identify", "page", "screen", "group", "alias")
KINDS: tuple[str, ...] = (*CALL_TYPES, "batch")

MAX_CALL_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_CALLS = 2500
# Segment asks for message ids of "fewer than 100 characters".
MAX_MESSAGE_ID_CHARS = 99
# Far deeper than any real call; keeps every later step (JSON encoding, storage) off the
# recursion limit.
MAX_NESTING = 64
# Deflate stores incompressible data at 5 bytes per 64 KB, plus an 18-byte gzip frame: a
# body within its limit never compresses to more than this over it.
_GZIP_SLACK = 1024
_MAX_GZIP_MEMBERS = 16
# The most a float can grow when a call is measured as compact JSON ("1e15" is sent,
# "1000000000000000.0" measured): at most 24 characters written, at least 3 read.
_FLOAT_GROWTH = 21

_ISO_HINT = "must be an ISO-8601 date-time string such as 2024-05-01T12:00:00.000Z"
_TYPE_HINT = "one of " + ", ".join(CALL_TYPES)
_PAGE_EVENTS = {"page": PAGE_VIEWED, "screen": SCREEN_VIEWED}


class RejectionStatus(IntEnum):
    """The HTTP status of a rejection. Segment itself answers 400 to oversized payloads;
    413 says what is wrong, and clients treat both as permanent (no retry)."""

    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    PAYLOAD_TOO_LARGE = 413
    UNSUPPORTED_MEDIA_TYPE = 415


class FieldError(BaseModel):
    """One problem: where it is (``batch[2].timestamp``, ``userId``, ``body``) and what
    would be right."""

    model_config = ConfigDict(frozen=True)

    field: str = Field(min_length=1, examples=["batch[2].timestamp"])
    message: str = Field(min_length=1, examples=[_ISO_HINT])


_TITLES = {
    RejectionStatus.BAD_REQUEST: "Invalid request",
    RejectionStatus.UNAUTHORIZED: "Missing or unusable write key",
    RejectionStatus.PAYLOAD_TOO_LARGE: "Payload too large",
    RejectionStatus.UNSUPPORTED_MEDIA_TYPE: "Unsupported Content-Encoding",
}


class SegmentRejected(Rejected):
    """The request as a whole is refused; ``errors`` lists every problem found in it."""

    def __init__(self, status: int, errors: list[FieldError]) -> None:
        self.status = status
        self.errors = errors
        super().__init__(self.message)

    @property
    def message(self) -> str:
        title = _TITLES.get(RejectionStatus(self.status), "Rejected")
        count = len(self.errors)
        problems = f"{count} problem{'s' if count != 1 else ''}"
        if count == 1:
            problems += f" ({self.errors[0].field} {self.errors[0].message})"
        return f"{title}: {problems}; nothing from this request was accepted"


def segment_error_body(rejected: SegmentRejected) -> dict[str, Any]:
    """The JSON body of a rejection: Segment's ``success``/``message`` plus our ``errors``."""
    return {
        "success": False,
        "message": rejected.message,
        "errors": [error.model_dump() for error in rejected.errors],
    }


def segment_success_body() -> dict[str, Any]:
    """What Segment's Tracking API answers with a 200."""
    return {"success": True}


_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON: how a call inside a batch is measured
    against the 32 KB limit (whitespace the client sent does not count against it)."""
    text = _COMPACT_JSON.encode(value)
    return len(text) if text.isascii() else len(text.encode())


# --- what a client sends ------------------------------------------------------------------


def _instant(value: Any) -> datetime:
    """An ISO-8601 string as an aware UTC datetime; naive ones are UTC, as Segment reads them."""
    if not isinstance(value, str):
        raise ValueError(_ISO_HINT)
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(_ISO_HINT) from None
    if "T" not in text and " " not in text:
        raise ValueError(f"{_ISO_HINT}; a date alone is not enough")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"is out of range; {_ISO_HINT}") from None


IsoDateTime = Annotated[datetime, BeforeValidator(_instant)]


class _SpecModel(BaseModel):
    # Strict: a number where a string belongs is a client bug to report, not to coerce.
    # Extra fields are kept, as Segment keeps them.
    model_config = ConfigDict(extra="allow", strict=True, alias_generator=to_camel)


class SegmentContext(_SpecModel):
    """``context`` as Segment's spec lists it; other keys are accepted as they are."""

    active: bool | None = None
    app: dict[str, Any] | None = None
    campaign: dict[str, Any] | None = None
    device: dict[str, Any] | None = None
    ip: str | None = None
    library: dict[str, Any] | None = None
    locale: str | None = None
    location: dict[str, Any] | None = None
    network: dict[str, Any] | None = None
    os: dict[str, Any] | None = None
    page: dict[str, Any] | None = None
    referrer: dict[str, Any] | None = None
    screen: dict[str, Any] | None = None
    timezone: str | None = None
    group_id: str | None = None
    traits: dict[str, Any] | None = None
    user_agent: str | None = None


class _CommonCall(_SpecModel):
    type: str | None = None
    message_id: str | None = Field(None, max_length=MAX_MESSAGE_ID_CHARS)
    # Hilo keys profiles by these ids: 200 characters is its column size.
    user_id: str | None = Field(None, max_length=MAX_ID_CHARS)
    anonymous_id: str | None = Field(None, max_length=MAX_ID_CHARS)
    timestamp: IsoDateTime | None = None
    original_timestamp: IsoDateTime | None = None
    sent_at: IsoDateTime | None = None
    context: SegmentContext | None = None
    # Values (true/false or a settings object) are checked by _integration_errors, which
    # can name the destination at fault.
    integrations: dict[str, Any] | None = None


class TrackCall(_CommonCall):
    event: str | None = Field(None, max_length=MAX_ID_CHARS)
    properties: dict[str, Any] | None = None


class IdentifyCall(_CommonCall):
    traits: dict[str, Any] | None = None


class PageCall(_CommonCall):
    name: str | None = None
    category: str | None = None
    properties: dict[str, Any] | None = None


class ScreenCall(PageCall):
    pass


class GroupCall(_CommonCall):
    group_id: str | None = None
    traits: dict[str, Any] | None = None


class AliasCall(_CommonCall):
    previous_id: str | None = Field(None, max_length=MAX_ID_CHARS)


CALL_MODELS: dict[str, type[_CommonCall]] = {
    "track": TrackCall,
    "identify": IdentifyCall,
    "page": PageCall,
    "screen": ScreenCall,
    "group": GroupCall,
    "alias": AliasCall,
}


# --- what Hilo keeps ----------------------------------------------------------------------


class SegmentCall(BaseModel):
    """One call, normalised: the same shape whatever type it is and however it was sent."""

    type: CallType
    message_id: str = Field(
        description="The client's messageId, the deduplication key; generated if absent."
    )
    user_id: str | None = None
    anonymous_id: str | None = None
    previous_id: str | None = Field(None, description="alias: the id being merged away.")
    group_id: str | None = Field(None, description="group: the account joined.")
    event: str | None = Field(
        None,
        description="track: its event; page/screen: 'Page Viewed'/'Screen Viewed'; otherwise None.",
    )
    properties: dict[str, Any] = Field(
        default_factory=dict,
        description="track/page/screen properties; page/screen also carry name and category.",
    )
    traits: dict[str, Any] = Field(
        default_factory=dict,
        description="The person's traits: identify's traits over context.traits, "
        "context.traits for every other type.",
    )
    group_traits: dict[str, Any] = Field(
        default_factory=dict,
        description="group: the account's traits (kept apart so they never reach a profile).",
    )
    context: dict[str, Any] = Field(
        default_factory=dict, description="The call's context, batch defaults merged in."
    )
    integrations: dict[str, Any] = Field(
        default_factory=dict, description="The call's integrations, batch defaults merged in."
    )
    timestamp: datetime = Field(
        description="When it happened, UTC, corrected for the client's clock skew."
    )
    original_timestamp: datetime | None = Field(
        None, description="The client's own timestamp, uncorrected."
    )
    sent_at: datetime | None = Field(None, description="The client's clock when it sent.")
    received_at: datetime = Field(description="The server's clock when the request came in.")
    timezone: str | None = Field(
        None, description="context.timezone when it is a known IANA zone, else None."
    )
    locale: str | None = None
    ip: str | None = None
    raw: dict[str, Any] = Field(
        description="The call's JSON object as received (without writeKey), for the archive; "
        "batch-level defaults are not merged into it."
    )


class SegmentRequest(BaseModel):
    """A whole request, accepted: its source's write key (not yet checked against any
    source) and its calls in the order sent."""

    write_key: str
    calls: list[SegmentCall]
