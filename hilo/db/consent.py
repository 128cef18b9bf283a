"""The one writer of a consent change, which every path that changes consent uses: ingestion,
the profiles API, unsubscribe links, the preference page, bounces, complaints and STOP
replies. A change is the profile's new consent and an audit row that says who and why."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session

from hilo.db.models import ConsentChange, Profile
from hilo.db.outbox import queue_audience_exit

__all__ = ["change_consent"]


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
