"""Deterministic identifiers: events find their instance, retries find their message."""

from __future__ import annotations

import hashlib
from urllib.parse import quote

# A customer id (userId, anonymousId, profiles.customer_id): the column's size, and the
# limit of every route that takes one.
MAX_ID_CHARS = 200


def journey_workflow_id(journey_key: str, customer_id: str, instance_key: str | None = None) -> str:
    """``journey/abandoned_cart/42/cart-9``: one workflow per (journey, customer[, key])."""
    parts = ["journey", journey_key, quote(customer_id, safe="")]
    if instance_key is not None:
        parts.append(quote(instance_key, safe=""))
    return "/".join(parts)


def message_id(workflow_id: str, run_id: str, step_id: str, iteration: int) -> str:
    """One id per send: same instance, step and iteration always give the same id.

    ``run_id`` is the first run of the instance (stable across continue-as-new and
    retries) so that a customer who re-enters later gets new messages.
    """
    digest = hashlib.sha256(f"{workflow_id}|{run_id}|{step_id}|{iteration}".encode()).hexdigest()
    return f"msg_{digest[:40]}"


def stable_fraction(*parts: str) -> float:
    """A number in [0, 1) fixed by its inputs: holdouts and splits stay put per customer."""
    digest = hashlib.sha256("|".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
