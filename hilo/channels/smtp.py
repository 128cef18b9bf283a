"""Email over SMTP: any mail server or relay that speaks SMTP.

Reply codes decide the failure: 5xx is permanent (mailbox unknown, message refused),
4xx and a dropped connection are retryable (greylisting, a full queue, a restart).
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr

from hilo.channels.base import (
    DEFAULT_TIMEOUT_SECONDS,
    Delivery,
    PermanentFailure,
    RetryableFailure,
    email_address,
    list_unsubscribe_headers,
)
from hilo.clock import utcnow

__all__ = ["SmtpEmail", "build_email"]


class SmtpEmail:
    name = "smtp"

    def __init__(
        self,
        host: str,
        port: int = 587,
        *,
        sender: str,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = True,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if "@" not in parseaddr(sender)[1]:
            raise ValueError(f"SMTP sender {sender!r} is not an email address like news@shop.com")
        self.host = host
        self.port = port
        self.sender = sender
        self.username = username
        self.password = password
        self.starttls = starttls
        self.timeout = timeout
        self.tls_context = tls_context or ssl.create_default_context()

    def deliver(self, delivery: Delivery) -> str:
        to = email_address(delivery, self.name)
        message = build_email(delivery, sender=self.sender, to=to)
        try:
            # A connection per message: smtplib connections are not thread-safe and
            # activities run in a thread pool.
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as connection:
                if self.starttls:
                    connection.starttls(context=self.tls_context)
                if self.username:
                    connection.login(self.username, self.password or "")
                connection.send_message(message, to_addrs=[to])
        except smtplib.SMTPRecipientsRefused as error:
            code, text = next(iter(error.recipients.values()))
            raise _failure(code, text, f"refused recipient {to}") from error
        except smtplib.SMTPResponseException as error:
            raise _failure(error.smtp_code, error.smtp_error, "refused the message") from error
        except smtplib.SMTPNotSupportedError as error:
            raise PermanentFailure(f"smtp: {self.host}:{self.port} {error}") from error
        except (smtplib.SMTPException, OSError) as error:
            raise RetryableFailure(
                f"smtp: could not talk to {self.host}:{self.port}: {error}"
            ) from error
        return str(message["Message-ID"])


def build_email(delivery: Delivery, *, sender: str, to: str) -> EmailMessage:
    """A multipart/alternative message whose Message-ID carries our message id."""
    text = delivery.content.get("text", "")
    html = delivery.content.get("html", "")
    if not text and not html:
        raise PermanentFailure(f"smtp: {delivery.step_id} rendered neither text nor html")
    domain = parseaddr(sender)[1].rpartition("@")[2]
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = delivery.content.get("subject", "")
    message["Date"] = format_datetime(utcnow())
    message["Message-ID"] = f"<{delivery.message_id}@{domain}>"
    for header, value in list_unsubscribe_headers(delivery).items():
        message[header] = value
    if text:
        message.set_content(text)
        if html:
            message.add_alternative(html, subtype="html")
    else:
        message.set_content(html, subtype="html")
    return message


def _failure(code: int, text: bytes | str, what: str) -> PermanentFailure | RetryableFailure:
    detail = text.decode(errors="replace") if isinstance(text, bytes) else text
    reason = f"smtp: server {what}: {code} {detail}"
    if code >= 500:
        return PermanentFailure(reason, provider_status=code)
    return RetryableFailure(reason)
