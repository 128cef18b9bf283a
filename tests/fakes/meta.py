"""Meta's Graph API: WhatsApp Cloud messages and Custom Audiences, served locally."""

from __future__ import annotations

import itertools
import json
import re
import secrets
from typing import Any

from tests.fakes.server import ProviderServer, Received, Rejected, Reply, b64url

# Meta Graph API: WhatsApp Cloud and Custom Audiences --------------------------------------


def graph_error(
    code: int, message: str, *, subcode: int | None = None, kind: str = "OAuthException"
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "message": message,
        "type": kind,
        "code": code,
        "fbtrace_id": secrets.token_urlsafe(9),
    }
    if subcode is not None:
        error["error_subcode"] = subcode
    return {"error": error}


class FakeWhatsAppCloud(ProviderServer):
    """``POST /{version}/{phone_number_id}/messages`` for approved templates and text."""

    def __init__(
        self,
        token: str = "EAAG-whatsapp-token",
        phone_number_id: str = "106540352242922",
        api_version: str = "v25.0",
        templates: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.token = token
        self.phone_number_id = phone_number_id
        self.api_version = api_version
        # Approved templates and how many body parameters each takes.
        self.templates = templates if templates is not None else {"cart_reminder": 2}
        self.messages: list[dict[str, Any]] = []

    def handle(self, request: Received) -> Reply:
        if (request.method, request.path) != (
            "POST",
            f"/{self.api_version}/{self.phone_number_id}/messages",
        ):
            raise Rejected(
                Reply(400, graph_error(100, "Unsupported post request.", subcode=33)),
                "unknown path",
            )
        if self.bearer(request) != self.token:
            raise Rejected(
                Reply(401, graph_error(190, "Invalid OAuth access token - Cannot parse token"))
            )
        body = request.json()
        problem = self.validate(body)
        if problem:
            raise Rejected(Reply(400, graph_error(100, f"(#100) {problem}")), problem)
        if body["type"] == "template":
            template = body["template"]
            expected = self.templates.get(template["name"])
            if expected is None:
                return Reply(
                    404,
                    graph_error(
                        132001, "(#132001) Template name does not exist in the translation"
                    ),
                )
            given = sum(
                len(component.get("parameters") or [])
                for component in template.get("components") or []
                if component.get("type") == "body"
            )
            if given != expected:
                return Reply(
                    400,
                    graph_error(
                        132000,
                        "(#132000) Number of parameters does not match the expected number "
                        "of params",
                    ),
                )
        if (failure := self.take_failure()) is not None:
            return failure
        self.messages.append(body)
        return Reply(
            200,
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": body["to"], "wa_id": body["to"].lstrip("+")}],
                "messages": [
                    {"id": "wamid." + b64url(secrets.token_bytes(24)), "message_status": "accepted"}
                ],
            },
        )

    @staticmethod
    def validate(body: dict[str, Any]) -> str | None:
        if body.get("messaging_product") != "whatsapp":
            return "The parameter messaging_product is required."
        if not re.match(r"^\+?[1-9]\d{6,14}$", str(body.get("to", ""))):
            return "The parameter to is not a phone number."
        kind = body.get("type")
        if kind == "template":
            template = body.get("template") or {}
            if not template.get("name") or not (template.get("language") or {}).get("code"):
                return "template.name and template.language.code are required."
            for component in template.get("components") or []:
                for parameter in component.get("parameters") or []:
                    if parameter.get("type") != "text" or not isinstance(
                        parameter.get("text"), str
                    ):
                        return "Template parameters must be text."
        elif kind == "text":
            if not (body.get("text") or {}).get("body"):
                return "The parameter text['body'] is required."
        else:
            return f"Unsupported message type {kind!r}."
        return None


HEX64 = re.compile(r"^[0-9a-f]{64}$")
META_KEYS = {"EMAIL", "PHONE", "FN", "LN", "CT", "ST", "ZIP", "COUNTRY", "EXTERN_ID"}


class FakeMetaGraph(ProviderServer):
    """``POST``/``DELETE /{version}/{audience_id}/users`` on Meta Custom Audiences."""

    def __init__(self, access_token: str = "EAAG-marketing-token", api_version: str = "v25.0"):
        super().__init__()
        self.access_token = access_token
        self.api_version = api_version
        self.members: dict[str, set[tuple[tuple[str, str], ...]]] = {"23851234567890": set()}
        self.sessions = itertools.count(7_000_000_000_000)

    def handle(self, request: Received) -> Reply:
        match = re.fullmatch(rf"/{re.escape(self.api_version)}/(\d+)/users", request.path)
        if request.method not in ("POST", "DELETE") or match is None:
            raise Rejected(
                Reply(400, graph_error(100, "Unsupported request.", subcode=33)), "unknown path"
            )
        form = request.form()
        token = self.bearer(request) or form.get("access_token")
        if token != self.access_token:
            raise Rejected(Reply(400, graph_error(190, "Invalid OAuth access token.")))
        audience = match.group(1)
        if audience not in self.members:
            return Reply(
                400,
                graph_error(
                    100,
                    f"Unsupported post request. Object with ID '{audience}' does not exist.",
                    subcode=33,
                    kind="GraphMethodException",
                ),
            )
        try:
            payload = json.loads(form["payload"])
            schema = payload["schema"]
            schema = [schema] if isinstance(schema, str) else list(schema)
            rows = payload["data"]
        except (KeyError, ValueError, TypeError) as error:
            raise Rejected(
                Reply(400, graph_error(100, "(#100) Invalid parameter payload")), str(error)
            ) from error
        if not schema or not set(schema) <= META_KEYS or len(set(schema)) != len(schema):
            raise Rejected(Reply(400, graph_error(100, "(#100) Invalid schema")), str(schema))
        invalid = [
            row
            for row in rows
            if len(row) != len(schema) or not all(HEX64.match(str(value)) for value in row)
        ]
        if (failure := self.take_failure()) is not None:
            return failure
        members = {tuple(zip(schema, row, strict=True)) for row in rows if row not in invalid}
        if request.method == "POST":
            self.members[audience] |= members
        else:
            self.members[audience] -= members
        return Reply(
            200,
            {
                "audience_id": audience,
                "session_id": str(next(self.sessions)),
                "num_received": len(rows),
                "num_invalid_entries": len(invalid),
                "invalid_entry_samples": {str(i): row for i, row in enumerate(invalid[:5])},
            },
        )
