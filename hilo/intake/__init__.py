"""Events in: Segment-compatible calls parsed and refused whole (``segment_api``,
``segment_spec``), accepted onto one profile with their outbox rows in one transaction
(``acceptance``), delivered to Temporal in order per customer (``dispatcher``) and routed to
the journeys they start or reach (``routing``).
"""

from hilo.intake.acceptance import Accepted, Ingestor
from hilo.intake.dispatcher import Dispatcher
from hilo.intake.routing import EventRouter, RouteResult
from hilo.intake.segment_api import parse_request
from hilo.intake.segment_spec import SegmentRejected
from hilo.intake.sources import WriteKeySource

__all__ = [
    "Accepted",
    "Dispatcher",
    "EventRouter",
    "Ingestor",
    "RouteResult",
    "SegmentRejected",
    "WriteKeySource",
    "parse_request",
]
