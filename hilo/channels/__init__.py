"""Channel providers: where a rendered message leaves Hilo for a real customer.

``base`` holds the interface (``Delivery``, ``ChannelProvider``) and the two failures;
one module per provider speaks that provider's documented API; ``registry`` builds them
from the settings; ``google`` holds Google's OAuth2 tokens for FCM and Google Ads.
"""

from hilo.channels.base import (
    ChannelProvider,
    Delivery,
    DeliveryFailure,
    PermanentFailure,
    RetryableFailure,
)

__all__ = [
    "ChannelProvider",
    "Delivery",
    "DeliveryFailure",
    "PermanentFailure",
    "RetryableFailure",
]
