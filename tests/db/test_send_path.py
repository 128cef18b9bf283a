"""The send path's reads and writes: the same on SQLite (driver calls) and PostgreSQL
(SQLAlchemy), and readable by the models the rest of Hilo uses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hilo.clock import utcnow
from hilo.db.store import Store
from hilo.policy import ContactPolicyService, SendIntent

SENT_AT = datetime(2026, 11, 24, 9, 30, 15, 123456, tzinfo=UTC)


def ledger_row(message_id: str, content: dict[str, str]) -> dict[str, object]:
    now = utcnow()
    return {
        "message_id": message_id,
        "workflow_id": "journey/cart/42/c1",
        "run_id": "run-1",
        "journey_key": "cart",
        "journey_version": 3,
        "customer_id": "42",
        "step_id": "first_reminder",
        "iteration": 1,
        "channel": "email",
        "template": "cart_reminder_1",
        "category": "marketing",
        "content": content,
        "status": "queued",
        "reason": None,
        "provider": "capture",
        "provider_message_id": None,
        "recipient": "ana@example.com",
        "attempts": 1,
        "scheduled_at": SENT_AT,
        "created_at": now,
        "sent_at": None,
        "delivered_at": None,
        "opened_at": None,
        "clicked_at": None,
        "updated_at": now,
    }


def test_a_send_reads_what_it_needs_across_a_merge(any_store: Store) -> None:
    any_store.upsert_profile(
        "42", traits={"email": "ana@example.com", "first_name": "Ana"}, consent={"email": True}
    )
    any_store.upsert_profile("anon-7", traits={"first_name": "?"})
    with any_store.engine.begin() as connection:
        connection.exec_driver_sql(
            "UPDATE profiles SET merged_into = '42' WHERE customer_id = 'anon-7'"
        )
    any_store.register_device("42", "push", "old-token")
    any_store.register_device("42", "push", "new-token", data={"platform": "android"})
    any_store.record_event(
        "evt-1", "anon-7", "Cart Abandoned", {"cart_id": "c1", "cart_value": 80}, SENT_AT, "api"
    )

    stored, profile, devices, event = any_store.message_and_profile(
        "msg-1", "anon-7", device_kind="push", event_id="evt-1"
    )
    assert stored is None
    assert profile is not None
    assert (profile.customer_id, profile.traits["first_name"], profile.consent) == (
        "42",
        "Ana",
        {"email": True},
    )
    assert [(d.address, d.data) for d in devices] == [
        ("new-token", {"platform": "android"}),
        ("old-token", {}),
    ]
    assert event is not None
    assert (event.name, event.properties["cart_value"]) == ("Cart Abandoned", 80)
    assert event.timestamp.replace(tzinfo=UTC) == SENT_AT
    assert any_store.profile_row("anon-7") == profile
    assert any_store.profile_row("nobody") is None


def test_queue_capture_and_outcome_write_rows_the_models_read(any_store: Store) -> None:
    any_store.upsert_profile("42", traits={"email": "ana@example.com"}, consent={"email": True})
    policy = ContactPolicyService(any_store)
    try:
        decision = policy.decide(
            SendIntent(
                message_id="msg-1",
                customer_id="42",
                journey_key="cart",
                channel="email",
                category="marketing",
            ),
            now=SENT_AT,
        )
        assert decision.outcome == "allow"
        first = {"subject": "You left Mug in your cart", "body": "Hi Ana"}
        assert any_store.queue_message(ledger_row("msg-1", first)) == first
        # A retry queues again: the first attempt's content is what goes out, counted twice.
        assert any_store.queue_message(ledger_row("msg-1", {"subject": "other"})) == first
        captured = {
            "message_id": "msg-1",
            "channel": "email",
            "template": "cart_reminder_1",
            "customer_id": "42",
            "journey_key": "cart",
            "step_id": "first_reminder",
            "recipient": "ana@example.com",
            "content": first,
            "captured_at": SENT_AT,
        }
        row_id = any_store.capture(captured)
        assert any_store.capture(captured) == row_id
        any_store.message_outcome(
            "msg-1",
            "sent",
            provider_message_id=f"capture-{row_id}",
            also=[policy.used_statement("msg-1")],
        )
        stored, _profile, _devices, _event = any_store.message_and_profile("msg-1", "42")
    finally:
        policy.close()

    assert stored is not None
    assert (stored.status, stored.provider_message_id, stored.content) == (
        "sent",
        f"capture-{row_id}",
        first,
    )
    [message] = any_store.messages("42")
    assert (message.status, message.attempts, message.content) == ("sent", 2, first)
    assert message.scheduled_at.replace(tzinfo=UTC) == SENT_AT
    assert message.sent_at is not None
    assert abs(message.sent_at.replace(tzinfo=UTC) - utcnow()) < timedelta(minutes=1)
    [capture] = any_store.captured("42")
    assert (capture.id, capture.content, capture.captured_at.replace(tzinfo=UTC)) == (
        row_id,
        first,
        SENT_AT,
    )
    with any_store.engine.connect() as connection:
        reservation = connection.exec_driver_sql(
            "SELECT status FROM contact_reservations WHERE message_id = 'msg-1'"
        ).scalar_one()
    assert reservation == "used"


def test_devices_reached_retired_and_audience_exits_on_both_databases(any_store: Store) -> None:
    from hilo.customers.profiles import record_consent
    from hilo.db.models import Message

    record_consent(any_store, "42", "push", True, "app", device="token-phone-0000000000000000")
    record_consent(any_store, "42", "push", True, "app", device="token-tablet-000000000000000")
    any_store.device_reached("msg_1", "fcm", "k-phone", "projects/p/messages/1")
    any_store.device_reached("msg_1", "fcm", "k-phone", "projects/p/messages/1")  # a retry
    any_store.device_reached("msg_2", "fcm", "k-tablet", "projects/p/messages/2")
    assert any_store.devices_reached("msg_1") == {"k-phone": "projects/p/messages/1"}
    assert any_store.retire_device("push", "token-phone-0000000000000000")
    assert not any_store.retire_device("push", "token-phone-0000000000000000")
    _, _, devices, _ = any_store.message_and_profile("msg_9", "42", "push", None)
    assert [device.address for device in devices] == ["token-tablet-000000000000000"]
    # A withdrawal queues an audience exit only once an audience message went out.
    record_consent(any_store, "42", "email", False, "support desk")
    assert any_store.outbox_batch(10) == []
    row = ledger_row("msg_3", {"audience": "vip", "action": "add"})
    row.update(channel="audience", status="sent", sent_at=SENT_AT)
    any_store.record_message(Message(**row))
    assert [m.message_id for m in any_store.audience_messages("42")] == ["msg_3"]
    record_consent(any_store, "42", "email", True, "support desk")
    record_consent(any_store, "42", "email", False, "support desk")
    [entry] = any_store.outbox_batch(10)
    assert (entry.kind, entry.customer_id, entry.payload) == (
        "audiences",
        "42",
        {"reason": "email consent withdrawn"},
    )
