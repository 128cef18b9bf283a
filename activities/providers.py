"""The capture provider: the default channel of ``hilo dev``, simulations and tests.

It records each message in the database instead of sending it, so that development sees
exactly what a customer would receive. Real providers live in :mod:`hilo.channels`.
"""

from __future__ import annotations

from hilo.channels.base import ChannelProvider, Delivery
from hilo.clock import utcnow
from hilo.db.store import Store

__all__ = ["CaptureProvider", "ChannelProvider"]


class CaptureProvider:
    """Records messages instead of sending them; idempotent by message id like a real API."""

    name = "capture"

    def __init__(self, store: Store) -> None:
        self.store = store

    def deliver(self, delivery: Delivery) -> str:
        row_id = self.store.capture(
            {
                "message_id": delivery.message_id,
                "channel": delivery.channel,
                "template": delivery.template,
                "customer_id": delivery.customer_id,
                "journey_key": delivery.journey_key,
                "step_id": delivery.step_id,
                "recipient": (delivery.recipient or "")[:320] or None,
                "content": delivery.content,
                "captured_at": utcnow(),
            }
        )
        return f"capture-{row_id}"
