"""Envío Inteligente: the customer's best hour of the week, learned from their own engagement
events in their time zone, within a maximum delay and outside the global quiet hours, with a
fallback hour when there is too little data.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlmodel import col, select

from hilo.clock import as_utc
from hilo.db.models import (
    SendTimeChoice,
)
from hilo.db.store import Store
from hilo.journeys.durations import format_duration
from hilo.policy.document import ENGAGEMENT_LOOKBACK, BestTime, CurrentPolicy, zone_or_none
from hilo.policy.rules import Timing, hour_label


class BestSendTime:
    """The service's best-send-time questions (mixed into :class:`ContactPolicyService`)."""

    store: Store
    engagement_weights: dict[str, float]
    min_engagement_samples: int
    get_policy: Callable[[], CurrentPolicy]

    def best_send_time(
        self,
        customer_id: str,
        now: datetime,
        fallback_hour: int = 10,
        max_delay: timedelta = timedelta(hours=24),
        timezone: str | None = None,
        message_id: str | None = None,
    ) -> BestTime:
        """The customer's best hour within ``max_delay``, learned from their engagement.

        Candidates are the starts of the local hours from now to ``now + max_delay`` that the
        global quiet hours and allowed days permit (the current hour counts as now). Each
        scores its engagement in the same hour of the week, plus a seventh of its engagement
        in the same hour on any day; the highest wins, the earliest on a tie. With fewer than
        ``min_engagement_samples`` events, or none in reach, the fallback hour is used (now
        when it is out of reach). The choice and its reason are stored.
        """
        if not 0 <= fallback_hour <= 23:
            raise ValueError(f"fallback_hour: {fallback_hour} is not an hour; use 0-23")
        if max_delay < timedelta(0):
            raise ValueError("max_delay: must not be negative, e.g. timedelta(hours=24)")
        now = as_utc(now)
        policy = self.get_policy().policy
        profile = self.store.get_profile(customer_id)
        zone = (
            zone_or_none(timezone)
            or zone_or_none(profile.timezone if profile else None)
            or ZoneInfo(policy.default_timezone)
        )
        by_week: dict[int, float] = defaultdict(float)
        by_day: dict[int, float] = defaultdict(float)
        samples = 0
        for moment, name in self._engagement(customer_id, now):
            local = as_utc(moment).astimezone(zone)
            weight = self.engagement_weights[name]
            by_week[local.weekday() * 24 + local.hour] += weight
            by_day[local.hour] += weight
            samples += 1
        timings = [
            Timing(
                "global",
                policy.global_.quiet_hours,
                frozenset(policy.global_.allowed_days) if policy.global_.allowed_days else None,
            )
        ]
        candidates = [
            moment
            for moment in _hour_starts(now, now + max_delay, zone)
            if not timings[0].blocks(moment, zone)
        ] or [now]

        def hour_of(moment: datetime) -> int:
            local = moment.astimezone(zone)
            return local.weekday() * 24 + local.hour

        def score(moment: datetime) -> float:
            how = hour_of(moment)
            return by_week[how] + by_day[how % 24] / 7

        chosen: datetime | None = None
        reason = ""
        if samples >= self.min_engagement_samples:
            week_score = [by_week[how] + by_day[how % 24] / 7 for how in range(168)]
            best_how = max(range(168), key=lambda how: (week_score[how], -how))
            scored = [(score(moment), moment) for moment in candidates]
            top = max(value for value, _ in scored)
            if top > 0:
                chosen = next(moment for value, moment in scored if value == top)
                window = f"{samples} engagement events in {ENGAGEMENT_LOOKBACK.days} days"
                if top >= week_score[best_how]:
                    reason = f"learned: {hour_label(hour_of(chosen))} is their best hour ({window})"
                else:
                    reason = (
                        f"learned best hour {hour_label(best_how)} is beyond the maximum delay "
                        f"of {format_duration(max_delay)}; best in reach "
                        f"{hour_label(hour_of(chosen))} ({window})"
                    )
            else:
                reason = (
                    f"learned best hour {hour_label(best_how)} is beyond the maximum delay of "
                    f"{format_duration(max_delay)} and nothing in reach has engagement; "
                )
        else:
            reason = (
                f"too little engagement to learn from ({samples} events, "
                f"{self.min_engagement_samples} needed); "
            )
        fallback = chosen is None
        if chosen is None:
            in_reach = [m for m in candidates if m.astimezone(zone).hour == fallback_hour]
            if in_reach:
                chosen = in_reach[0]
                reason += f"fallback hour {fallback_hour:02d}:00 ({zone.key})"
            else:
                chosen = candidates[0]
                reason += (
                    f"fallback hour {fallback_hour:02d}:00 is not within "
                    f"{format_duration(max_delay)}: send at the first allowed moment"
                )
        result = BestTime(
            at=chosen,
            hour_of_week=hour_of(chosen),
            reason=reason,
            samples=samples,
            timezone=zone.key,
            fallback=fallback,
        )
        with self.store.session() as session:
            session.add(
                SendTimeChoice(
                    customer_id=customer_id,
                    message_id=message_id,
                    chosen_at=result.at,
                    hour_of_week=result.hour_of_week,
                    timezone=result.timezone,
                    reason=result.reason[:500],
                    samples=samples,
                    fallback=fallback,
                    decided_at=now,
                )
            )
            session.commit()
        return result

    def _engagement(self, customer_id: str, now: datetime) -> list[tuple[datetime, str]]:
        from hilo.db.models import StoredEvent

        with self.store.session() as session:
            rows = session.exec(
                select(StoredEvent.timestamp, StoredEvent.name)
                .where(
                    StoredEvent.customer_id == customer_id,
                    col(StoredEvent.name).in_(sorted(self.engagement_weights)),
                    col(StoredEvent.timestamp) >= now - ENGAGEMENT_LOOKBACK,
                    col(StoredEvent.timestamp) <= now,
                )
                .order_by(col(StoredEvent.timestamp).desc())
                .limit(5000)
            )
            return [(moment, name) for moment, name in rows]


def _hour_starts(start: datetime, end: datetime, zone: ZoneInfo) -> Iterator[datetime]:
    """``start`` itself, then the start of every later local hour up to ``end``."""
    local = start.astimezone(zone)
    hour = local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
    yield start
    moment = hour + timedelta(hours=1)
    while moment <= end:
        yield moment
        moment += timedelta(hours=1)


# ================================================================ audit
