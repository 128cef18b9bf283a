"""The contact policy (Política de Contacto): one service decides, for every send, ALLOW,
DEFER or SKIP, atomically, and records why.

``document`` is the policy a brand writes; ``rules`` the pure arithmetic of caps, gaps, quiet
hours and priority; ``service`` reads, decides with the rules and writes in one transaction
(``backends`` on SQLite and PostgreSQL); ``send_time`` picks the best hour; ``audit`` records
each change of the document.
"""

from hilo.policy.document import (
    ENGAGEMENT_LOOKBACK,
    ENGAGEMENT_WEIGHTS,
    WAITING_GRACE,
    BestTime,
    Cap,
    ContactPolicy,
    CurrentPolicy,
    JourneyRules,
    PolicyDecision,
    PolicyInvalid,
    PolicyProblem,
    QuietHours,
    ScopeRules,
    SendIntent,
    parse_policy,
)
from hilo.policy.rules import left_topic
from hilo.policy.service import ContactPolicyService

__all__ = [
    "ENGAGEMENT_LOOKBACK",
    "ENGAGEMENT_WEIGHTS",
    "WAITING_GRACE",
    "BestTime",
    "Cap",
    "ContactPolicy",
    "ContactPolicyService",
    "CurrentPolicy",
    "JourneyRules",
    "PolicyDecision",
    "PolicyInvalid",
    "PolicyProblem",
    "QuietHours",
    "ScopeRules",
    "SendIntent",
    "left_topic",
    "parse_policy",
]
