"""A Standard Webhooks receiver, as Make, n8n or a helpdesk would run one."""

from __future__ import annotations

from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from hilo.channels.webhook import receiver_secret
from tests.fakes.server import ProviderServer, Received, Rejected, Reply

# Signed webhooks ---------------------------------------------------------------------------


class FakeWebhookReceiver(ProviderServer):
    """An automation tool's catch hook that checks our signature and honours Idempotency-Key."""

    def __init__(self, secret: str = "whsec-test-secret", tolerance: int = 300) -> None:
        super().__init__()
        self.secret = secret
        self.tolerance = tolerance
        self.idempotency_keys: list[str] = []  # every key received, repeats included
        self.events: list[dict[str, Any]] = []  # acted on, once per key
        self._answers: dict[str, Reply] = {}

    @property
    def hook_url(self) -> str:
        return f"{self.url}/hooks/hilo"

    def handle(self, request: Received) -> Reply:
        if (request.method, request.path) != ("POST", "/hooks/hilo"):
            raise Rejected(Reply(404, "not found"), "unknown path")
        if request.headers.get("content-type") != "application/json":
            raise Rejected(Reply(415, "JSON only"), "not JSON")
        # Verified as a receiver would: the Standard Webhooks library, our whsec_ secret.
        try:
            Webhook(receiver_secret(self.secret)).verify(request.body, dict(request.headers))
        except WebhookVerificationError as error:
            raise Rejected(Reply(401, "invalid signature"), "signature") from error
        if request.headers.get("webhook-id") != request.headers.get("idempotency-key"):
            raise Rejected(Reply(400, "webhook-id and Idempotency-Key differ"), "ids")
        key = request.headers.get("idempotency-key")
        if not key:
            raise Rejected(Reply(400, "Idempotency-Key required"), "no Idempotency-Key")
        self.idempotency_keys.append(key)
        if key in self._answers:
            return self._answers[key]
        if (failure := self.take_failure()) is not None:
            return failure
        self.events.append(request.json())
        answer = Reply(200, {"id": f"evt_{len(self.events)}", "status": "accepted"})
        self._answers[key] = answer
        return answer
