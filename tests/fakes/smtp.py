"""An SMTP server (aiosmtpd) with a mailbox, login and STARTTLS."""

from __future__ import annotations

import ipaddress
import ssl
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.fakes.server import free_port

# SMTP --------------------------------------------------------------------------------------


class Mailbox:
    """aiosmtpd handler: accepts mail, or answers a chosen reply for chosen recipients."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.replies: dict[str, str] = {}  # recipient → SMTP reply, e.g. "550 5.1.1 ..."

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.replies:
            return self.replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 2.0.0 Ok: queued"


@dataclass
class SmtpLogin:
    username: str
    password: str
    logins: list[str] = field(default_factory=list)

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == self.username
            and auth_data.password.decode() == self.password
        ):
            self.logins.append(mechanism)
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False)


class FakeSmtpServer:
    """A real SMTP server (aiosmtpd) on a free port, optionally with STARTTLS and AUTH."""

    def __init__(
        self,
        *,
        tls: bool = False,
        login: SmtpLogin | None = None,
    ) -> None:
        self.mailbox = Mailbox()
        self.port = free_port()
        self.login = login
        self.client_tls_context: ssl.SSLContext | None = None
        kwargs: dict[str, Any] = {}
        if tls:
            server_context, self.client_tls_context = _self_signed_tls("localhost")
            kwargs.update(tls_context=server_context, require_starttls=True)
        if login is not None:
            kwargs.update(authenticator=login, auth_require_tls=tls)
        self.controller = Controller(
            self.mailbox,
            hostname="127.0.0.1",
            port=self.port,
            server_hostname="localhost",
            **kwargs,
        )

    def start(self) -> FakeSmtpServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


def _self_signed_tls(host: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting only this server's certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as folder:
        certificate_file, key_file = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        certificate_file.write_bytes(certificate_pem)
        key_file.write_bytes(key_pem)
        server.load_cert_chain(certificate_file, key_file)
    client = ssl.create_default_context(cadata=certificate_pem.decode())
    return server, client
