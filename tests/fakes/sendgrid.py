"""SendGrid's v3 Mail Send API and its signed event webhook, served locally."""

from __future__ import annotations

import secrets
from typing import Any

from tests.fakes.server import ProviderServer, Received, Rejected, Reply

# SendGrid ----------------------------------------------------------------------------------

SENDGRID_RESERVED_HEADERS = {
    "x-sg-id",
    "x-sg-eid",
    "received",
    "dkim-signature",
    "content-type",
    "content-transfer-encoding",
    "to",
    "from",
    "subject",
    "reply-to",
    "cc",
    "bcc",
}


class FakeSendGrid(ProviderServer):
    """``POST /v3/mail/send``: 202 with X-Message-Id, or ``{"errors": [...]}``."""

    def __init__(self, api_key: str = "SG.test-key.secret") -> None:
        super().__init__()
        self.api_key = api_key
        self.mail: list[dict[str, Any]] = []

    @staticmethod
    def errors(*errors: tuple[str | None, str]) -> dict[str, Any]:
        return {"errors": [{"message": m, "field": f, "help": None} for f, m in errors]}

    def handle(self, request: Received) -> Reply:
        if (request.method, request.path) != ("POST", "/v3/mail/send"):
            raise Rejected(Reply(404, self.errors((None, "Not Found"))), "unknown endpoint")
        if self.bearer(request) != self.api_key:
            raise Rejected(
                Reply(
                    401,
                    self.errors(
                        (None, "The provided authorization grant is invalid, expired, or revoked")
                    ),
                )
            )
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise Rejected(Reply(415, self.errors((None, "Content-Type"))), "not JSON")
        body = request.json()
        errors = self.validate(body)
        if errors:
            raise Rejected(
                Reply(400, self.errors(*errors)), "; ".join(f"{f}: {m}" for f, m in errors)
            )
        if (failure := self.take_failure()) is not None:
            return failure
        self.mail.append(body)
        return Reply(202, b"", {"X-Message-Id": secrets.token_urlsafe(16)})

    @staticmethod
    def validate(body: dict[str, Any]) -> list[tuple[str | None, str]]:
        errors: list[tuple[str | None, str]] = []
        personalizations = body.get("personalizations")
        if not personalizations:
            errors.append(("personalizations", "The personalizations field is required."))
        for index, personalization in enumerate(personalizations or []):
            for to in personalization.get("to") or []:
                if "@" not in str(to.get("email", "")):
                    errors.append(
                        (f"personalizations.{index}.to", "Does not contain a valid address.")
                    )
        if "@" not in str((body.get("from") or {}).get("email", "")):
            errors.append(("from.email", "The from object must be provided for every email."))
        if not body.get("subject"):
            errors.append(("subject", "The subject is required."))
        content = body.get("content") or []
        if not content:
            errors.append(
                ("content", "Unless a valid template_id is provided, content is required.")
            )
        types = [part.get("type") for part in content]
        if "text/plain" in types and types[0] != "text/plain":
            errors.append(("content", "The text/plain content type must be first."))
        if any(not part.get("value") for part in content):
            errors.append(
                ("content.value", "The content value must be a string of at least one character.")
            )
        for name, value in (body.get("custom_args") or {}).items():
            if not isinstance(value, str):
                errors.append((f"custom_args.{name}", "Custom args values must be strings."))
        for name in body.get("headers") or {}:
            if name.lower() in SENDGRID_RESERVED_HEADERS:
                errors.append((f"headers.{name}", "This header is reserved."))
        return errors
