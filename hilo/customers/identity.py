"""Who a customer is now: the one merge resolver.

An id may be a customer's own, an anonymous id linked to a known customer (an identity), or a
profile merged into another (``merged_into``, followed by :func:`hilo.merges.follow_merges`).
Every read of "this customer" in the customers context resolves through here.
"""

from __future__ import annotations

from sqlmodel import Session, col, select

from hilo.db.models import Identity, Profile
from hilo.db.store import Store
from hilo.merges import MAX_MERGE_HOPS, follow_merges

__all__ = ["merged_from", "resolve_customer", "resolve_profile"]


def resolve_profile(session: Session, customer_id: str) -> Profile | None:
    start = customer_id
    if session.get(Profile, customer_id) is None:
        # An anonymous id linked straight to a known customer has no profile of its own.
        linked = session.exec(
            select(Identity.customer_id).where(
                col(Identity.kind).in_(("user_id", "anonymous_id")),
                Identity.value == customer_id,
            )
        ).first()
        if linked is None:
            return None
        start = linked
    return follow_merges(start, lambda id_: session.get(Profile, id_), _onward)


def _onward(profile: Profile) -> str | None:
    return profile.merged_into


def merged_from(session: Session, customer_id: str) -> list[str]:
    found: list[str] = []
    frontier = [customer_id]
    for _hop in range(MAX_MERGE_HOPS):
        merged = list(
            session.exec(
                select(Profile.customer_id)
                .where(col(Profile.merged_into).in_(frontier))
                .order_by(col(Profile.customer_id))
            )
        )
        fresh = [customer for customer in merged if customer not in found and customer]
        if not fresh:
            break
        found += fresh
        frontier = fresh
    return [customer for customer in found if customer != customer_id]


def resolve_customer(store: Store, customer_id: str) -> str | None:
    """The customer an id stands for now, or None when Hilo knows no such id."""
    with store.session() as session:
        profile = resolve_profile(session, customer_id)
        return profile.customer_id if profile is not None else None
