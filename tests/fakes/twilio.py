"""Twilio's Messages API and its signed status callbacks, served locally."""

from __future__ import annotations

import base64
import re
import secrets
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from tests.fakes.server import ProviderServer, Received, Rejected, Reply

# Twilio ------------------------------------------------------------------------------------

E164 = re.compile(r"^\+[1-9]\d{6,14}$")


class FakeTwilio(ProviderServer):
    """``POST /2010-04-01/Accounts/{Sid}/Messages.json`` with an idempotency token."""

    def __init__(
        self, account_sid: str = "AC" + "a1" * 16, auth_token: str = "twilio-auth-token"
    ) -> None:
        super().__init__()
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.messages: list[dict[str, str]] = []  # delivered, once per token
        self.idempotency_tokens: list[str] = []  # every token received, repeats included
        self.unreachable: set[str] = set()
        self._by_token: dict[str, dict[str, Any]] = {}

    @staticmethod
    def error(status: int, code: int, message: str) -> Reply:
        return Reply(
            status,
            {
                "code": code,
                "message": message,
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status,
            },
        )

    def handle(self, request: Received) -> Reply:
        path = f"/2010-04-01/Accounts/{self.account_sid}/Messages.json"
        if (request.method, request.path) != ("POST", path):
            raise Rejected(
                self.error(404, 20404, "The requested resource was not found"), "unknown path"
            )
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if request.headers.get("authorization") != f"Basic {expected}":
            raise Rejected(self.error(401, 20003, "Authenticate"))
        if request.headers.get("content-type") != "application/x-www-form-urlencoded":
            raise Rejected(self.error(400, 20001, "Not form-encoded"), "not form-encoded")
        form = request.form()
        to, sender = form.get("To", ""), form.get("From", "")
        if not to:
            raise Rejected(self.error(400, 21604, "A 'To' phone number is required."), "no To")
        if not sender and not form.get("MessagingServiceSid"):
            raise Rejected(self.error(400, 21603, "A 'From' phone number is required."), "no From")
        if not form.get("Body") and not form.get("ContentSid"):
            raise Rejected(self.error(400, 21602, "Message body is required."), "no Body")
        if sender and to.startswith("whatsapp:") != sender.startswith("whatsapp:"):
            raise Rejected(
                self.error(400, 21910, "Invalid From and To pair."), "mixed WhatsApp addresses"
            )
        number = to.removeprefix("whatsapp:")
        if not E164.match(number) or number in self.unreachable:
            return self.error(400, 21211, f"Invalid 'To' Phone Number: {number}")
        callback = form.get("StatusCallback")
        if callback is not None and not callback.startswith(("https://", "http://")):
            raise Rejected(self.error(400, 21609, "Invalid StatusCallback"), "bad StatusCallback")
        token = request.headers.get("i-twilio-idempotency-token")
        if token:
            self.idempotency_tokens.append(token)
            if token in self._by_token:
                return Reply(201, self._by_token[token])
        if (failure := self.take_failure()) is not None:
            return failure
        sid = "SM" + secrets.token_hex(16)
        resource = {
            "sid": sid,
            "account_sid": self.account_sid,
            "to": to,
            "from": sender or None,
            "messaging_service_sid": form.get("MessagingServiceSid"),
            "body": form.get("Body", ""),
            "status": "accepted" if form.get("MessagingServiceSid") else "queued",
            "num_segments": "1",
            "direction": "outbound-api",
            "api_version": "2010-04-01",
            "date_created": format_datetime(datetime.now(UTC), usegmt=True),
            "error_code": None,
            "error_message": None,
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        }
        self.messages.append(form)
        if token:
            self._by_token[token] = resource
        return Reply(201, resource)
