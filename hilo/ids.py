"""Deterministic identifiers: events find their instance, retries find their message."""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import quote

# A customer id (userId, anonymousId, profiles.customer_id): the column's size, and the
# limit of every route that takes one.
MAX_ID_CHARS = 200

# Temporal refuses a workflow id over 1,000 bytes of UTF-8 (its dynamic config
# ``limit.maxIDLength``; the dev server answers INVALID_ARGUMENT), so a journey's id is built to
# fit: "journey/" + key (JOURNEY_KEY: at most 63) + "/" + customer + "/" + instance key, the
# last two percent-encoded.
MAX_WORKFLOW_ID_BYTES = 1000
MAX_JOURNEY_KEY_CHARS = 63
# Longer instance keys (a property's value: unknown until routing) are hashed to this size.
MAX_INSTANCE_KEY_BYTES = 200
# What is left for the customer: refused at acceptance beyond it (every 200-character ASCII id
# fits; 200 emoji, 2,400 bytes encoded, do not).
MAX_CUSTOMER_ID_BYTES = (
    MAX_WORKFLOW_ID_BYTES - len("journey///") - MAX_JOURNEY_KEY_CHARS - MAX_INSTANCE_KEY_BYTES
)
_DIGEST_CHARS = 64  # sha256, hex


def customer_id_problem(customer_id: str) -> str | None:
    """Why ``customer_id`` cannot name a journey's workflow, or None when it can."""
    try:
        size = len(quote(customer_id, safe=""))
    except UnicodeEncodeError:
        return "must be valid Unicode text (it holds a lone surrogate)"
    if size > MAX_CUSTOMER_ID_BYTES:
        return (
            f"is {size:,} bytes once percent-encoded for a workflow id; at most "
            f"{MAX_CUSTOMER_ID_BYTES} fit (any id of up to 200 ASCII characters does): "
            "use a shorter id, such as the customer's database id"
        )
    return None


def bounded_instance_key(instance_key: str) -> str:
    """``instance_key`` as it is when it fits in a workflow id (every key that ever started an
    instance did), else a readable prefix, ``~`` and the sha256 of the whole key: the same
    long key always gives the same id, and the id always fits."""
    if len(quote(instance_key, safe="")) <= MAX_INSTANCE_KEY_BYTES:
        return instance_key
    budget = MAX_INSTANCE_KEY_BYTES - 1 - _DIGEST_CHARS
    prefix, size = [], 0
    for character in instance_key:
        size += len(quote(character, safe=""))
        if size > budget:
            break
        prefix.append(character)
    digest = hashlib.sha256(instance_key.encode()).hexdigest()
    return f"{''.join(prefix)}~{digest}"


def journey_workflow_id(journey_key: str, customer_id: str, instance_key: str | None = None) -> str:
    """``journey/abandoned_cart/42/cart-9``: one workflow per (journey, customer[, key]).

    Raises ValueError when ``customer_id`` cannot fit (acceptance refuses such ids)."""
    problem = customer_id_problem(customer_id)
    if problem is not None:
        raise ValueError(f"customer id {customer_id[:40]!r} {problem}")
    parts = ["journey", journey_key, quote(customer_id, safe="")]
    if instance_key is not None:
        parts.append(quote(bounded_instance_key(instance_key), safe=""))
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


def b64url(data: bytes) -> str:
    """Bytes as unpadded base64url text: tokens, keys and signatures in URLs and JWTs."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
