"""Emit events to Hilo from Python: ``HiloClient(url, token).send_event(...)``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx

from hilo.errors import HiloError
from hilo.events import CustomerEvent


class ApiRefused(HiloError):
    """The API refused a request; ``detail`` carries its explanation."""

    def __init__(self, status_code: int, detail: Any) -> None:
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"Hilo answered {status_code}: {detail}")


class HiloClient:
    """A small client for services: one long-lived httpx client with explicit timeouts."""

    def __init__(self, base_url: str, token: str, timeout: float = 10.0) -> None:
        self._http = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=3.0),
        )

    def __enter__(self) -> HiloClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send_event(
        self,
        name: str,
        customer_id: str,
        properties: dict[str, Any] | None = None,
        timestamp: datetime | None = None,
        message_id: str | None = None,
    ) -> dict[str, Any]:
        """Send one event; returns which journeys it started and which instances it reached."""
        event = CustomerEvent(
            name=name,
            customer_id=customer_id,
            properties=properties or {},
            source="hilo-client",
            **({"timestamp": timestamp} if timestamp else {}),
            **({"message_id": message_id} if message_id else {}),
        )
        response = self._http.post("/events", json=event.model_dump(mode="json"))
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise ApiRefused(response.status_code, detail)
        result: dict[str, Any] = response.json()
        return result
