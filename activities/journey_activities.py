"""Activities of the journey workflow: every side effect a journey has.

Each is idempotent: Temporal may run an activity again after a crash, and the database
(unique message ids, upserts keyed by workflow id) turns the repeat into a no-op.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from liquid.exceptions import ResourceLimitError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.providers import CaptureProvider
from hilo import promotions
from hilo.channels.base import ChannelProvider, Delivery, PermanentFailure, RetryableFailure
from hilo.clock import utcnow
from hilo.customers.consent import (
    ADDRESS_TRAITS,
    CONSENT_DEFAULTS,
    DEVICE_CHANNELS,
    PREFERENCES_TRAIT,
)
from hilo.customers.identity import resolve_customer
from hilo.db.models import Message
from hilo.db.rows import DeviceRow, EventRow, LedgerRow, ProfileRow
from hilo.db.store import Store
from hilo.feedback.links import LinkSigner, rewrite_links
from hilo.journeys import templates
from hilo.journeys.definitions import WEEKDAYS, TimeWindow
from hilo.journeys.runs import (
    BEST_SEND_TIME,
    FINISH,
    LEAVE_AUDIENCES,
    LOAD_PROFILE,
    NEXT_WINDOW_OPENING,
    NOTE,
    SEND_MESSAGE,
    UPDATE_PROFILE,
    BestTimeAnswer,
    BestTimeRequest,
    FinishRequest,
    LeaveAudiencesRequest,
    LeaveAudiencesResult,
    NoteRequest,
    ProfileRequest,
    ProfileSnapshot,
    SendRequest,
    SendResult,
    UpdateProfileRequest,
    WindowOpening,
    WindowRequest,
    only_paths,
)
from hilo.policy import ContactPolicyService, SendIntent, left_topic
from hilo.settings import DEV_LINK_SECRET

# Channels that reach a person: these ask the contact policy. Webhooks, hand-offs and
# audience syncs are not messages to the customer.
POLICY_CHANNELS = frozenset({"email", "sms", "whatsapp", "push", "webpush"})
UNSIGNED_WEBHOOK = (
    "HILO_WEBHOOK_SECRET is not set: Hilo signs every webhook it sends (Standard Webhooks' "
    "webhook-signature) and sends none unsigned; set it to the secret the receiver checks"
)


class JourneyActivities:
    def __init__(
        self,
        store: Store,
        providers: dict[str, ChannelProvider] | None = None,
        default_timezone: str = "UTC",
        links: LinkSigner | None = None,
        signed_webhooks_only: bool = False,
    ) -> None:
        """``signed_webhooks_only``: a webhook step without the signed webhook provider
        (HILO_WEBHOOK_SECRET) fails instead of going to capture, as the worker runs it."""
        self.store = store
        self.signed_webhooks_only = signed_webhooks_only
        self.policy = ContactPolicyService(store)
        # Without settings (simulations, tests) links are signed with the published constant;
        # a running Hilo (hilo dev, hilo worker) always passes its settings' signer.
        self.links = links or LinkSigner(DEV_LINK_SECRET, "http://127.0.0.1:8000")
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
            self.best_send_time,
            self.note,
            self.leave_audiences,
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
            trigger_message_id=request.trigger_message_id,
        )

    @activity.defn(name=NOTE)
    def note(self, request: NoteRequest) -> None:
        # Summaries are written for people and may quote long property values.
        self.store.add_journey_note({**request.model_dump(), "summary": request.summary[:500]})

    @activity.defn(name=LOAD_PROFILE)
    def load_profile(self, request: ProfileRequest) -> ProfileSnapshot:
        snapshot = _snapshot(self.store.profile_row(request.customer_id), request.customer_id)
        if request.paths is None:
            return snapshot  # an instance started before paths were sent reads all of it
        kept = only_paths(snapshot.model_dump(mode="json"), request.paths)
        return ProfileSnapshot.model_validate({**kept, "customer_id": request.customer_id})

    @activity.defn(name=UPDATE_PROFILE)
    def update_profile(self, request: UpdateProfileRequest) -> None:
        self.store.upsert_profile(
            request.customer_id, traits=request.set, unset=request.unset, paths=True
        )

    @activity.defn(name=NEXT_WINDOW_OPENING)
    def next_window_opening(self, request: WindowRequest) -> WindowOpening:
        profile = self.store.profile_row(request.customer_id)
        zone_name = (profile.timezone if profile else None) or self.default_timezone
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError):
            zone_name = self.default_timezone
            zone = ZoneInfo(zone_name)
        return WindowOpening(at=next_opening(request.now, request.window, zone), timezone=zone_name)

    @activity.defn(name=BEST_SEND_TIME)
    def best_send_time(self, request: BestTimeRequest) -> BestTimeAnswer:
        """Envío Inteligente: the customer's best hour, and why (recorded with the choice)."""
        best = self.policy.best_send_time(
            resolve_customer(self.store, request.customer_id) or request.customer_id,
            request.now,
            fallback_hour=request.fallback_hour,
            max_delay=timedelta(seconds=request.max_delay_seconds),
            message_id=request.key,
        )
        return BestTimeAnswer(at=best.at, reason=best.reason, timezone=best.timezone)

    @activity.defn(name=LEAVE_AUDIENCES)
    def leave_audiences(self, request: LeaveAudiencesRequest) -> LeaveAudiencesResult:
        """Remove the customer from each audience a journey added them to and nothing removed
        them from since; with ``workflow_id``, only the audiences that instance added.

        Each removal is a ledger message whose id follows from the add's, sent like any other
        send: a retry returns the stored result instead of calling the platform again.
        """
        customer = resolve_customer(self.store, request.customer_id) or request.customer_id
        last: dict[str, Message] = {}
        for message in self.store.audience_messages(customer):
            last[message.content.get("audience", "")] = message
        result = LeaveAudiencesResult()
        for audience, added in last.items():
            if added.content.get("action", "add") != "add":
                continue
            if request.workflow_id is not None and (added.workflow_id, added.run_id) != (
                request.workflow_id,
                request.run_id,
            ):
                continue
            removal = SendRequest(
                message_id="msg_"
                + hashlib.sha256(f"{added.message_id}|leave".encode()).hexdigest()[:40],
                workflow_id=added.workflow_id,
                run_id=added.run_id,
                journey_key=added.journey_key,
                journey_version=added.journey_version,
                customer_id=customer,
                step_id=added.step_id,
                iteration=added.iteration,
                channel="audience",
                template=added.template,
                category="marketing",
                content={
                    "audience": audience,
                    "action": "remove",
                    "match": added.content.get("match", ""),
                },
                trigger={},
                scheduled_at=request.scheduled_at,
            )
            sent = self.send_message(removal)
            if sent.status == "sent":
                result.removed.append(audience)
            else:
                result.skipped.append(f"{audience}: {sent.reason}")
        return result

    @activity.defn(name=SEND_MESSAGE)
    def send_message(self, request: SendRequest) -> SendResult:
        """Send one message exactly once, as far as the provider allows.

        The ledger row is written (``queued``) before the provider is called and completed
        after. A retry finds the row: when it is complete, the stored result is returned and
        the provider is not called; when it is still ``queued`` (the worker died while the
        provider answered) the provider is called again with the same idempotency key, the
        message id, so that a provider honouring it delivers once.
        """
        stored, found, devices, trigger = self.store.message_and_profile(
            request.message_id,
            request.customer_id,
            request.channel if request.channel in DEVICE_CHANNELS else None,
            event_id=request.trigger_message_id if request.trigger is None else None,
        )
        if stored is not None and stored.status != "queued":
            return _result(stored)
        profile = _snapshot(found, request.customer_id)
        provider = self._provider(request.channel)
        if request.channel == "webhook" and provider is self.fallback and self.signed_webhooks_only:
            reason = UNSIGNED_WEBHOOK
            refused = Message(**self._ledger_row(request, provider, reason))
            refused.status = "failed"
            self.store.record_message(refused)
            raise ApplicationError(
                f"{request.step_id}: {reason}", type="WebhookNotSigned", non_retryable=True
            )
        recipient = _recipient(request.channel, profile, devices)
        matched: dict[str, Any] = {}
        skip = None
        if request.channel == "audience" and request.content.get("action", "add") == "add":
            # Only the addresses the customer may be marketed on go to an ad platform.
            matched, unusable = self._audience_identifiers(profile)
            recipient = str(matched.get("email") or matched.get("phone") or "") or None
            if not matched and unusable:
                skip = f"nothing to match the audience with: {unusable}"
            elif request.topic and left_topic(profile.traits.get(PREFERENCES_TRAIT), request.topic):
                skip = f"left topic: {request.topic}"  # as the contact policy says it
        elif request.channel == "audience" and request.content.get("match"):
            # Leaving: by the identifiers the add used, so the platform finds the same member.
            names = request.content["match"].split(",")
            matched = {name: profile.traits[name] for name in names if profile.traits.get(name)}
        skip = skip or self._skip_reason(request, profile, recipient)
        if skip is None and stored is None and _mentions_promotions(request.content):
            # An offer that expired since publish is not sent, whatever the policy says.
            skip = promotions.send_blockers(
                self.store, request.content, request.scheduled_at, request.channel
            )
        if skip is None and stored is None and request.channel in POLICY_CHANNELS:
            # First attempt: the contact policy decides (a retry of an allowed send finds
            # its queued row above and goes straight to the provider).
            decision = self.policy.decide(
                SendIntent(
                    message_id=request.message_id,
                    customer_id=profile.customer_id,
                    journey_key=request.journey_key,
                    channel=request.channel,
                    category=request.category,
                    ignore_policy=request.ignore_policy,
                    address=recipient if request.channel in ADDRESS_TRAITS else None,
                    topic=request.topic,
                ),
                now=request.scheduled_at,
            )
            if decision.outcome == "defer":
                return SendResult(
                    message_id=request.message_id,
                    status="deferred",
                    reason=decision.reason,
                    defer_until=decision.defer_until,
                    rule=decision.rule,
                )
            if decision.outcome == "skip":
                skip = decision.reason
        if skip is not None:
            return _result(
                self.store.record_message(Message(**self._ledger_row(request, provider, skip)))
            )
        links = self.links.message_links(
            request.message_id,
            profile.customer_id,
            request.channel,
            templates=request.content.values(),
        )
        unsubscribe_url = links["unsubscribe_url"]
        content = (
            stored.content
            if stored is not None
            else self._render(request, profile, links, _trigger_context(request, trigger))
        )
        if stored is None and request.channel == "audience" and matched:
            content = {**content, "match": ",".join(sorted(matched))}
        # The ledger keeps the message as rendered; providers get it in their shape.
        outgoing = self.store.queue_message(
            self._ledger_row(request, provider, None, content=content, recipient=recipient)
        )
        if request.channel == "email":
            outgoing = templates.email_parts(outgoing, request.content)
            if "html" in outgoing and request.category == "marketing":
                outgoing["html"] = rewrite_links(
                    outgoing["html"],
                    request.message_id,
                    self.links,
                    template=request.content.get("body", ""),
                )
        delivery = Delivery(
            message_id=request.message_id,
            channel=request.channel,
            customer_id=profile.customer_id,
            journey_key=request.journey_key,
            step_id=request.step_id,
            template=request.template,
            category=request.category,
            recipient=recipient,
            content=outgoing,
            profile=(
                {**_without_addresses(profile.traits), **matched}
                if request.channel == "audience" and matched
                else profile.traits
            ),
            unsubscribe_url=unsubscribe_url if request.category == "marketing" else None,
        )
        try:
            if request.channel in DEVICE_CHANNELS:
                provider_message_id = self._deliver_to_devices(provider, delivery, devices)
            else:
                provider_message_id = provider.deliver(delivery)
        except PermanentFailure as failure:
            self.store.message_outcome(request.message_id, "failed", reason=failure.reason)
            self.policy.release(request.message_id, f"failed: {failure.reason}")
            raise ApplicationError(
                f"{request.step_id}: {provider.name} refused the message: {failure.reason}",
                type="PermanentDeliveryFailure",
                non_retryable=True,
            ) from failure
        except RetryableFailure as failure:
            info = activity.info()
            last = info.retry_policy is not None and info.attempt >= (
                info.retry_policy.maximum_attempts or 10**9
            )
            if last:
                self.store.message_outcome(request.message_id, "failed", reason=failure.reason)
                self.policy.release(request.message_id, f"failed: {failure.reason}")
            raise ApplicationError(
                f"{request.step_id}: {provider.name} failed, will retry: {failure.reason}",
                type="RetryableDeliveryFailure",
                non_retryable=last,
                next_retry_delay=(
                    timedelta(seconds=failure.retry_after) if failure.retry_after else None
                ),
            ) from failure
        self.store.message_outcome(
            request.message_id,
            "sent",
            provider_message_id=provider_message_id,
            also=(
                [self.policy.used_statement(request.message_id)]
                if request.channel in POLICY_CHANNELS
                else []
            ),
        )
        return SendResult(
            message_id=request.message_id, status="sent", provider_message_id=provider_message_id
        )

    def _deliver_to_devices(
        self, provider: ChannelProvider, delivery: Delivery, devices: list[DeviceRow]
    ) -> str:
        """One provider call per active device of the customer; the first provider id.

        Each acceptance is recorded before the next call, so a retry after a retryable
        failure (or a crash) skips the devices that already have the message. A device whose
        token or subscription the provider says is gone is switched off and never used again;
        the message fails only when no device took it.
        """
        reached = self.store.devices_reached(delivery.message_id) if len(devices) > 1 else {}
        accepted: list[str] = []
        refused: list[str] = []
        for device in devices:
            key = hashlib.sha256(device.address.encode()).hexdigest()[:32]
            if key in reached:
                accepted.append(reached[key])
                continue
            recipient = _device_recipient(delivery.channel, device)
            try:
                provider_message_id = provider.deliver(replace(delivery, recipient=recipient))
            except PermanentFailure as failure:
                if failure.recipient_gone:
                    self.store.retire_device(delivery.channel, device.address)
                refused.append(failure.reason)
                continue
            if len(devices) > 1:
                self.store.device_reached(
                    delivery.message_id, provider.name, key, provider_message_id
                )
            accepted.append(provider_message_id)
        if not accepted:
            raise PermanentFailure("; ".join(refused) or f"no {delivery.channel} device")
        return accepted[0]

    def _provider(self, channel: str) -> ChannelProvider:
        provider = self.providers.get(channel)
        webhook = self.providers.get("webhook")
        if provider is None and channel == "handoff" and getattr(webhook, "url", None):
            provider = webhook  # a helpdesk hears hand-offs at HILO_WEBHOOK_URL
        return provider or self.fallback

    def _render(
        self,
        request: SendRequest,
        profile: ProfileSnapshot,
        links: dict[str, str],
        trigger: dict[str, Any],
    ) -> dict[str, str]:
        context = {
            **links,
            "profile": profile.as_context(),
            "customer": profile.traits,
            "trigger": trigger,
            "journey": {"key": request.journey_key, "version": request.journey_version},
            "message": {"id": request.message_id},
        }
        if _mentions_promotions(request.content):
            context.update(
                promotions.template_context_extras(
                    self.store, request.scheduled_at, request.channel
                )
            )
        try:
            return templates.render_content(
                request.channel, request.template, request.content, context
            )
        except Exception as error:  # a template that rendered at publish but not now
            reason = (
                templates.limit_reached(error)
                if isinstance(error, ResourceLimitError)
                else str(error)
            )
            raise ApplicationError(
                f"{request.step_id}: template did not render: {reason}",
                type="TemplateError",
                non_retryable=True,
            ) from error

    def _ledger_row(
        self,
        request: SendRequest,
        provider: ChannelProvider,
        skip: str | None,
        content: dict[str, str] | None = None,
        recipient: str | None = None,
    ) -> dict[str, Any]:
        """Every column of the message's ledger row (Message), as the store writes it."""
        now = utcnow()
        return {
            "message_id": request.message_id,
            "workflow_id": request.workflow_id,
            "run_id": request.run_id,
            "journey_key": request.journey_key,
            "journey_version": request.journey_version,
            "customer_id": request.customer_id,
            "step_id": request.step_id,
            "iteration": request.iteration,
            "channel": request.channel,
            "template": request.template,
            "category": request.category,
            "content": content or {},
            "status": "skipped" if skip else "queued",
            "reason": skip,
            "provider": provider.name,
            "provider_message_id": None,
            "recipient": recipient,
            "attempts": 0 if skip else 1,
            "scheduled_at": request.scheduled_at,
            "created_at": now,
            "sent_at": None,
            "delivered_at": None,
            "opened_at": None,
            "clicked_at": None,
            "updated_at": now,
        }

    def _audience_identifiers(self, profile: ProfileSnapshot) -> tuple[dict[str, Any], str]:
        """The email and phone an audience may match the customer by, and why others may not.

        Email needs email consent (soft opt-in: not withdrawn), a phone SMS or WhatsApp
        consent; a suppressed address is never uploaded.
        """
        usable: dict[str, Any] = {}
        unusable: list[str] = []
        for trait, channels in (("email", ("email",)), ("phone", ("sms", "whatsapp"))):
            value = profile.traits.get(trait)
            if not value:
                continue
            consented = [
                channel
                for channel in channels
                if profile.consent.get(channel, CONSENT_DEFAULTS[channel]) is True
            ]
            if not consented:
                unusable.append(f"no {' or '.join(channels)} consent for its {trait}")
                continue
            suppressed = [
                row
                for channel in consented
                for row in self.policy.suppressions(channel, str(value), limit=1)
            ]
            if suppressed:
                unusable.append(f"{trait} suppressed ({suppressed[0].reason})")
                continue
            usable[trait] = value
        return usable, "; ".join(unusable)

    def _skip_reason(
        self, request: SendRequest, profile: ProfileSnapshot, recipient: str | None
    ) -> str | None:
        if request.channel in CONSENT_DEFAULTS:
            # As the contact policy reads consent: marketing needs it on every channel;
            # transactional messages need it where the channel is opt-in (all but email).
            default = CONSENT_DEFAULTS[request.channel]
            consent = profile.consent.get(request.channel, default)
            needs = request.category == "marketing" or not default
            if needs and consent is not True:
                return f"no {request.channel} consent"
        if recipient:
            return None
        if request.channel in ADDRESS_TRAITS:
            return f"no {ADDRESS_TRAITS[request.channel]} on the profile"
        if request.channel in DEVICE_CHANNELS:
            return f"no {request.channel} device on the profile"
        if request.channel == "audience":
            return "no email or phone to match an audience with"
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


