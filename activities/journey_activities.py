"""Activities of the journey workflow: every side effect a journey has.

Each is idempotent: Temporal may run an activity again after a crash, and the database
(unique message ids, upserts keyed by workflow id) turns the repeat into a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.providers import CaptureProvider, ChannelProvider
from hilo import templates
from hilo.journey_runs import (
    FINISH,
    LOAD_PROFILE,
    NEXT_WINDOW_OPENING,
    SEND_MESSAGE,
    UPDATE_PROFILE,
    FinishRequest,
    ProfileRequest,
    ProfileSnapshot,
    SendRequest,
    SendResult,
    UpdateProfileRequest,
    WindowOpening,
    WindowRequest,
)
from hilo.journeys import WEEKDAYS, TimeWindow
from hilo.storage import Message, Profile, Store

# Where no consent was recorded: email is opt-out (soft opt-in), the rest need an opt-in.
CONSENT_DEFAULTS = {"email": True, "sms": False, "whatsapp": False, "push": False}
ADDRESS_TRAITS = {"email": "email", "sms": "phone", "whatsapp": "phone"}


class JourneyActivities:
    def __init__(
        self,
        store: Store,
        providers: dict[str, ChannelProvider] | None = None,
        default_timezone: str = "UTC",
    ) -> None:
        self.store = store
        capture = CaptureProvider(store)
        self.providers: dict[str, ChannelProvider] = providers or {}
        self.fallback: ChannelProvider = capture
        self.default_timezone = default_timezone

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.finish,
            self.load_profile,
            self.send_message,
            self.update_profile,
            self.next_window_opening,
        ]

    @activity.defn(name=FINISH)
    def finish(self, request: FinishRequest) -> None:
        self.store.instance_ended(
            workflow_id=request.workflow_id,
            run_id=request.run_id,
            status=request.status,
            reason=request.reason,
            ended_at=request.ended_at,
            converted_at=request.converted_at,
            revenue=request.revenue,
            holdout=request.holdout,
        )

    @activity.defn(name=LOAD_PROFILE)
    def load_profile(self, request: ProfileRequest) -> ProfileSnapshot:
        return _snapshot(self.store.get_profile(request.customer_id), request.customer_id)

    @activity.defn(name=UPDATE_PROFILE)
    def update_profile(self, request: UpdateProfileRequest) -> None:
        self.store.upsert_profile(request.customer_id, traits=request.set, unset=request.unset)

    @activity.defn(name=NEXT_WINDOW_OPENING)
    def next_window_opening(self, request: WindowRequest) -> WindowOpening:
        profile = self.store.get_profile(request.customer_id)
        zone_name = (profile.timezone if profile else None) or self.default_timezone
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError):
            zone_name = self.default_timezone
            zone = ZoneInfo(zone_name)
        return WindowOpening(at=next_opening(request.now, request.window, zone), timezone=zone_name)

    @activity.defn(name=SEND_MESSAGE)
    def send_message(self, request: SendRequest) -> SendResult:
        stored, found = self.store.message_and_profile(request.message_id, request.customer_id)
        if stored is not None:
            # A retry after success: answer from the ledger, never call the provider again.
            return _result(stored)
        profile = _snapshot(found, request.customer_id)
        skip = self._skip_reason(request, profile)
        recipient = _recipient(request.channel, profile)
        if skip is None and request.channel in ADDRESS_TRAITS and not recipient:
            skip = f"no {ADDRESS_TRAITS[request.channel]} on the profile"
        rendered: dict[str, str] = {}
        if skip is None:
            context = {
                "profile": profile.as_context(),
                "customer": profile.traits,
                "trigger": request.trigger,
                "journey": {"key": request.journey_key, "version": request.journey_version},
                "message": {"id": request.message_id},
            }
            try:
                rendered = {
                    field: templates.render(source, context)
                    for field, source in request.content.items()
                }
            except Exception as error:  # a template that rendered at publish but not now
                raise ApplicationError(
                    f"{request.step_id}: template did not render: {error}",
                    type="TemplateError",
                    non_retryable=True,
                ) from error
        provider = self.providers.get(request.channel, self.fallback)
        message = Message(
            message_id=request.message_id,
            workflow_id=request.workflow_id,
            run_id=request.run_id,
            journey_key=request.journey_key,
            journey_version=request.journey_version,
            customer_id=request.customer_id,
            step_id=request.step_id,
            iteration=request.iteration,
            channel=request.channel,
            template=request.template,
            category=request.category,
            content=rendered,
            status="skipped" if skip else "sent",
            reason=skip,
            provider=provider.name,
            scheduled_at=request.scheduled_at,
        )
        if skip is None:
            message.provider_message_id = provider.deliver(request, recipient, rendered)
        return _result(self.store.record_message(message))

    def _skip_reason(self, request: SendRequest, profile: ProfileSnapshot) -> str | None:
        if request.channel not in CONSENT_DEFAULTS:
            return None
        consent = profile.consent.get(request.channel, CONSENT_DEFAULTS[request.channel])
        if request.category == "marketing" and consent is not True:
            return f"no {request.channel} consent"
        return None


def next_opening(now: datetime, window: TimeWindow, zone: ZoneInfo) -> datetime:
    """The first moment at or after ``now`` inside ``window`` in the customer's zone."""
    local = now.astimezone(zone)
    start_clock = time.fromisoformat(window.start)
    end_clock = time.fromisoformat(window.end)
    overnight = end_clock <= start_clock
    for offset in range(-1, 9):
        day = local.date() + timedelta(days=offset)
        if WEEKDAYS[day.weekday()] not in window.days:
            continue
        start = datetime.combine(day, start_clock, zone)
        end = datetime.combine(day + timedelta(days=1) if overnight else day, end_clock, zone)
        if start <= local < end:
            return now
        if local < start:
            return start
    raise AssertionError("a window with at least one day opens within a week")


def _snapshot(profile: Profile | None, customer_id: str) -> ProfileSnapshot:
    if profile is None:
        return ProfileSnapshot(customer_id=customer_id)
    return ProfileSnapshot(
        customer_id=customer_id,
        traits=profile.traits,
        consent=profile.consent,
        timezone=profile.timezone,
        locale=profile.locale,
    )


def _recipient(channel: str, profile: ProfileSnapshot) -> str | None:
    trait = ADDRESS_TRAITS.get(channel)
    value = profile.traits.get(trait) if trait else None
    return str(value) if value else None


def _result(message: Message) -> SendResult:
    status = message.status if message.status in ("sent", "skipped", "failed") else "sent"
    return SendResult(
        message_id=message.message_id,
        status=status,
        reason=message.reason,
        provider_message_id=message.provider_message_id,
    )
