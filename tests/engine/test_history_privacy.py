"""Personal data stays out of Temporal histories: inputs and activity results carry ids and
the few values a journey's conditions read, while messages still render with everything."""

from __future__ import annotations

import base64
import json
from typing import Any

from temporalio.client import WorkflowHistory

from activities.journey_activities import JourneyActivities
from hilo.db.store import Store
from hilo.devtools.simulation import JourneyLab
from hilo.events import CustomerEvent
from hilo.journeys.definitions import JourneyDefinition
from hilo.journeys.runs import ProfileRequest, only_paths, workflow_event
from hilo.journeys.validate import load_journey_yaml
from hilo.settings import PROJECT_ROOT
from tests.helpers.examples import example

EMAIL = "ana.private@example.com"
PHONE = "+34600111222"
BIRTHDAY = "1990-04-17"
STREET = "Calle Mayor 12, 3B"
SHIPPING = "Avenida del Puerto 7, Valencia"
PRIVATE = (EMAIL, PHONE, BIRTHDAY, STREET, SHIPPING)


def customer(lab: JourneyLab, customer_id: str) -> None:
    lab.store.upsert_profile(
        customer_id,
        traits={
            "email": EMAIL,
            "phone": PHONE,
            "birthday": BIRTHDAY,
            "address": {"street": STREET, "city": "Madrid"},
            "first_name": "Ana",
            "last_viewed_product": "Trail shoes",
            "favorite_category": "running",
        },
        consent={"email": True, "push": True},
    )
    lab.store.register_device(customer_id, "push", f"fcm-token-{customer_id}")


def journey_with_address(key: str, after: str) -> JourneyDefinition:
    """The example journey whose email after ``after`` also prints the trigger's shipping
    address: templates read it from the stored event, not from the workflow's input."""
    text = (PROJECT_ROOT / "examples" / "journeys" / f"{key}.yaml").read_text()
    assert text.count(after) == 1
    text = text.replace(after, f"{after} Ship to {{{{ trigger.properties.shipping_address }}}}.")
    text = text.replace(
        "  trigger:\n    properties: {",
        '  trigger:\n    properties: {shipping_address: "1 Sample St", ',
    )
    return load_journey_yaml(text, source=f"{key}.yaml")


def readable(history: WorkflowHistory) -> tuple[str, list[str]]:
    """The history as JSON, with every payload's bytes decoded to the text they hold; and
    those payloads."""
    payloads: list[str] = []

    def decode(node: Any) -> Any:
        if isinstance(node, dict):
            if isinstance(node.get("data"), str) and "metadata" in node:
                payloads.append(base64.b64decode(node["data"]).decode("utf-8", errors="replace"))
                return {**node, "data": payloads[-1]}
            return {key: decode(value) for key, value in node.items()}
        if isinstance(node, list):
            return [decode(item) for item in node]
        return node

    text = json.dumps(decode(json.loads(history.to_json())), ensure_ascii=False)
    return text, payloads


def assert_private(history: WorkflowHistory) -> None:
    text, _payloads = readable(history)
    raw = b"".join(event.SerializeToString() for event in history.events)
    found = [value for value in PRIVATE if value in text or value.encode() in raw]
    assert found == [], f"personal data in the history of {history.workflow_id}: {found}"


async def test_abandoned_cart_history_holds_no_personal_data(lab: JourneyLab) -> None:
    customer(lab, "private-cart")
    lab.publish(journey_with_address("abandoned_cart", "your cart is still here:"))
    route = await lab.send(
        "Cart Abandoned",
        "private-cart",
        cart_id="c1",
        cart_value=80,
        product_name="Mug",
        cart_url="https://shop.example/cart/c1",
        shipping_address=SHIPPING,
        email=EMAIL,
    )
    [workflow_id] = route.started
    result = await lab.result(workflow_id)
    assert (result.status, result.sent) == ("completed", 4)
    history = await lab.handles[workflow_id].fetch_history()
    assert_private(history)
    # What the conditions read is there: the push branch ran on the consent it read.
    _text, payloads = readable(history)
    assert '{"customer_id":"private-cart","traits":{},"consent":{"push":true}' in "".join(payloads)
    first = lab.store.captured("private-cart")[0]
    assert (first.template, first.recipient) == ("cart_reminder_1", EMAIL)
    assert "Hi Ana" in first.content["text"]
    assert f"Ship to {SHIPPING}." in first.content["text"]