def _snapshot(profile: ProfileRow | None, customer_id: str) -> ProfileSnapshot:
    if profile is None:
        return ProfileSnapshot(customer_id=customer_id)
    return ProfileSnapshot(
        customer_id=customer_id,
        traits=profile.traits,
        consent=profile.consent,
        timezone=profile.timezone,
        locale=profile.locale,
    )


def _mentions_promotions(content: dict[str, str]) -> bool:
    # Most messages name no promotion: skip the promotions table for them.
    return any("promotions" in source for source in content.values())


def _trigger_context(request: SendRequest, event: EventRow | None) -> dict[str, Any]:
    """What templates see under ``trigger`` (from the stored event's row): the same shape as
    CustomerEvent.as_context()."""
    if request.trigger is not None:
        return request.trigger
    if event is None:
        return {}
    moment = event.timestamp if event.timestamp.tzinfo else event.timestamp.replace(tzinfo=UTC)
    return {
        "name": event.name,
        "customer_id": event.customer_id,
        "properties": event.properties,
        "timestamp": moment.isoformat(),
        "message_id": event.message_id,
    }


def _recipient(channel: str, profile: ProfileSnapshot, devices: list[DeviceRow]) -> str | None:
    trait = ADDRESS_TRAITS.get(channel)
    if trait:
        value = profile.traits.get(trait)
        return str(value) if value else None
    if channel in DEVICE_CHANNELS:
        # The ledger names the newest device; the send goes to every one of them.
        return _device_recipient(channel, devices[0]) if devices else None
    if channel == "audience":
        value = profile.traits.get("email") or profile.traits.get("phone")
        return str(value) if value else None
    return None


def _without_addresses(traits: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in traits.items() if name not in ("email", "phone")}


def _device_recipient(channel: str, device: DeviceRow) -> str:
    """An FCM token as it is; a web-push subscription as PushSubscription.toJSON() gives it."""
    if channel == "webpush":
        return json.dumps({"endpoint": device.address, "keys": device.data.get("keys", {})})
    return device.address


def _result(message: Message | LedgerRow) -> SendResult:
    # Feedback (delivered, opened ...) may have moved the row on: to the journey it was sent.
    status = message.status if message.status in ("sent", "skipped", "failed") else "sent"
    return SendResult(
        message_id=message.message_id,
        status=status,
        reason=message.reason,
        provider_message_id=message.provider_message_id,
    )
