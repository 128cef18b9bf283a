"""Who sends events: each write key stands for a named source, a client or a server."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEV_SOURCE", "WriteKeySource", "named_source"]


class WriteKeySource(BaseModel):
    """The source a write key stands for. A client source's key ships in a page or an app,
    so anyone may send with it; a server source's key is a secret of the brand's backend."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=100, examples=["web"])
    kind: Literal["client", "server"] = "client"


def named_source(value: object) -> object:
    # The first form named the source only: it gets the kind that can do least.
    return {"name": value} if isinstance(value, str) else value


DEV_SOURCE = WriteKeySource(name="development", kind="server")
