"""Feedback: what comes back after a send. Provider webhooks verified and parsed
(``webhooks``), signed links and the open pixel (``links``), the preference page (``preferences``
and its Liquid ``pages/``), all written down once (``deliveries``).
"""

from hilo.feedback.links import LinkClaims, LinkRejected, LinkSigner
from hilo.feedback.preferences import PreferenceState, Topic
from hilo.feedback.webhooks import DeliveryEvent, SignatureRejected

__all__ = [
    "DeliveryEvent",
    "LinkClaims",
    "LinkRejected",
    "LinkSigner",
    "PreferenceState",
    "SignatureRejected",
    "Topic",
]
