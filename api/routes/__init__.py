"""Every resource's router, gathered in one ``api_router``."""

from fastapi import APIRouter

from api.routes import (
    events,
    feedback,
    health,
    journeys,
    policy,
    profiles,
    promotions,
    segment,
)

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(journeys.public_router)
api_router.include_router(journeys.router)
api_router.include_router(events.router)
api_router.include_router(profiles.router)
api_router.include_router(policy.router)
api_router.include_router(promotions.router)
api_router.include_router(segment.router)
api_router.include_router(feedback.feedback_router)
