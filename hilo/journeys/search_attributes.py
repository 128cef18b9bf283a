"""Hilo's custom search attributes: find any instance in the Temporal UI or CLI.

Example: ``HiloJourney = 'abandoned_cart' AND HiloCustomer = '42' AND
HiloWaitingFor = 'Order Completed'``.
"""

from __future__ import annotations

from typing import Any

from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

from hilo.journeys.definitions import JourneyDefinition, WaitForStep, WaitStep

JOURNEY = SearchAttributeKey.for_keyword("HiloJourney")
CUSTOMER = SearchAttributeKey.for_keyword("HiloCustomer")
STEP = SearchAttributeKey.for_keyword("HiloStep")
STATUS = SearchAttributeKey.for_keyword("HiloStatus")
WAITING_FOR = SearchAttributeKey.for_keyword_list("HiloWaitingFor")
JOURNEY_VERSION = SearchAttributeKey.for_int("HiloJourneyVersion")

ALL = (JOURNEY, CUSTOMER, STEP, STATUS, WAITING_FOR, JOURNEY_VERSION)

# Names as `temporal server start-dev --search-attribute` and `temporal operator` spell types.
CLI_TYPES = {
    JOURNEY.name: "Keyword",
    CUSTOMER.name: "Keyword",
    STEP.name: "Keyword",
    STATUS.name: "Keyword",
    WAITING_FOR.name: "KeywordList",
    JOURNEY_VERSION.name: "Int",
}


async def register(client: object, namespace: str) -> None:
    """Add any missing attribute to a namespace (the test server, a fresh cluster)."""
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import (
        AddSearchAttributesRequest,
        ListSearchAttributesRequest,
    )
    from temporalio.client import Client

    assert isinstance(client, Client)
    types = {
        "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
        "KeywordList": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST,
        "Int": IndexedValueType.INDEXED_VALUE_TYPE_INT,
    }
    from temporalio.service import RPCError, RPCStatusCode

    try:
        existing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
        known = set(existing.custom_attributes)
    except RPCError as error:
        if error.status != RPCStatusCode.UNIMPLEMENTED:
            raise
        known = set()  # the time-skipping test server cannot list, only add
    missing = {name: types[kind] for name, kind in CLI_TYPES.items() if name not in known}
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
        )


def start_search_attributes(
    journey_key: str, customer_id: str, version: int, definition: JourneyDefinition
) -> TypedSearchAttributes:
    """Set at start, so an instance is findable before its first step runs.

    A journey that opens with a timed wait or a ``wait_for`` (abandoned cart, support
    follow-up) starts showing that step, so its first workflow task has nothing to upsert:
    one visibility write less per journey.
    """
    pairs: list[SearchAttributePair[Any]] = [
        SearchAttributePair(JOURNEY, journey_key),
        SearchAttributePair(CUSTOMER, customer_id),
        SearchAttributePair(JOURNEY_VERSION, version),
    ]
    first = opening(definition)
    if first is None:
        pairs.append(SearchAttributePair(STATUS, "starting"))
    else:
        step, status, waiting = first
        pairs += [
            SearchAttributePair(STEP, step),
            SearchAttributePair(STATUS, status),
            SearchAttributePair(WAITING_FOR, list(waiting)),
        ]
    return TypedSearchAttributes(pairs)


def opening(definition: JourneyDefinition) -> tuple[str, str, tuple[str, ...]] | None:
    """What ``_show`` will write at the first step, when that is known before it runs: a wait
    of a set duration or a ``wait_for`` (a wait for a time window or the best hour asks an
    activity first)."""
    if not definition.steps:
        return None
    first = definition.steps[0]
    if isinstance(first, WaitStep) and first.duration is not None:
        return first.id, "waiting", awaited(set(), definition)
    if isinstance(first, WaitForStep):
        listening = {outcome.event for outcome in first.events}
        return first.id, "waiting_for", awaited(listening, definition)
    return None


def awaited(listening: set[str], definition: JourneyDefinition) -> tuple[str, ...]:
    """The events a running instance waits for: what it listens for at its step and what
    its exit rules listen for all along."""
    return tuple(sorted(listening | {rule.event for rule in definition.exit}))
