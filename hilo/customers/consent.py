"""Consent: its defaults, where each channel's address lives on a profile, and the one writer
of a consent change (:func:`change_consent`), which every path that changes consent uses:
ingestion, the profiles API, unsubscribe links, the preference page, bounces, complaints and
STOP replies.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session

from hilo.db.models import ConsentChange, Profile
from hilo.db.store import queue_audience_exit

# Where no consent was recorded: email is opt-out (soft opt-in), the rest need an opt-in.
CONSENT_DEFAULTS = {
    "email": True,
    "sms": False,
    "whatsapp": False,
    "push": False,
    "webpush": False,
}
# The trait that holds a channel's address; push and web push reach devices instead.
ADDRESS_TRAITS = {"email": "email", "sms": "phone", "whatsapp": "phone"}
DEVICE_CHANNELS = frozenset({"push", "webpush"})
# What the customer chose on the preference page (frequency, pause, topics) is kept on the
# profile under this trait; the page is about marketing on this channel.
PREFERENCES_TRAIT = "preferences"
PREFERENCE_CHANNEL = "email"
# How far apart marketing on that channel may go out when the customer asked for less.
FREQUENCY_SPACING_DAYS = {"weekly": 7, "monthly": 30}

# The channels a customer can grant or withdraw consent for.
CONSENT_CHANNELS = ("email", "sms", "whatsapp", "push", "webpush")


def change_consent(
    session: Session,
    profile: Profile,
    channel: str,
    granted: bool,
    *,
    source: str,
    at: datetime,
    detail: str | None = None,
    topic: str | None = None,
    leave_audiences: bool = True,
) -> ConsentChange:
    """Write one consent statement on ``profile`` and return its audit row for the caller's
    transaction. A channel's consent lives on the profile; a topic's lives in the
    preferences, so a topic statement changes only the audit. Withdrawing a channel also
    queues the customer's removal from the ad audiences journeys added them to."""
    if topic is None:
        if leave_audiences and not granted and profile.consent.get(channel) is not False:
            queue_audience_exit(session, profile.customer_id, f"{channel} consent withdrawn", at)
        profile.consent = {**profile.consent, channel: granted}  # a new dict: JSON columns
    return ConsentChange(
        customer_id=profile.customer_id,
        channel=channel,
        granted=granted,
        topic=topic[:100] if topic else None,
        source=source[:100],
        detail=detail[:500] if detail else None,
        changed_at=at,
    )
