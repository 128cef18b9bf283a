"""Customers: who they are now (``identity``, the one merge resolver), what they agreed to
(``consent``) and what happened to them (``profiles``: the profile view and the timeline).
"""

from hilo.customers.identity import resolve_customer
from hilo.customers.profiles import ConsentError, profile_view, record_consent, timeline

__all__ = [
    "ConsentError",
    "profile_view",
    "record_consent",
    "resolve_customer",
    "timeline",
]
