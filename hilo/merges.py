"""Following merges: when an anonymous profile is merged into a known one, its row points on
(``merged_into``) and every read of a customer follows that chain to the profile now in use.

This is the one rule for following it, whatever reads the rows (an ORM session, a locked
read, the send path's driver cursor): the reader is passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["MAX_MERGE_HOPS", "follow_merges"]

# Merges chain at most a few times (anonymous → known → known after a user-id change);
# a longer chain is bad data, and never loops.
MAX_MERGE_HOPS = 5

Row = TypeVar("Row")


def follow_merges(
    customer_id: str,
    read: Callable[[str], Row | None],
    merged_into: Callable[[Row], str | None],
) -> Row | None:
    """The row ``customer_id`` leads to along ``merged_into``; None when there is none."""
    found = read(customer_id)
    for _hop in range(MAX_MERGE_HOPS):
        if found is None:
            return None
        onward = merged_into(found)
        if onward is None:
            return found
        found = read(onward)
    return found
