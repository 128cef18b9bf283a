"""What endpoints depend on, read from ``app.state`` so nothing is built at import time."""

import hmac
import re
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request, Response, status
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from temporalio.client import Client

from hilo.catalog import JourneyCatalog
from hilo.db.store import Store
from hilo.intake import strict_json
from hilo.intake.acceptance import Ingestor
from hilo.intake.dispatcher import Dispatcher
from hilo.intake.routing import EventRouter
from hilo.intake.segment_api import text_problem
from hilo.playbook import load_playbook
from hilo.settings import Settings

Source = TypeVar("Source")

# auto_error=False so a missing token gets our message rather than FastAPI's.
bearer = HTTPBearer(auto_error=False, description="The admin token (HILO_ADMIN_TOKEN).")


def _state(request: Request, name: str) -> object:
    value = getattr(request.app.state, name, None)
    if value is None:
        # Only when the app was built without a store or client and its lifespan never ran.
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Hilo is not ready: no {name}")
    return value


def get_settings(request: Request) -> Settings:
    settings = _state(request, "settings")
    assert isinstance(settings, Settings)
    return settings


def get_store(request: Request) -> Store:
    store = _state(request, "store")
    assert isinstance(store, Store)
    return store


def get_client(request: Request) -> Client:
    client = _state(request, "client")
    assert isinstance(client, Client)
    return client


def get_router(request: Request) -> EventRouter:
    router = _state(request, "router")
    assert isinstance(router, EventRouter)
    return router


def get_ingestor(request: Request) -> Ingestor:
    ingestor = getattr(request.app.state, "ingestor", None)
    if ingestor is None:
        ingestor = request.app.state.ingestor = Ingestor(get_store(request))
    assert isinstance(ingestor, Ingestor)
    return ingestor


def get_dispatcher(request: Request) -> Dispatcher | None:
    """The app's dispatcher; None only before a lifespan that makes the client has run."""
    dispatcher = getattr(request.app.state, "dispatcher", None)
    return dispatcher if isinstance(dispatcher, Dispatcher) else None


SettingsDep = Annotated[Settings, Depends(get_settings)]
IngestorDep = Annotated[Ingestor, Depends(get_ingestor)]
StoreDep = Annotated[Store, Depends(get_store)]
ClientDep = Annotated[Client, Depends(get_client)]
RouterDep = Annotated[EventRouter, Depends(get_router)]


def get_channel_settings(request: Request) -> Settings:
    """``HILO_*`` channel settings, read once per app (tests put their own on app.state)."""
    settings = getattr(request.app.state, "channel_settings", None)
    if settings is None:
        try:
            settings = Settings()
        except ValidationError as error:
            # Names the variables only: the input values may be secrets.
            problems = "; ".join(
                f"HILO_{'_'.join(str(part) for part in problem['loc']).upper() or 'SETTINGS'}: "
                f"{problem['msg']}"
                for problem in error.errors()
            )
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, f"channel settings are invalid: {problems}"
            ) from None
        request.app.state.channel_settings = settings
    assert isinstance(settings, Settings)
    return settings


ChannelSettingsDep = Annotated[Settings, Depends(get_channel_settings)]


def get_catalog(
    request: Request, store: StoreDep, settings: SettingsDep, channels: ChannelSettingsDep
) -> JourneyCatalog:
    # The playbook file is read once per app.
    if not hasattr(request.app.state, "playbook"):
        request.app.state.playbook = load_playbook(settings.playbook_file)
    topics = [topic.key for topic in channels.preference_topics]
    return JourneyCatalog(store, request.app.state.playbook, topics=topics)


CatalogDep = Annotated[JourneyCatalog, Depends(get_catalog)]


def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing admin token: send 'Authorization: Bearer <HILO_ADMIN_TOKEN>'",
            headers=challenge,
        )
    if not same_secret(credentials.credentials, settings.admin_token):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "wrong admin token: it must equal HILO_ADMIN_TOKEN",
            headers=challenge,
        )


