"""Hilo's custom search attributes: find any instance in the Temporal UI or CLI.

Example: ``HiloJourney = 'abandoned_cart' AND HiloCustomer = '42' AND
HiloWaitingFor = 'Order Completed'``.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

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
