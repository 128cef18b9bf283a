"""SMS and WhatsApp through Twilio's Messages API.

``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``, form-encoded, HTTP basic auth with
the account SID and auth token. One instance per channel: WhatsApp addresses are the same
numbers written ``whatsapp:+14155550123``.
"""

from __future__ import annotations

import json
from typing import Literal

import httpx

from hilo.channels.base import (
    DEFAULT_TIMEOUT_SECONDS,
    Delivery,
    PermanentFailure,
    RetryableFailure,
    error_detail,
    failure_for_response,
    http_client,
    phone_number,
    send,
    template_params,
)

__all__ = ["TwilioMessages"]


class TwilioMessages:
    name = "twilio"

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        channel: Literal["sms", "whatsapp"] = "sms",
        sender: str | None = None,
        messaging_service_sid: str | None = None,
        status_callback_url: str | None = None,
        base_url: str = "https://api.twilio.com",
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        if not sender and not messaging_service_sid:
            raise ValueError("Twilio needs a sender number or a messaging service SID")
        self.channel = channel
        self.sender = sender
        self.messaging_service_sid = messaging_service_sid
        self.status_callback_url = status_callback_url
        self.url = f"{base_url.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"
        self.client = http_client(timeout, auth=httpx.BasicAuth(account_sid, auth_token))

    def deliver(self, delivery: Delivery) -> str:
        response = send(
            self.client,
            "POST",
            self.url,
            provider=self.name,
            failure=_failure,
            data=self.form(delivery),
            # One token for every retry of a message. Twilio documents this header on the
            # webhooks it sends; its Messages API does not promise to de-duplicate on it.
            headers={"I-Twilio-Idempotency-Token": delivery.message_id},
        )
        try:
            sid = response.json()["sid"]
        except (ValueError, KeyError, TypeError) as error:
            # Accepted but unreadable: retrying could send the message twice.
            raise PermanentFailure(
                f"twilio: accepted but answered without a message sid: {error_detail(response)}",
                provider_status=response.status_code,
            ) from error
        return str(sid)

    def form(self, delivery: Delivery) -> dict[str, str]:
        number = phone_number(delivery, self.name)
        form = {"To": self._address(number)}
        if self.messaging_service_sid:
            # The service picks the sender from its pool and applies its opt-out handling.
            form["MessagingServiceSid"] = self.messaging_service_sid
        else:
            form["From"] = self._address(self.sender or "")
        content_sid = delivery.content.get("content_sid")
        if content_sid:
            # An approved WhatsApp template: Twilio fills {{1}}, {{2}}, ... from the params.
            form["ContentSid"] = content_sid
            params = template_params(delivery, self.name)
            form["ContentVariables"] = json.dumps(
                {str(index): value for index, value in enumerate(params, start=1)}
            )
        elif delivery.content.get("body"):
            form["Body"] = delivery.content["body"]
        else:
            raise PermanentFailure(f"twilio: {delivery.step_id} rendered no body")
        if self.status_callback_url:
            form["StatusCallback"] = self.status_callback_url
        return form

    def _address(self, number: str) -> str:
        if self.channel == "whatsapp" and not number.startswith("whatsapp:"):
            return f"whatsapp:{number}"
        return number

    def close(self) -> None:
        self.client.close()


def _failure(response: httpx.Response) -> PermanentFailure | RetryableFailure:
    """Twilio errors: ``{"code": 21211, "message": "...", "more_info": "...", "status": 400}``."""
    try:
        body = response.json()
        detail = f"error {body['code']}: {body['message']}"
    except (ValueError, KeyError, TypeError):
        detail = error_detail(response)
    return failure_for_response(response, f"twilio: HTTP {response.status_code}: {detail}")