def same_secret(given: str, expected: str) -> bool:
    """Constant-time, so response timing does not reveal how much of a guess was right."""
    return hmac.compare_digest(given.encode(), expected.encode())


def source_for_write_key(sources: Mapping[str, Source], write_key: str) -> Source | None:
    """The source ``write_key`` stands for, or None.

    Every configured key is compared, in constant time, and the loop never stops early: a
    dict lookup would hash the guess and compare it with ``==``, which returns at the first
    differing byte, so timing would tell how much of a guess was right.
    """
    found = None
    for key, source in sources.items():
        if same_secret(write_key, key):
            found = source
    return found


AdminDep = Annotated[None, Depends(require_admin)]

# Only these JSON escapes make text that cannot be stored: NUL (PostgreSQL refuses it in
# text) and lone UTF-16 surrogates (UTF-8 cannot encode them). Raw control bytes are not JSON.
_UNSTORABLE_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


def _readable(part: str | int) -> str | int:
    """A location part as the error can carry it (it is JSON, so UTF-8 too)."""
    if isinstance(part, str) and text_problem(part):
        return part.encode("ascii", "backslashreplace").decode()
    return part


def unstorable_places(
    value: Any, loc: tuple[str | int, ...]
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Where in ``value`` (a parsed body) text cannot be stored, and why."""
    if isinstance(value, str):
        if problem := text_problem(value):
            yield loc, problem
    elif isinstance(value, dict):
        for key, item in value.items():
            if problem := text_problem(key):
                yield (*loc, key), f"name {problem}"
            yield from unstorable_places(item, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from unstorable_places(item, (*loc, index))


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for dependency in dependant.dependencies:
        names |= _query_names(dependency)
    return names


async def storable_text(request: Request) -> None:
    """A 422 naming each path or query parameter whose text the database cannot hold,
    rather than a 500 from the database (StrictJSONRequest checks the body's)."""
    places: list[tuple[tuple[str | int, ...], str]] = [
        (("path", name), problem)
        for name, value in request.path_params.items()
        if (problem := text_problem(str(value)))
    ]
    # Only the parameters the route declares: others are ignored, whatever they hold.
    route = request.scope.get("route")
    declared = _query_names(route.dependant) if isinstance(route, APIRoute) else set()
    places += [
        (("query", name), problem)
        for name, value in request.query_params.multi_items()
        if name in declared and (problem := text_problem(value))
    ]
    # The body's text is checked where it is read: StrictJSONRequest.json.
    if places:
        raise RequestValidationError(
            [
                {"type": "unstorable_text", "loc": tuple(map(_readable, loc)), "msg": problem}
                for loc, problem in places
            ]
        )


# For APIRouter(dependencies=...): every route added to such a router is admin-only by default,
# and refuses text the database cannot store.
ADMIN_ONLY = [Depends(require_admin), Depends(storable_text)]


class StrictJSONRequest(Request):
    """A request whose JSON body is read by :func:`hilo.intake.strict_json.loads`, as /v1's is, and
    whose text is checked to be storable (no NUL, no lone surrogate)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                value = strict_json.loads(body)
            except strict_json.NotStorableJSON as error:
                # Shaped as FastAPI's own validation errors, so clients read one format.
                detail = [
                    {"type": "value_error", "loc": ["body", *error.path], "msg": error.message}
                ]
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail) from None
            # Only an escape makes text that cannot be stored: look for it when there is one.
            if _UNSTORABLE_ESCAPE.search(body):
                places = [
                    {"type": "unstorable_text", "loc": list(map(_readable, loc)), "msg": problem}
                    for loc, problem in unstorable_places(value, ("body",))
                ]
                if places:
                    raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, places)
            self._json = value
        return self._json


class StrictJSONRoute(APIRoute):
    """The route class of every router whose routes take a JSON body: one JSON policy."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
