"""What a customer did, as Hilo sees it: a named event with properties."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from hilo.clock import utcnow
from hilo.ids import MAX_ID_CHARS, customer_id_problem

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
    customer_id: str = Field(min_length=1, max_length=MAX_ID_CHARS, examples=["42"])
    properties: dict[str, Any] = Field(default_factory=dict)
    timestamp: Annotated[datetime, WithJsonSchema(DATE_TIME_OR_UNIX_TIME)] = Field(
        default_factory=lambda: utcnow(),
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

    @field_validator("customer_id")
    @classmethod
    def _fits_a_workflow_id(cls, value: str) -> str:
        problem = customer_id_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        # Naive timestamps are taken as UTC, as Segment does.
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        try:
            aware.astimezone(UTC)  # as it is stored; the event keeps its own offset
        except OverflowError:  # 0001-01-01 east of UTC, or 9999-12-31 west of it
            raise ValueError("leaves the years 1 to 9999 in UTC; give a date within them") from None
        return aware

    def as_context(self) -> dict[str, Any]:
        """The shape conditions and templates see under ``event``/``trigger``."""
        return {
            "name": self.name,
            "customer_id": self.customer_id,
            "properties": self.properties,
            "timestamp": self.timestamp.isoformat(),
            "message_id": self.message_id,
        }


# ---------------------------------------------------------------- the events Hilo emits

# Segment's spec names wherever the spec has one (its Email spec here), so a journey written
# for a Segment source reads the same. docs/events.md is this table (a test holds it so).
PAGE_VIEWED = "Page Viewed"
SCREEN_VIEWED = "Screen Viewed"
EMAIL_DELIVERED = "Email Delivered"
EMAIL_OPENED = "Email Opened"
EMAIL_LINK_CLICKED = "Email Link Clicked"
EMAIL_BOUNCED = "Email Bounced"
EMAIL_MARKED_AS_SPAM = "Email Marked as Spam"
UNSUBSCRIBED = "Unsubscribed"
PREFERENCES_UPDATED = "Preferences Updated"
SMS_READ = "SMS Read"
SMS_LINK_CLICKED = "SMS Link Clicked"
WHATSAPP_MESSAGE_READ = "WhatsApp Message Read"
WHATSAPP_LINK_CLICKED = "WhatsApp Link Clicked"
MESSAGE_OPENED = "Message Opened"
MESSAGE_LINK_CLICKED = "Message Link Clicked"

EMITTED_EVENTS: dict[str, str] = {
    PAGE_VIEWED: "A Segment `page` call (`/v1/page`), with its properties.",
    SCREEN_VIEWED: "A Segment `screen` call (`/v1/screen`), with its properties.",
    EMAIL_DELIVERED: "The email provider delivered an email (SendGrid's `delivered`).",
    EMAIL_OPENED: "An email was opened: Hilo's open pixel loaded, or the provider said so.",
    EMAIL_LINK_CLICKED: "A link in an email was followed: Hilo's click tracking, or the "
    "provider's; `url` is the target.",
    EMAIL_BOUNCED: "An email bounced (hard or soft); a hard bounce also suppresses the address.",
    EMAIL_MARKED_AS_SPAM: "The customer reported an email as spam; the address is suppressed.",
    UNSUBSCRIBED: "The customer left marketing on a channel (`channel`) or one topic "
    "(`topic`): Hilo's unsubscribe link, the preference page, or the provider.",
    PREFERENCES_UPDATED: "The customer saved the preference page: `frequency`, "
    "`pause_until`, `topics`.",
    SMS_READ: "An SMS was read (where the provider reports it).",
    SMS_LINK_CLICKED: "A tracked link in an SMS was followed.",
    WHATSAPP_MESSAGE_READ: "A WhatsApp message was read (blue ticks).",
    WHATSAPP_LINK_CLICKED: "A tracked link in a WhatsApp message was followed.",
    MESSAGE_OPENED: "Any other channel's message was opened.",
    MESSAGE_LINK_CLICKED: "A tracked link in any other channel's message was followed.",
}

# Names Segment's specs give common events (mobile lifecycle, e-commerce, email, B2B SaaS):
# what sources send, used to suggest a name when a journey names an event nobody sends.
SEGMENT_SPEC_EVENTS = frozenset(
    {
        "Application Installed",
        "Application Opened",
        "Application Backgrounded",
        "Application Updated",
        "Application Uninstalled",
        "Application Crashed",
        "Push Notification Received",
        "Push Notification Tapped",
        "Push Notification Bounced",
        "Products Searched",
        "Product List Viewed",
        "Product List Filtered",
        "Promotion Viewed",
        "Promotion Clicked",
        "Product Clicked",
        "Product Viewed",
        "Product Added",
        "Product Removed",
        "Cart Viewed",
        "Checkout Started",
        "Checkout Step Viewed",
        "Checkout Step Completed",
        "Payment Info Entered",
        "Order Updated",
        "Order Completed",
        "Order Refunded",
        "Order Cancelled",
        "Coupon Entered",
        "Coupon Applied",
        "Coupon Denied",
        "Coupon Removed",
        "Product Added to Wishlist",
        "Product Removed from Wishlist",
        "Wishlist Product Added to Cart",
        "Product Shared",
        "Cart Shared",
        "Product Reviewed",
        "Signed Up",
        "Signed In",
        "Signed Out",
        "Account Created",
        "Account Deleted",
        "Trial Started",
        "Trial Ended",
        *EMITTED_EVENTS,
    }
)
# Other tools' names for events Segment's specs name otherwise, to suggest the spec's name.
SPEC_NAME_FOR: dict[str, str] = {
    "App Opened": "Application Opened",
    "App Launched": "Application Opened",
    "App Installed": "Application Installed",
    "App Backgrounded": "Application Backgrounded",
    "Email Clicked": "Email Link Clicked",
    "Email Spam Reported": "Email Marked as Spam",
    "Email Unsubscribed": "Unsubscribed",
    "Order Placed": "Order Completed",
    "Purchase": "Order Completed",
    "Purchased": "Order Completed",
    "Added to Cart": "Product Added",
    "Add to Cart": "Product Added",
    "Viewed Product": "Product Viewed",
    "Started Checkout": "Checkout Started",
}
