"""Journeys on the time-skipping server sending through real providers to local servers that
speak each provider's API: web push, every device of a customer, tokens the provider says are
gone, webhook steps' own URLs and ad audiences."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlmodel import select
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from activities.journey_activities import JourneyActivities
from hilo.channels.audiences import (
    GoogleAdsCustomerMatch,
    MetaCustomAudiences,
    oauth_credentials,
)
from hilo.channels.base import ChannelProvider
from hilo.channels.fcm import FcmPush, ServiceAccount
from hilo.channels.webpush import WebPush, vapid_public_key
from hilo.customers.profiles import record_consent
from hilo.db.models import Device
from hilo.db.store import Store
from hilo.devtools.simulation import JourneyLab
from hilo.feedback.deliveries import apply_preferences, unsubscribe
from hilo.feedback.links import LinkClaims
from hilo.feedback.preferences import PreferenceChange
from hilo.intake.dispatcher import Dispatcher
from hilo.journeys.runs import LeaveAudiencesResult
from hilo.journeys.validate import parse_journey
from hilo.policy import ContactPolicyService
from hilo.settings import Settings
from tests.fakes import (
    FakeFirebase,
    FakeGoogleAds,
    FakeMetaGraph,
    FakePushService,
    FakeWebhookReceiver,
    ProviderServer,
    Subscriber,
    device_token,
    fcm_error,
)
from worker.main import configured_activities
from workflows.journey import JourneyWorkflow

VAPID_KEY = ec.generate_private_key(ec.SECP256R1())
SECRET = "whsec-journey-secret"
FIREBASE_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def serve(server: ProviderServer) -> Iterator[Any]:
    server.start()
    yield server
    server.stop()
    assert server.problems == [], server.problems


@pytest.fixture
def push_server() -> Iterator[FakePushService]:
    yield from serve(FakePushService(vapid_public_key(VAPID_KEY)))


@pytest.fixture
def fcm_server() -> Iterator[FakeFirebase]:
    yield from serve(FakeFirebase(key=FIREBASE_KEY))


@asynccontextmanager
async def lab_with(
    env: WorkflowEnvironment,
    store: Store,
    providers: dict[str, ChannelProvider] | None = None,
    activities: JourneyActivities | None = None,
) -> AsyncIterator[JourneyLab]:
    activities = activities or JourneyActivities(store, providers=providers)
    async with JourneyLab.open(env, store, sandboxed=True, activities=activities) as lab:
        yield lab


def journey(key: str, *steps: dict[str, Any]) -> Any:
    return parse_journey(
        {"key": key, "name": key.replace("_", " ").title(), "trigger": {"event": "Poked"},
         "steps": list(steps)},
        source="test",
    )  # fmt: skip


def push_step(channel: str, step_id: str = "nudge") -> dict[str, Any]:
    return {
        "id": step_id,
        "type": "send",
        "channel": channel,
        "template": step_id,
        "title": "Still there, {{ profile.traits.first_name }}?",
        "body": "Your cart misses you",
        "url": "https://shop.example/cart",
    }


def active_devices(store: Store, customer: str) -> dict[str, bool]:
    with store.session() as session:
        rows = session.exec(select(Device).where(Device.customer_id == customer))
        return {row.address: row.active for row in rows}


def subscribe(store: Store, customer: str, browser: Subscriber) -> None:
    """Web push consent and the browser's subscription, as the site records them. (The local
    push service speaks http, which the API refuses: the subscription is stored directly.)"""
    record_consent(store, customer, "webpush", True, "web")
    subscription = json.loads(browser.subscription_json())
    store.register_device(
        customer, "webpush", subscription["endpoint"], {"keys": subscription["keys"]}
    )


async def run_once(lab: JourneyLab, customer: str) -> None:
    route = await lab.send("Poked", customer)
    (workflow_id,) = route.started
    assert (await lab.result(workflow_id)).status == "completed"


# ---------------------------------------------------------------- web push


async def test_a_journey_sends_web_push_to_every_subscribed_browser(
    time_env: WorkflowEnvironment, store: Store, push_server: FakePushService
) -> None:
    laptop, phone = push_server.subscribe(), push_server.subscribe()
    store.upsert_profile("ana", traits={"first_name": "Ana"})
    for browser in (laptop, phone):
        subscribe(store, "ana", browser)
    webpush = WebPush(VAPID_KEY, "mailto:ops@shop.example")
    async with lab_with(time_env, store, {"webpush": webpush}) as lab:
        lab.publish(journey("browser_nudge", push_step("webpush")))
        await run_once(lab, "ana")
    [message] = store.messages("ana")
    assert (message.channel, message.status, message.provider) == ("webpush", "sent", "webpush")
    assert sorted(item.subscriber.endpoint for item in push_server.messages) == sorted(
        [laptop.endpoint, phone.endpoint]
    )
    for item in push_server.messages:
        assert item.json() == {
            "title": "Still there, Ana?",
            "body": "Your cart misses you",
            "message_id": message.message_id,
            "url": "https://shop.example/cart",
        }


async def test_web_push_needs_consent_and_falls_back_to_capture(
    time_env: WorkflowEnvironment, store: Store, push_server: FakePushService
) -> None:
    browser = push_server.subscribe()
    store.upsert_profile("ana", traits={"first_name": "Ana"})
    store.upsert_profile("bea", traits={"first_name": "Bea"})
    subscribe(store, "ana", browser)
    async with lab_with(time_env, store, {}) as lab:
        lab.publish(journey("browser_nudge", push_step("webpush")))
        await run_once(lab, "ana")
        await run_once(lab, "bea")
    [captured] = store.captured("ana")
    assert captured.channel == "webpush"
    assert browser.endpoint in (captured.recipient or "")
    [skipped] = store.messages("bea")
    assert (skipped.status, skipped.reason) == ("skipped", "no webpush consent")


async def test_an_expired_subscription_is_switched_off_and_never_used_again(
    time_env: WorkflowEnvironment, store: Store, push_server: FakePushService
) -> None:
    kept, expired = push_server.subscribe(), push_server.subscribe()
    push_server.unsubscribe(expired)
    store.upsert_profile("ana", traits={"first_name": "Ana"})
    for browser in (kept, expired):
        subscribe(store, "ana", browser)
    webpush = WebPush(VAPID_KEY, "mailto:ops@shop.example")
    async with lab_with(time_env, store, {"webpush": webpush}) as lab:
        lab.publish(
            journey("browser_nudge", push_step("webpush", "first"), push_step("webpush", "second"))
        )
        await run_once(lab, "ana")
    assert active_devices(store, "ana") == {kept.endpoint: True, expired.endpoint: False}
    # The first send met the 410 and retired the subscription; the second never tried it.
    expired_path = expired.endpoint.removeprefix(push_server.url)
    to_expired = [r for r in push_server.received if r.path == expired_path]
    assert len(to_expired) == 1
    assert [item.subscriber.endpoint for item in push_server.messages] == [kept.endpoint] * 2
    assert {m.status for m in store.messages("ana")} == {"sent"}


# ---------------------------------------------------------------- mobile push (FCM)


def fcm_provider(server: FakeFirebase) -> FcmPush:
    return FcmPush(ServiceAccount.from_info(server.service_account()), base_url=server.url)


async def test_push_reaches_every_active_device_and_a_retry_skips_those_reached(
    time_env: WorkflowEnvironment, store: Store, fcm_server: FakeFirebase
) -> None:
    phone, tablet, old = device_token(), device_token(), device_token()
    store.upsert_profile("ana", traits={"first_name": "Ana"})
    record_consent(store, "ana", "push", True, "app", device=old)
    record_consent(store, "ana", "push", False, "app", device=old)  # signed out there
    for token in (phone, tablet):
        record_consent(store, "ana", "push", True, "app", device=token)
    # The second device's first attempt meets an outage: the retry must not push the first
    # device again.
    fcm_server.pass_next()
    fcm_server.fail_next(
        503, fcm_error(503, "UNAVAILABLE", "The service is unavailable.", "UNAVAILABLE")
    )
    async with lab_with(time_env, store, {"push": fcm_provider(fcm_server)}) as lab:
        lab.publish(journey("app_nudge", push_step("push")))
        await run_once(lab, "ana")
    # Newest device first: the tablet took it, the phone's outage was retried alone.
    assert [item["token"] for item in fcm_server.pushes] == [tablet, phone]
    [message] = store.messages("ana")
    assert message.status == "sent"
    assert message.attempts == 2
    assert (message.provider_message_id or "").startswith("projects/hilo-shop/messages/")


async def test_unregistered_and_invalid_tokens_are_retired(
    time_env: WorkflowEnvironment, store: Store, fcm_server: FakeFirebase
) -> None:
    phone, uninstalled = device_token(), device_token()
    fcm_server.unregistered.add(uninstalled)
    store.upsert_profile("ana", traits={"first_name": "Ana"})
    store.upsert_profile("bea", traits={"first_name": "Bea"})
    for token in (phone, uninstalled):
        record_consent(store, "ana", "push", True, "app", device=token)
    record_consent(store, "bea", "push", True, "app", device="garbled-token")
    async with lab_with(time_env, store, {"push": fcm_provider(fcm_server)}) as lab:
        lab.publish(journey("app_nudge", push_step("push", "first"), push_step("push", "second")))
        await run_once(lab, "ana")
        await run_once(lab, "bea")
    assert active_devices(store, "ana") == {phone: True, uninstalled: False}
    assert active_devices(store, "bea") == {"garbled-token": False}
    assert [item["token"] for item in fcm_server.pushes] == [phone, phone]
    tried = [r.json()["message"]["token"] for r in fcm_server.received if "messages" in r.path]
    assert tried.count(uninstalled) == 1 and tried.count("garbled-token") == 1
    # Bea's only device was gone: her first push failed with FCM's reason, the second found
    # no device at all.
    first, second = sorted(store.messages("bea"), key=lambda m: m.step_id)
    assert first.status == "failed" and "INVALID_ARGUMENT" in (first.reason or "")
    assert (second.status, second.reason) == ("skipped", "no push device on the profile")


# ---------------------------------------------------------------- webhooks


@pytest.fixture
def receiver() -> Iterator[FakeWebhookReceiver]:
    yield from serve(FakeWebhookReceiver(SECRET))


def webhook_step(url: str) -> dict[str, Any]:
    return {
        "id": "notify_crm",
        "type": "send",
        "channel": "webhook",
        "template": "crm_lead",
        "url": url,
        "body": "{{ profile.traits.first_name }} poked us",
    }


async def test_a_webhook_step_posts_signed_to_its_own_url(
    time_env: WorkflowEnvironment, store: Store, receiver: FakeWebhookReceiver
) -> None:
    # Only the secret: no HILO_WEBHOOK_URL, which used to send every webhook step to capture.
    settings = Settings(_env_file=None, webhook_secret=SECRET)
    store.upsert_profile("ana", traits={"first_name": "Ana"})
    async with lab_with(time_env, store, activities=configured_activities(store, settings)) as lab:
        lab.publish(journey("crm_sync", webhook_step(receiver.hook_url)))
        await run_once(lab, "ana")
    [event] = receiver.events
    assert event["content"] == {"url": receiver.hook_url, "body": "Ana poked us"}
    [message] = store.messages("ana")
    assert (message.status, message.provider, message.provider_message_id) == (
        "sent",
        "webhook",
        "evt_1",
    )
    assert store.captured("ana") == []


async def test_without_a_webhook_secret_webhook_steps_are_refused_never_sent_unsigned(
    time_env: WorkflowEnvironment, store: Store, receiver: FakeWebhookReceiver
) -> None:
    settings = Settings(_env_file=None)
    store.upsert_profile("ana", traits={"first_name": "Ana"})
    # Published after the worker started: the send is refused, with the reason on the ledger.
    async with lab_with(time_env, store, activities=configured_activities(store, settings)) as lab:
        lab.publish(journey("crm_sync", webhook_step(receiver.hook_url)))
        await run_once(lab, "ana")
    [message] = store.messages("ana")
    assert message.status == "failed"
    assert (message.reason or "").startswith("HILO_WEBHOOK_SECRET is not set")
    assert receiver.received == [] and store.captured("ana") == []
    # A worker started now refuses at once, naming the setting and the step.
    with pytest.raises(ValueError, match="HILO_WEBHOOK_SECRET is not set") as refused:
        configured_activities(store, settings)
    assert "crm_sync (steps[0] (notify_crm))" in str(refused.value)
    # With the secret it starts.
    configured_activities(store, Settings(_env_file=None, webhook_secret=SECRET))


# ---------------------------------------------------------------- ad audiences

META_AUDIENCE = "23851234567890"
ANA_EMAIL = ("EMAIL", hashlib.sha256(b"ana@example.com").hexdigest())
ANA_PHONE = ("PHONE", hashlib.sha256(b"447700900123").hexdigest())


@pytest.fixture
def meta_server() -> Iterator[FakeMetaGraph]:
    yield from serve(FakeMetaGraph())


@pytest.fixture
def ads_server() -> Iterator[FakeGoogleAds]:
    yield from serve(FakeGoogleAds())


def meta(server: FakeMetaGraph) -> MetaCustomAudiences:
    return MetaCustomAudiences(server.access_token, base_url=server.url)


def google_ads(server: FakeGoogleAds) -> GoogleAdsCustomerMatch:
    return GoogleAdsCustomerMatch(
        server.developer_token,
        server.customer_id,
        oauth_credentials(
            server.client_id, server.client_secret, server.refresh_token, server.token_url
        ),
        login_customer_id=server.login_customer_id,
        base_url=server.url,
    )


def audience_step(step_id: str, audience: str, action: str | None = None) -> dict[str, Any]:
    step = {"id": step_id, "type": "send", "channel": "audience", "template": step_id,
            "audience": audience}  # fmt: skip
    if action:
        step["action"] = action
    return step


def customer(store: Store, customer_id: str, **consent: bool) -> None:
    store.upsert_profile(
        customer_id,
        traits={"email": f"{customer_id.title()}@Example.com ", "phone": "+44 7700 900123"},
        consent=consent,
    )


async def test_an_audience_gets_only_customers_who_consented_and_are_not_suppressed(
    time_env: WorkflowEnvironment, store: Store, meta_server: FakeMetaGraph
) -> None:
    customer(store, "ana", sms=True)  # email by default (soft opt-in), phone by SMS consent
    customer(store, "bea", email=False)  # withdrew email, never gave SMS
    customer(store, "cai", sms=False)
    ContactPolicyService(store).suppress("email", "cai@example.com", "hard bounce", "sendgrid")
    customer(store, "dee", sms=True)
    apply_preferences(  # Dee left the topic the retargeting is about
        store,
        "dee",
        PreferenceChange(frequency="normal", pause_until=None, topics=["news"], opt_out=False),
    )
    async with lab_with(time_env, store, {"audience": meta(meta_server)}) as lab:
        lab.publish(
            journey(
                "retarget",
                {**audience_step("retarget", META_AUDIENCE), "topic": "promotions"},
                {"id": "later", "type": "wait", "duration": "1d"},
                audience_step("untarget", META_AUDIENCE, action="remove"),
            )
        )
        route = await lab.send("Poked", "ana")
        (workflow_id,) = route.started
        await lab.advance(timedelta(hours=1))
        assert meta_server.members[META_AUDIENCE] == {(ANA_EMAIL, ANA_PHONE)}
        assert (await lab.result(workflow_id)).status == "completed"
        await run_once(lab, "bea")
        await run_once(lab, "cai")
        await run_once(lab, "dee")
    # The remove step took Ana out again; Bea, Cai and Dee were never added (removing them,
    # which changes nothing, is always allowed).
    assert meta_server.members[META_AUDIENCE] == set()
    assert [r.method for r in meta_server.received] == ["POST"] + ["DELETE"] * 4
    skipped = {
        m.customer_id: m.reason
        for m in store.messages()
        if m.step_id == "retarget" and m.status == "skipped"
    }
    assert skipped == {
        "bea": "nothing to match the audience with: no email consent for its email; "
        "no sms or whatsapp consent for its phone",
        "cai": "nothing to match the audience with: email suppressed (hard bounce); "
        "no sms or whatsapp consent for its phone",
        "dee": "left topic: promotions",
    }


async def test_a_journey_that_exits_takes_the_customer_out_of_the_audiences_it_added(
    time_env: WorkflowEnvironment, store: Store, ads_server: FakeGoogleAds
) -> None:
    user_list = f"customers/{ads_server.customer_id}/userLists/555000111"
    customer(store, "ana")
    retarget = parse_journey(
        {"key": "cart_retarget", "name": "Cart retarget", "trigger": {"event": "Poked"},
         "exit": [{"event": "Order Completed", "reason": "purchased"}],
         "steps": [audience_step("retarget", "555000111"),
                   {"id": "linger", "type": "wait", "duration": "7d"}]},
        source="test",
    )  # fmt: skip
    async with lab_with(time_env, store, {"audience": google_ads(ads_server)}) as lab:
        lab.publish(retarget)
        route = await lab.send("Poked", "ana")
        (workflow_id,) = route.started
        await lab.advance(timedelta(days=1))
        assert ads_server.user_lists[user_list] == {
            ("hashedEmail", hashlib.sha256(b"ana@example.com").hexdigest())
        }
        await lab.send("Order Completed", "ana")
        result = await lab.result(workflow_id)
        history = await lab.handles[workflow_id].fetch_history()
    assert (result.status, result.reason) == ("exited", "purchased")
    # The patched exit replays on today's code.
    replayer = Replayer(workflows=[JourneyWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history)
    assert ads_server.user_lists[user_list] == set()
    removal = [m for m in store.messages("ana") if m.content.get("action") == "remove"]
    assert [(m.status, m.content["audience"]) for m in removal] == [("sent", "555000111")]


async def test_an_unsubscribe_takes_the_customer_out_of_every_audience(
    time_env: WorkflowEnvironment, store: Store, meta_server: FakeMetaGraph
) -> None:
    for who in ("ana", "bea", "cai"):
        customer(store, who)
    async with lab_with(time_env, store, {"audience": meta(meta_server)}) as lab:
        lab.publish(journey("retarget", audience_step("retarget", META_AUDIENCE)))
        await run_once(lab, "ana")
        await run_once(lab, "cai")
        cai_email = ("EMAIL", hashlib.sha256(b"cai@example.com").hexdigest())
        assert meta_server.members[META_AUDIENCE] == {(ANA_EMAIL,), (cai_email,)}
        # Ana and Bea (never in an audience: nothing to queue) use the unsubscribe link; Cai
        # withdraws through the consent API.
        for who in ("bea", "ana"):
            claims = LinkClaims(
                kind="unsubscribe", issued_at=datetime.now(UTC), customer_id=who, channel="email"
            )
            assert unsubscribe(store, claims, "unsubscribe link")
        record_consent(store, "cai", "email", False, "support desk")
        # The links also emit Unsubscribed, as events of their own.
        entries = store.outbox_batch(10)
        assert sorted((e.kind, e.customer_id) for e in entries) == [
            ("audiences", "ana"),
            ("audiences", "cai"),
            ("event", "ana"),
            ("event", "bea"),
        ]
        dispatcher = Dispatcher(store, lab.router)
        assert (await dispatcher.dispatch_once())[0] == 4
        left = [
            LeaveAudiencesResult.model_validate(
                await lab.client.get_workflow_handle(f"audiences/{entry.message_id}").result()
            )
            for entry in entries
            if entry.kind == "audiences"
        ]
    assert [result.removed for result in left] == [[META_AUDIENCE], [META_AUDIENCE]]
    assert meta_server.members[META_AUDIENCE] == set()
    assert [r.method for r in meta_server.received] == ["POST", "POST", "DELETE", "DELETE"]
