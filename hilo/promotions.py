"""Promotions: one source of truth for the offers every channel talks about.

A promotion (``winback20``: code ``WINBACK20``, 20 % off, valid in November, email and push
only) is stored once; templates read it as ``{{ promotions.winback20.code }}`` and never
copy the code. At publish a journey that names an unknown promotion, or one not offered on
the step's channel, is refused; one that has expired or not started yet is a warning. At
send time a message whose promotion cannot be used now is skipped with the reason
(:func:`send_blockers`), so no customer gets a code the checkout would refuse.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from hilo.clock import as_utc, utcnow
from hilo.db.models import Promotion
from hilo.db.store import Store
from hilo.events import DATE_TIME_OR_UNIX_TIME

if TYPE_CHECKING:
    from hilo.journeys.definitions import JourneyDefinition, JourneyProblem

__all__ = [
    "PROMOTION_KEY",
    "PromotionBase",
    "PromotionIn",
    "PromotionPublic",
    "check_promotions",
    "get_promotion",
    "is_offered_on",
    "list_promotions",
    "promotion_context",
    "promotions_used",
    "send_blockers",
    "template_context_extras",
    "unusable_promotions",
    "upsert_promotion",
]

# A Liquid identifier, so that ``promotions.<key>`` works without brackets.
PROMOTION_KEY = r"^[a-z][a-z0-9_]{0,62}$"
# The channels of hilo.journeys.definitions.CHANNELS.
ChannelName = Literal["email", "sms", "whatsapp", "push", "webpush", "webhook", "audience"]


class PromotionBase(BaseModel):
    """A promotion's terms, as an operator writes them."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="What the customer types at checkout.",
        examples=["WINBACK20"],
    )
    description: str = Field("", max_length=500, examples=["20% off your next order"])
    discount: str = Field(
        "", max_length=100, description="As shown to customers.", examples=["20%"]
    )
    valid_from: Annotated[AwareDatetime, WithJsonSchema(DATE_TIME_OR_UNIX_TIME)] = Field(
        examples=["2026-11-01T00:00:00Z"]
    )
    valid_until: Annotated[AwareDatetime, WithJsonSchema(DATE_TIME_OR_UNIX_TIME)] = Field(
        examples=["2026-12-01T00:00:00Z"]
    )
    channels: list[ChannelName] = Field(
        default_factory=list, description="Channels it may be sent on; empty means every channel."
    )

    @field_validator("valid_from", "valid_until")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        try:
            return value.astimezone(UTC)
        except OverflowError:  # 0001-01-01 east of UTC is year 0 there
            raise ValueError("is before the year 1 in UTC; give a later date") from None

    @field_validator("channels")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        repeated = sorted({channel for channel in value if value.count(channel) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed twice; list each channel once")
        return value

    @model_validator(mode="after")
    def _ends_after_it_starts(self) -> PromotionBase:
        if self.valid_until <= self.valid_from:
            raise ValueError(
                f"valid_until ({_when(self.valid_until)}) must be after valid_from "
                f"({_when(self.valid_from)})"
            )
        return self


class PromotionIn(PromotionBase):
    """A promotion to create or replace, keyed as templates name it."""

    key: str = Field(
        pattern=PROMOTION_KEY,
        description="How templates name it: promotions.<key>; lower_snake_case.",
        examples=["winback20"],
    )


class PromotionPublic(PromotionIn):
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Promotion) -> PromotionPublic:
        return cls.model_validate(_normalised(row), from_attributes=True)


# ---------------------------------------------------------------- storage


def upsert_promotion(store: Store, promotion: PromotionIn) -> Promotion:
    """Create the promotion, or replace the terms of the one with the same key."""
    terms = promotion.model_dump(exclude={"key"})
    for _attempt in range(2):
        with store.session() as session:
            row = session.get(Promotion, promotion.key)
            if row is None:
                row = Promotion(key=promotion.key, **terms)
            else:
                for name, value in terms.items():
                    setattr(row, name, value)
                row.updated_at = utcnow()
            session.add(row)
            try:
                session.commit()
            except IntegrityError:  # created concurrently: replace it instead
                session.rollback()
                continue
            session.refresh(row)
            return _normalised(row)
    raise RuntimeError(f"promotion {promotion.key!r} kept changing; try again")


def get_promotion(store: Store, key: str) -> Promotion | None:
    with store.session() as session:
        row = session.get(Promotion, key)
    return _normalised(row) if row is not None else None


def list_promotions(store: Store) -> list[Promotion]:
    with store.session() as session:
        rows = session.exec(select(Promotion).order_by(col(Promotion.key))).all()
    return [_normalised(row) for row in rows]


def _promotions(store: Store, keys: Iterable[str] | None = None) -> dict[str, Promotion]:
    with store.session() as session:
        query = select(Promotion)
        if keys is not None:
            query = query.where(col(Promotion.key).in_(sorted(set(keys))))
        return {row.key: _normalised(row) for row in session.exec(query).all()}


# ---------------------------------------------------------------- what templates see


def is_offered_on(promotion: Promotion, channel: str) -> bool:
    return not promotion.channels or channel in promotion.channels


def promotion_context(store: Store, now: datetime, channel: str) -> dict[str, dict[str, Any]]:
    """The promotions a template on ``channel`` sees, by key, under ``promotions``."""
    return {
        key: _as_context(promotion, now)
        for key, promotion in sorted(_promotions(store).items())
        if is_offered_on(promotion, channel)
    }


def _as_context(promotion: Promotion, now: datetime) -> dict[str, Any]:
    return {
        "key": promotion.key,
        "code": promotion.code,
        "description": promotion.description,
        "discount": promotion.discount,
        "valid_from": promotion.valid_from.isoformat(),
        "valid_until": promotion.valid_until.isoformat(),
        # Templates that pick a promotion from data (promotions[trigger.properties.offer])
        # cannot be checked before sending: this lets them fall back.
        "active": promotion.valid_from <= as_utc(now) < promotion.valid_until,
    }


def template_context_extras(store: Store, now: datetime, channel: str) -> dict[str, Any]:
    """What the send activity adds to a template's context: ``promotions``."""
    return {"promotions": promotion_context(store, now, channel)}


# A reference Liquid's analysis cannot give (the template does not parse) is found by text.
_REFERENCE = re.compile(
    r"""(?<![\w.])promotions\s*(?:\.\s*([A-Za-z_][\w-]*)|\[\s*(["'])([^"'\]]+)\2\s*\])"""
)


def promotions_used(sources: Iterable[str]) -> set[str]:
    """Keys of the promotions Liquid ``sources`` name literally.

    ``promotions.winback20.code`` and ``promotions["winback20"]`` name ``winback20``;
    ``promotions[trigger.properties.offer]`` names none (its key is data).
    """
    from liquid.exceptions import LiquidError

    from hilo.journeys.templates import parsed

    keys: set[str] = set()
    for source in sources:
        if "promotions" not in source:
            continue
        try:
            analysis = parsed(source).analyze()
        except LiquidError:
            keys.update(m.group(1) or m.group(3) for m in _REFERENCE.finditer(source))
            continue
        for variable in analysis.globals.get("promotions", []):
            segments = variable.segments
            if len(segments) > 1 and isinstance(segments[1], str):
                keys.add(segments[1])
    return keys


def unusable_promotions(
    store: Store, keys: Iterable[str], now: datetime, channel: str
) -> dict[str, str]:
    """Why each of ``keys`` cannot go out on ``channel`` at ``now``; usable ones are absent."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    found = _promotions(store, wanted)
    now = as_utc(now)
    reasons: dict[str, str] = {}
    for key in wanted:
        promotion = found.get(key)
        if promotion is None:
            reasons[key] = f"promotion {key} does not exist"
        elif not is_offered_on(promotion, channel):
            reasons[key] = (
                f"promotion {key} ({promotion.code}) is not offered on {channel} "
                f"(only {', '.join(promotion.channels)})"
            )
        elif now >= promotion.valid_until:
            reasons[key] = (
                f"promotion {key} ({promotion.code}) expired on {_when(promotion.valid_until)}"
            )
        elif now < promotion.valid_from:
            reasons[key] = (
                f"promotion {key} ({promotion.code}) is not valid before "
                f"{_when(promotion.valid_from)}"
            )
    return reasons


def send_blockers(
    store: Store, content: Mapping[str, str], now: datetime, channel: str
) -> str | None:
    """Why a message with these Liquid sources must not go out now, or None.

    E.g. ``promotion winback20 (WINBACK20) expired on 2026-11-01 00:00 UTC``.
    """
    reasons = unusable_promotions(store, promotions_used(content.values()), now, channel)
    return "; ".join(reasons[key] for key in sorted(reasons)) or None


# ---------------------------------------------------------------- publish


def check_promotions(
    definition: JourneyDefinition, store: Store, now: datetime
) -> tuple[list[JourneyProblem], list[JourneyProblem]]:
    """Problems (unknown promotion, not offered on the channel) and warnings (expired or
    not started yet at ``now``: those sends will be skipped) of every send step."""
    from hilo.journeys.definitions import JourneyProblem, SendStep, walk_steps

    uses: list[tuple[str, str, str]] = []  # (field path, channel, key)
    for step, path in walk_steps(definition.steps):
        if not isinstance(step, SendStep):
            continue
        for field, source in step.content().items():
            for key in sorted(promotions_used([source])):
                uses.append((f"{path} ({step.id}).{field}", step.channel, key))
    if not uses:
        return [], []
    known = _promotions(store, {key for _, _, key in uses})
    now = as_utc(now)
    problems: list[JourneyProblem] = []
    warnings: list[JourneyProblem] = []
    for where, channel, key in uses:
        promotion = known.get(key)
        if promotion is None:
            problems.append(
                JourneyProblem(
                    path=where,
                    message=f"promotion '{key}' does not exist; create it (PUT /promotions/"
                    f"{key}) or fix the key in promotions.{key}",
                )
            )
        elif not is_offered_on(promotion, channel):
            problems.append(
                JourneyProblem(
                    path=where,
                    message=f"promotion '{key}' is not offered on {channel} (only "
                    f"{', '.join(promotion.channels)}); add {channel} to its channels or "
                    "use another promotion",
                )
            )
        elif now >= promotion.valid_until:
            warnings.append(
                JourneyProblem(
                    path=where,
                    message=f"promotion '{key}' ({promotion.code}) expired on "
                    f"{_when(promotion.valid_until)}: this step will be skipped until its "
                    "valid_until is extended",
                )
            )
        elif now < promotion.valid_from:
            warnings.append(
                JourneyProblem(
                    path=where,
                    message=f"promotion '{key}' ({promotion.code}) starts on "
                    f"{_when(promotion.valid_from)}: this step is skipped until then",
                )
            )
    return problems, warnings


# ---------------------------------------------------------------- time


def _normalised(row: Promotion) -> Promotion:
    row.valid_from = as_utc(row.valid_from)
    row.valid_until = as_utc(row.valid_until)
    row.created_at = as_utc(row.created_at)
    row.updated_at = as_utc(row.updated_at)
    return row


def _when(moment: datetime) -> str:
    return as_utc(moment).strftime("%Y-%m-%d %H:%M UTC")
