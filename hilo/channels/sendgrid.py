"""Email through SendGrid's v3 Mail Send API (``POST /v3/mail/send``).

SendGrid has no idempotency key: a retry after a timeout may send the email twice.
``custom_args.message_id`` at least ties every copy and every event webhook back to
our message.
"""

from __future__ import annotations

import time
from email.utils import parseaddr
from typing import Any

import httpx

from hilo.channels.base import (
    DEFAULT_TIMEOUT_SECONDS,
    Delivery,
    PermanentFailure,
    RetryableFailure,
    email_address,
    error_detail,
    failure_for_response,
    http_client,
    list_unsubscribe_headers,
    send,
)

__all__ = ["SendGridEmail"]


class SendGridEmail:
    name = "sendgrid"

    def __init__(
        self,
        api_key: str,
        *,
        sender: str,
        base_url: str = "https://api.sendgrid.com",
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        sender_name, sender_address = parseaddr(sender)
        if "@" not in sender_address:
            raise ValueError(
                f"SendGrid sender {sender!r} is not an email address like news@shop.com"
            )
        self.sender: dict[str, str] = {"email": sender_address}
        if sender_name:
            self.sender["name"] = sender_name
        self.url = base_url.rstrip("/") + "/v3/mail/send"
        self.client = http_client(timeout, headers={"Authorization": f"Bearer {api_key}"})

    def deliver(self, delivery: Delivery) -> str:
        response = send(
            self.client,
            "POST",
            self.url,
            provider=self.name,
            failure=_failure,
            json=self.payload(delivery),
        )
        # 202 Accepted carries no body; the id comes in a header.
        return response.headers.get("X-Message-Id") or delivery.message_id

    def payload(self, delivery: Delivery) -> dict[str, Any]:
        to = email_address(delivery, self.name)
        content = [
            {"type": kind, "value": delivery.content[field]}
            for kind, field in (("text/plain", "text"), ("text/html", "html"))
            if delivery.content.get(field)
        ]
        if not content:
            raise PermanentFailure(f"sendgrid: {delivery.step_id} rendered neither text nor html")
        payload: dict[str, Any] = {
            "personalizations": [{"to": [{"email": to}]}],
            "from": self.sender,
            "subject": delivery.content.get("subject", ""),
            "content": content,  # SendGrid wants text/plain before text/html
            "custom_args": {
                "message_id": delivery.message_id,
                "journey_key": delivery.journey_key,
                "step_id": delivery.step_id,
            },
            "categories": [delivery.category],
        }
        headers = list_unsubscribe_headers(delivery)
        if headers:
            payload["headers"] = headers
        return payload

    def close(self) -> None:
        self.client.close()


def _failure(response: httpx.Response) -> PermanentFailure | RetryableFailure:
    """SendGrid errors: ``{"errors": [{"message", "field", "help"}]}``."""
    try:
        errors = response.json().get("errors") or []
        detail = "; ".join(
            f"{error.get('field')}: {error.get('message')}"
            if error.get("field")
            else str(error.get("message"))
            for error in errors
        )
    except (ValueError, AttributeError):
        detail = ""
    reason = f"sendgrid: HTTP {response.status_code}: {detail or error_detail(response)}"
    retry_after = None
    reset = response.headers.get("X-RateLimit-Reset")
    if response.status_code == 429 and "Retry-After" not in response.headers and reset:
        # SendGrid's rate limit names the moment it resets, as a Unix time.
        retry_after = max(0.0, float(reset) - time.time()) if reset.isdigit() else None
    return failure_for_response(response, reason, retry_after=retry_after)
