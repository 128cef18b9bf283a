"""The journey grammar: what a brand can say in a journey, validated before it ever runs.

``definitions`` (steps, triggers, entry and exit rules, goals), ``conditions`` (the one
comparison rule), ``durations``, ``templates`` (Liquid, checked at publish), ``validate``
(the one parse-and-check), ``runs`` (the workflow's inputs and results) and
``search_attributes``. Pure: the journey workflow imports it.
"""

from hilo.journeys.definitions import (
    JourneyDefinition,
    JourneyInvalid,
    JourneyProblem,
    PublishedJourney,
    journey_json_schema,
)
from hilo.journeys.validate import check_journey, load_journey_yaml, parse_journey

__all__ = [
    "JourneyDefinition",
    "JourneyInvalid",
    "JourneyProblem",
    "PublishedJourney",
    "check_journey",
    "journey_json_schema",
    "load_journey_yaml",
    "parse_journey",
]
