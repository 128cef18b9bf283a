"""Liveness, for load balancers and ``hilo dev``: no token, no database."""

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"


@router.get("/health")
def health() -> Health:
    return Health()