async def test_abandoned_cart_purchase_still_ends_it_by_cart(lab: JourneyLab) -> None:
    customer(lab, "private-purchase")
    lab.publish(example("abandoned_cart"))
    route = await lab.send(
        "Cart Abandoned", "private-purchase", cart_id="c1", cart_value=80, shipping_address=SHIPPING
    )
    [workflow_id] = route.started
    await lab.send(
        "Order Completed", "private-purchase", cart_id="c2", total=10, shipping_address=SHIPPING
    )
    purchase = await lab.send(
        "Order Completed", "private-purchase", cart_id="c1", total=80, billing_address=STREET
    )
    assert purchase.signalled == [workflow_id]
    result = await lab.result(workflow_id)
    assert (result.status, result.converted) == ("exited", True)
    assert_private(await lab.handles[workflow_id].fetch_history())
    [instance] = lab.store.instances_of_customer("private-purchase")
    assert (instance.exit_reason, instance.revenue) == ("purchased", 80)


async def test_welcome_history_holds_no_personal_data(lab: JourneyLab) -> None:
    customer(lab, "private-welcome")
    lab.publish(journey_with_address("welcome", "thanks for joining us."))
    route = await lab.send(
        "Signed Up",
        "private-welcome",
        signup_source="website",
        preferences_url="https://shop.example/preferences",
        shipping_address=SHIPPING,
        phone=PHONE,
        birthday=BIRTHDAY,
    )
    [workflow_id] = route.started
    result = await lab.result(workflow_id)
    assert (result.status, result.sent) == ("completed", 3)
    assert_private(await lab.handles[workflow_id].fetch_history())
    sent = {m.template: m for m in lab.store.captured("private-welcome")}
    assert set(sent) == {"welcome_preferences", "welcome_viewed_products", "welcome_picks"}
    welcome = sent["welcome_preferences"]
    assert welcome.recipient == EMAIL
    assert "Hi Ana" in welcome.content["text"]
    assert f"Ship to {SHIPPING}." in welcome.content["text"]
    assert sent["welcome_picks"].content["subject"] == "Picked for you: the best of running"


def test_only_paths_keeps_what_a_lookup_would_find() -> None:
    profile = {
        "customer_id": "42",
        "traits": {"email": EMAIL, "address": {"street": STREET, "city": "Madrid"}, "tier": None},
        "consent": {"push": True, "email": True},
        "timezone": "Europe/Madrid",
    }
    paths = ["consent.push", "traits.address.city", "traits.tier", "traits.email.domain", "x.y"]
    assert only_paths(profile, paths) == {
        "consent": {"push": True},
        "traits": {"address": {"city": "Madrid"}, "tier": None},
    }
    # A path that names a whole object keeps it whole.
    assert only_paths(profile, ["traits.address"]) == {
        "traits": {"address": {"street": STREET, "city": "Madrid"}}
    }


def test_profile_reads_old_and_new(store: Store) -> None:
    store.upsert_profile(
        "42",
        traits={"email": EMAIL, "vip": True, "address": {"street": STREET}},
        consent={"push": True},
        timezone="Europe/Madrid",
    )
    activities = JourneyActivities(store)
    # Instances started before send the customer id alone and read the whole snapshot.
    old = activities.load_profile(ProfileRequest.model_validate_json('{"customer_id": "42"}'))
    assert (old.traits["email"], old.timezone) == (EMAIL, "Europe/Madrid")
    new = activities.load_profile(
        ProfileRequest(customer_id="42", paths=["traits.vip", "consent.push", "traits.tier"])
    )
    assert new.model_dump() == {
        "customer_id": "42",
        "traits": {"vip": True},
        "consent": {"push": True},
        "timezone": None,
        "locale": None,
    }


def test_a_signalled_event_keeps_what_the_rules_read() -> None:
    definition = example("abandoned_cart")
    event = CustomerEvent(
        name="Order Completed",
        customer_id="42",
        properties={"cart_id": "c1", "total": 80, "shipping_address": SHIPPING},
    )
    kept = workflow_event(definition, event, "event")
    assert kept.properties == {"cart_id": "c1", "total": 80}
    assert (kept.message_id, kept.timestamp, kept.name) == (
        event.message_id,
        event.timestamp,
        event.name,
    )
    trigger = CustomerEvent(
        name="Cart Abandoned",
        customer_id="42",
        properties={"cart_id": "c1", "cart_value": 400, "shipping_address": SHIPPING},
    )
    # The branch on cart_value and match_trigger's cart_id; the templates read the stored event.
    assert workflow_event(definition, trigger, "trigger").properties == {
        "cart_id": "c1",
        "cart_value": 400,
    }


def test_a_wait_for_outcome_hears_the_score_it_compares() -> None:
    definition = example("support_follow_up")
    answer = CustomerEvent(
        name="Survey Answered",
        customer_id="42",
        properties={"ticket_id": "t1", "score": 4, "comment": f"call me on {PHONE}"},
    )
    kept = workflow_event(definition, answer, "event")
    assert kept.properties == {"ticket_id": "t1", "score": 4}
