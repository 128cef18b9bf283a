"""Local stand-ins for the channel providers, one module a provider, each speaking its API as
the provider documents it.

Every fake is a real HTTP server on 127.0.0.1 and a free port. It checks what the provider
checks (method, path, credentials, headers, body), answers as the provider answers, records
what it received, and can be told to fail the next requests the way the provider fails.
A request the real provider would refuse as malformed lands in ``problems`` as well as
getting the provider's error, so a test sees exactly what was wrong.

The SMTP stand-in is a real ``aiosmtpd`` server.
"""

from tests.fakes.google import (
    FakeFirebase,
    FakeGoogleAds,
    device_token,
    fcm_error,
    google_ads_error,
)
from tests.fakes.meta import FakeMetaGraph, FakeWhatsAppCloud, graph_error
from tests.fakes.sendgrid import FakeSendGrid
from tests.fakes.server import ProviderServer, Received, Reply, free_port, unb64url, wait_until
from tests.fakes.smtp import FakeSmtpServer, Mailbox, SmtpLogin
from tests.fakes.twilio import FakeTwilio
from tests.fakes.webhook import FakeWebhookReceiver
from tests.fakes.webpush import FakePushService, Subscriber, decrypt_aes128gcm

__all__ = [
    "FakeFirebase",
    "FakeGoogleAds",
    "FakeMetaGraph",
    "FakePushService",
    "FakeSendGrid",
    "FakeSmtpServer",
    "FakeTwilio",
    "FakeWebhookReceiver",
    "FakeWhatsAppCloud",
    "Mailbox",
    "ProviderServer",
    "Received",
    "Reply",
    "SmtpLogin",
    "Subscriber",
    "decrypt_aes128gcm",
    "device_token",
    "fcm_error",
    "free_port",
    "google_ads_error",
    "graph_error",
    "unb64url",
    "wait_until",
]
