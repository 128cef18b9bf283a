"""WhatsApp through Meta's WhatsApp Cloud API (``POST /{version}/{phone_number_id}/messages``).

Outside the 24-hour customer service window WhatsApp only delivers approved templates, so
a journey step names one (``template_name``, ``language``, ``params``); a plain ``body``
goes out as a text message for replies inside the window.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from hilo.channels.base import (
    DEFAULT_TIMEOUT_SECONDS,
    Delivery,
    PermanentFailure,
    error_detail,
    graph_api_failure,
    http_client,
    phone_number,
    send,
    template_params,
)

__all__ = ["WhatsAppCloud"]


class WhatsAppCloud:
    name = "whatsapp_cloud"

    def __init__(
        self,
        token: str,
        phone_number_id: str,
        *,
        base_url: str = "https://graph.facebook.com",
        api_version: str = "v25.0",
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.url = f"{base_url.rstrip('/')}/{api_version}/{phone_number_id}/messages"
        self.client = http_client(timeout, headers={"Authorization": f"Bearer {token}"})

    def deliver(self, delivery: Delivery) -> str:
        response = send(
            self.client,
            "POST",
            self.url,
            provider=self.name,
            failure=partial(graph_api_failure, provider=self.name),
            json=self.payload(delivery),
        )
        try:
            return str(response.json()["messages"][0]["id"])
        except (ValueError, KeyError, IndexError, TypeError) as error:
            # Accepted but unreadable: retrying could send the message twice.
            raise PermanentFailure(
                f"whatsapp_cloud: accepted but answered without a message id: "
                f"{error_detail(response)}",
                provider_status=response.status_code,
            ) from error

    def payload(self, delivery: Delivery) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": phone_number(delivery, self.name),
            # Echoed back in status webhooks, so delivery reports find our message.
            "biz_opaque_callback_data": delivery.message_id,
        }
        template_name = delivery.content.get("template_name")
        if template_name:
            template: dict[str, Any] = {
                "name": template_name,
                "language": {"code": delivery.content.get("language") or "en"},
            }
            params = template_params(delivery, self.name)
            if params:
                template["components"] = [
                    {
                        "type": "body",
                        "parameters": [{"type": "text", "text": param} for param in params],
                    }
                ]
            payload["type"] = "template"
            payload["template"] = template
        elif delivery.content.get("body"):
            payload["type"] = "text"
            payload["text"] = {"preview_url": False, "body": delivery.content["body"]}
        else:
            raise PermanentFailure(
                f"whatsapp_cloud: {delivery.step_id} rendered neither a template_name nor a body"
            )
        return payload

    def close(self) -> None:
        self.client.close()
