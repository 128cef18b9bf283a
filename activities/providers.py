"""Channel providers: where a rendered message leaves Hilo.

Only the capture provider lives here for now: it records each message in the database so
that development, simulation and tests can see exactly what a customer would receive.
"""

from __future__ import annotations

from typing import Protocol

from hilo.storage import CapturedMessage, Store


class OutgoingMessage(Protocol):
    message_id: str
    channel: str
    template: str
    customer_id: str
    journey_key: str
    step_id: str


class ChannelProvider(Protocol):
    name: str

    def deliver(
        self, message: OutgoingMessage, recipient: str | None, rendered: dict[str, str]
    ) -> str:
        """Hand the message over; return the provider's id for it. Idempotent per message id."""
        ...


class CaptureProvider:
    """Records messages instead of sending them; idempotent by message id like a real API."""

    name = "capture"

    def __init__(self, store: Store) -> None:
        self.store = store

    def deliver(
        self, message: OutgoingMessage, recipient: str | None, rendered: dict[str, str]
    ) -> str:
        captured = self.store.capture(
            CapturedMessage(
                message_id=message.message_id,
                channel=message.channel,
                template=message.template,
                customer_id=message.customer_id,
                journey_key=message.journey_key,
                step_id=message.step_id,
                recipient=recipient,
                content=rendered,
            )
        )
        return f"capture-{captured.id}"
