"""Promotions: the offers templates name as ``promotions.<key>``, one source of truth.

PUT creates or replaces a promotion's terms (201 when new, 200 when replaced); templates
and the sends already scheduled read the new terms from then on.
"""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Response, status

from api.deps import ADMIN_ONLY, StoreDep, StrictJSONRoute
from api.openapi import NOT_JSON, UNAUTHORIZED, message
from hilo.promotions import (
    PROMOTION_KEY,
    PromotionBase,
    PromotionIn,
    PromotionPublic,
    get_promotion,
    list_promotions,
    upsert_promotion,
)

router = APIRouter(
    prefix="/promotions",
    tags=["promotions"],
    dependencies=ADMIN_ONLY,
    responses=UNAUTHORIZED,
    route_class=StrictJSONRoute,
)

PromotionKey = Annotated[
    str,
    Path(
        pattern=PROMOTION_KEY,
        description="How templates name it (promotions.<key>); lower_snake_case.",
        examples=["winback20"],
    ),
]


NOT_FOUND = message(404, "No promotion with that key.")


@router.get("")
def list_all(store: StoreDep) -> list[PromotionPublic]:
    """Every promotion, by key, expired ones included."""
    return [PromotionPublic.of(row) for row in list_promotions(store)]


@router.get("/{key}", responses=NOT_FOUND)
def get_one(key: PromotionKey, store: StoreDep) -> PromotionPublic:
    row = get_promotion(store, key)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no promotion with key '{key}'")
    return PromotionPublic.of(row)


@router.put(
    "/{key}",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": PromotionPublic, "description": "An existing one was replaced."},
        **NOT_JSON,
    },
)
def put(
    key: PromotionKey, terms: PromotionBase, store: StoreDep, response: Response
) -> PromotionPublic:
    """Create the promotion, or replace its terms (code, validity, channels)."""
    existed = get_promotion(store, key) is not None
    row = upsert_promotion(store, PromotionIn(key=key, **terms.model_dump()))
    if existed:
        response.status_code = status.HTTP_200_OK
    return PromotionPublic.of(row)
