"""Hilo's public endpoints: provider webhooks and the signed links in our messages.

None of these take the admin token: providers and customers call them, and each request
proves itself instead. Webhooks carry the provider's signature (403 and nothing stored when
it does not verify); links carry our own signed token (404 when it is changed, expired or of
another kind). A GET never unsubscribes, so a mail scanner following links changes nothing.

    /webhooks/sendgrid   SendGrid Signed Event Webhook (ECDSA over timestamp + body)
    /webhooks/twilio     Twilio status callbacks (HMAC-SHA1 over our public URL + form)
    /webhooks/whatsapp   WhatsApp Cloud API: GET handshake, POST statuses (HMAC-SHA256)
    /l/c/<token>         click: record it, then 302 to the signed target and nowhere else
    /l/o/<token>         open pixel: record it, answer a transparent 1x1 GIF
    /l/u/<token>         unsubscribe: GET the page, POST to leave (RFC 8058 one-click too)
    /l/p/<token>         preference page and its form
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError

from api.bodies import read_body, read_form
from api.deps import StoreDep, get_channel_settings
from api.openapi import MESSAGE_SCHEMA, SETTINGS_INVALID, Responses, message
from hilo.clock import utcnow
from hilo.db.store import Store
from hilo.feedback.deliveries import (
    apply_preferences,
    current_preferences,
    record_delivery_events,
    tracked_click,
    tracked_open,
    unsubscribe,
)
from hilo.feedback.links import LINK_PATHS, LinkClaims, LinkKind, LinkRejected, LinkSigner
from hilo.feedback.preferences import (
    PreferenceFormError,
    parse_preference_form,
    render_confirmation,
    render_invalid_link,
    render_preference_page,
)
from hilo.feedback.webhooks import (
    DeliveryEvent,
    SignatureRejected,
    parse_sendgrid,
    parse_twilio,
    parse_whatsapp,
    verify_sendgrid,
    verify_twilio,
    verify_whatsapp,
    whatsapp_challenge,
)
from hilo.settings import Settings

__all__ = [
    "ONE_CLICK_SOURCE",
    "PREFERENCE_PAGE_SOURCE",
    "TWILIO_PATH",
    "UNSUBSCRIBE_PAGE_SOURCE",
    "feedback_router",
    "get_channel_settings",
    "get_link_signer",
]

log = logging.getLogger(__name__)

# The source each consent change names, so an audit can tell how the customer left.
ONE_CLICK_SOURCE = "one-click unsubscribe (RFC 8058)"
UNSUBSCRIBE_PAGE_SOURCE = "unsubscribe page"
PREFERENCE_PAGE_SOURCE = "preference page"

SENDGRID_SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
TWILIO_PATH = "/webhooks/twilio"

# Bodies are capped before they are read (413 past the cap), so that no caller, signed or
# not, can make the API hold or parse more than the sender could legitimately need.
# SendGrid posts batches of at most 768 KB; Meta's webhook payloads are at most 3 MB.
SENDGRID_MAX_BYTES = 1024 * 1024
WHATSAPP_MAX_BYTES = 3 * 1024 * 1024
# Twilio documents no maximum: a status callback is a form of some twenty short fields.
TWILIO_MAX_BYTES = 64 * 1024
TWILIO_MAX_FIELDS = 100
# The preference page's form is a few fields per topic; one-click is a single field.
LINK_FORM_MAX_BYTES = 8 * 1024
LINK_FORM_MAX_FIELDS = 100

# The smallest transparent GIF: 1x1, one transparent colour.
PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
NO_STORE = {"Cache-Control": "no-store, max-age=0", "Pragma": "no-cache"}
# The token is in the URL: keep it out of Referer headers, indexes and other sites' frames.
PAGE_HEADERS = {
    **NO_STORE,
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}


# ================================================================ dependencies


ChannelSettingsDep = Annotated[Settings, Depends(get_channel_settings)]

# What the schema says besides each route's success.
FORM_ONLY = message(415, "Not a form: send application/x-www-form-urlencoded or multipart.")
TOO_LARGE = message(413, "The body is over this endpoint's limit; nothing past it was read.")
HTML = {"text/html": {"schema": {"type": "string"}}}
INVALID_LINK: Responses = {
    404: {
        "content": HTML,
        "description": "The link was changed, has expired or is of another kind.",
    }
}


def get_link_signer(request: Request, settings: ChannelSettingsDep) -> LinkSigner:
    signer = getattr(request.app.state, "link_signer", None)
    if signer is None:
        try:
            signer = settings.link_signer()
        except ValueError as error:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(error)) from None
        request.app.state.link_signer = signer
    assert isinstance(signer, LinkSigner)
    return signer


LinkSignerDep = Annotated[LinkSigner, Depends(get_link_signer)]


# ================================================================ webhooks

webhooks = APIRouter(
    prefix="/webhooks",
    tags=["webhooks"],
    responses={
        **message(403, "The provider's signature does not verify; nothing was stored."),
        **SETTINGS_INVALID,
        **TOO_LARGE,
    },
)
NOT_READABLE = message(400, "Signed, but not the provider's format; nothing was stored.")


class FeedbackReceived(BaseModel):
    """What a webhook call changed; providers only look at the status code."""

    received: int = Field(description="Events in the request we act on.")
    recorded: int = Field(description="Events new to Hilo.")
    duplicates: int = Field(description="Events seen before: nothing changed.")
    unmatched: int = Field(description="Recorded events whose message is not in the ledger.")


def _not_configured(setting: str, provider: str) -> HTTPException:
    # 503, not 403: the request may be genuine, and the provider retries until we are set up.
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        f"{provider} webhooks are not configured: set {setting}",
    )


def _rejected(error: SignatureRejected) -> HTTPException:
    return HTTPException(status.HTTP_403_FORBIDDEN, error.reason)


async def _record(store: Store, events: list[DeliveryEvent]) -> FeedbackReceived:
    outcome = await run_in_threadpool(record_delivery_events, store, events)
    return FeedbackReceived(
        received=len(events),
        recorded=len(outcome.recorded),
        duplicates=len(outcome.duplicates),
        unmatched=len(outcome.unmatched),
    )


@webhooks.post("/sendgrid", responses=NOT_READABLE)
async def sendgrid_events(
    request: Request, store: StoreDep, settings: ChannelSettingsDep
) -> FeedbackReceived:
    """SendGrid's Event Webhook, signed: delivered, open, click, bounce, spamreport ..."""
    key = settings.sendgrid_webhook_public_key
    if not key:
        raise _not_configured("HILO_SENDGRID_WEBHOOK_PUBLIC_KEY", "SendGrid")
    signature = request.headers.get(SENDGRID_SIGNATURE, "")
    if not signature:  # refused before the body is read
        raise _rejected(SignatureRejected("sendgrid: signature header is missing"))
    body = await read_body(request, SENDGRID_MAX_BYTES)
    try:
        verify_sendgrid(key, body, signature, request.headers.get(SENDGRID_TIMESTAMP, ""))
    except SignatureRejected as error:
        raise _rejected(error) from None
    except ValueError as error:  # our key, not their request
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"HILO_SENDGRID_WEBHOOK_PUBLIC_KEY: {error}"
        ) from None
    try:
        events = parse_sendgrid(body)
    except ValueError as error:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(error)) from None
    return await _record(store, events)


@webhooks.post("/twilio", responses={**NOT_READABLE, **FORM_ONLY})
async def twilio_status(
    request: Request, store: StoreDep, settings: ChannelSettingsDep
) -> FeedbackReceived:
    """Twilio's status callback; ``?message_id=`` in the callback URL names our message."""
    auth_token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else ""
    if not auth_token:
        raise _not_configured("HILO_TWILIO_AUTH_TOKEN", "Twilio")
    signature = request.headers.get("X-Twilio-Signature", "")
    if not signature:  # refused before the body is read
        raise _rejected(SignatureRejected("twilio: X-Twilio-Signature header is missing"))
    params = await read_form(request, TWILIO_MAX_BYTES, TWILIO_MAX_FIELDS)
    # Twilio signs the URL it called, which is ours as the public sees it, not as we see it.
    url = settings.public_url + TWILIO_PATH
    if request.url.query:
        url += "?" + request.url.query
    try:
        verify_twilio(auth_token, url, params, signature)
    except SignatureRejected as error:
        raise _rejected(error) from None
    event = parse_twilio(params, message_id=request.query_params.get("message_id") or None)
    return await _record(store, [event] if event is not None else [])


@webhooks.get(
    "/whatsapp",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def whatsapp_verify(request: Request, settings: ChannelSettingsDep) -> PlainTextResponse:
    """Meta's subscription handshake: echo the challenge for our own verify token."""
    verify_token = (
        settings.whatsapp_verify_token.get_secret_value() if settings.whatsapp_verify_token else ""
    )
    challenge = whatsapp_challenge(
        request.query_params.get("hub.mode"),
        request.query_params.get("hub.verify_token"),
        request.query_params.get("hub.challenge"),
        verify_token,
    )
    if challenge is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "hub.verify_token does not match HILO_WHATSAPP_VERIFY_TOKEN (or hub.mode is not "
            "subscribe)",
        )
    return PlainTextResponse(challenge)


@webhooks.post("/whatsapp", responses=NOT_READABLE)
async def whatsapp_statuses(
    request: Request, store: StoreDep, settings: ChannelSettingsDep
) -> FeedbackReceived:
    """WhatsApp Cloud API webhooks: message statuses (incoming messages are skipped)."""
    secret = settings.whatsapp_app_secret.get_secret_value() if settings.whatsapp_app_secret else ""
    if not secret:
        raise _not_configured("HILO_WHATSAPP_APP_SECRET", "WhatsApp")
    signature = request.headers.get("X-Hub-Signature-256")
    if not signature:  # refused before the body is read
        raise _rejected(SignatureRejected("whatsapp: X-Hub-Signature-256 header is missing"))
    body = await read_body(request, WHATSAPP_MAX_BYTES)
    try:
        verify_whatsapp(secret, body, signature)
    except SignatureRejected as error:
        raise _rejected(error) from None
    try:
        events = parse_whatsapp(body)
    except ValueError as error:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(error)) from None
    return await _record(store, events)


# ================================================================ links

links = APIRouter(tags=["links"], responses={**INVALID_LINK, **SETTINGS_INVALID})
# The page's form posted back, or RFC 8058's one click.
FORM_REFUSED: Responses = {
    400: {
        "content": {
            **HTML,
            "text/plain": {"schema": {"type": "string"}},
            "application/json": {"schema": MESSAGE_SCHEMA},
        },
        "description": "The form cannot be read: the page again, saying what was wrong "
        "(JSON when it has more fields than a form of ours, or a file).",
    },
    **FORM_ONLY,
    **TOO_LARGE,
}


def _path(kind: LinkKind) -> str:
    return LINK_PATHS[kind] + "{token}"


def _page(html: str, status_code: int = status.HTTP_200_OK) -> HTMLResponse:
    return HTMLResponse(html, status_code=status_code, headers=PAGE_HEADERS)


def _verified(signer: LinkSigner, token: str, kind: LinkKind) -> LinkClaims | None:
    try:
        return signer.verify(token, kind)
    except LinkRejected as error:
        log.info("refused a %s link: %s", kind, error.reason)
        return None


def _invalid_link() -> HTMLResponse:
    return _page(render_invalid_link(), status.HTTP_404_NOT_FOUND)


async def _track(store: Store, event: DeliveryEvent) -> None:
    try:
        await run_in_threadpool(record_delivery_events, store, [event])
    except SQLAlchemyError:
        # The customer's click must reach its target even while the database is down.
        log.exception("could not record %s of message %s", event.status, event.message_id)


@links.get(_path("click"), response_class=RedirectResponse, status_code=status.HTTP_302_FOUND)
async def follow_click(token: str, store: StoreDep, signer: LinkSignerDep) -> Response:
    """Record the click, then send the customer to the target signed into the link."""
    claims = _verified(signer, token, "click")
    if claims is None or claims.target_url is None:
        return _invalid_link()
    await _track(store, tracked_click(claims))
    return RedirectResponse(
        claims.target_url,
        status_code=status.HTTP_302_FOUND,
        headers={**NO_STORE, "Referrer-Policy": "no-referrer"},
    )


@links.get(
    _path("open"),
    response_class=Response,
    responses={
        200: {"content": {"image/gif": {}}, "description": "A transparent 1x1 GIF."},
        404: {"description": "The link was changed, has expired or is of another kind."},
    },
)
async def open_pixel(token: str, store: StoreDep, signer: LinkSignerDep) -> Response:
    """The open pixel: a transparent 1x1 GIF, never cached, so each load reaches us."""
    claims = _verified(signer, token, "open")
    if claims is None or claims.message_id is None:
        return Response(status_code=status.HTTP_404_NOT_FOUND, headers=NO_STORE)
    await _track(store, tracked_open(claims.message_id))
    return Response(PIXEL, media_type="image/gif", headers=NO_STORE)


def _topic_keys(settings: Settings) -> set[str]:
    return {topic.key for topic in settings.preference_topics}


def _preference_page(
    kind: LinkKind,
    token: str,
    store: Store,
    settings: Settings,
    signer: LinkSigner,
) -> HTMLResponse:
    claims = _verified(signer, token, kind)
    if claims is None or claims.customer_id is None:
        return _invalid_link()
    current = current_preferences(store, claims.customer_id, _topic_keys(settings))
    action = signer.base_url + LINK_PATHS[kind] + token
    return _page(render_preference_page(claims, current, settings.preference_topics, action))


@links.get(_path("unsubscribe"), response_class=HTMLResponse)
def unsubscribe_page(
    token: str, store: StoreDep, settings: ChannelSettingsDep, signer: LinkSignerDep
) -> HTMLResponse:
    """The elegant exit: gentler options first, and leaving in one click all the same."""
    return _preference_page("unsubscribe", token, store, settings, signer)


@links.post(
    _path("unsubscribe"),
    response_class=HTMLResponse,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "The confirmation page; plain text after a one-click unsubscribe.",
        },
        **FORM_REFUSED,
    },
)
async def unsubscribe_post(
    token: str,
    request: Request,
    store: StoreDep,
    settings: ChannelSettingsDep,
    signer: LinkSignerDep,
) -> Response:
    """RFC 8058 one-click (``List-Unsubscribe=One-Click``), or the page's form."""
    claims = _verified(signer, token, "unsubscribe")
    if claims is None or claims.customer_id is None:
        return _invalid_link()  # before the body is read
    form = await read_form(request, LINK_FORM_MAX_BYTES, LINK_FORM_MAX_FIELDS)
    if form.get("List-Unsubscribe") == "One-Click":
        await run_in_threadpool(
            unsubscribe, store, claims, ONE_CLICK_SOURCE, known_topics=_topic_keys(settings)
        )
        return PlainTextResponse("You are unsubscribed.\n", headers=NO_STORE)
    if "opt_out" not in form and "frequency" not in form:
        return PlainTextResponse(
            "Expected the body List-Unsubscribe=One-Click (RFC 8058) or the form of the "
            "unsubscribe page.\n",
            status_code=status.HTTP_400_BAD_REQUEST,
            headers=NO_STORE,
        )
    action = signer.base_url + LINK_PATHS["unsubscribe"] + token
    return await _save_choices(store, settings, signer, form, claims, action)


@links.get(_path("preferences"), response_class=HTMLResponse)
def preference_page(
    token: str, store: StoreDep, settings: ChannelSettingsDep, signer: LinkSignerDep
) -> HTMLResponse:
    return _preference_page("preferences", token, store, settings, signer)


@links.post(_path("preferences"), response_class=HTMLResponse, responses=FORM_REFUSED)
async def preference_form(
    token: str,
    request: Request,
    store: StoreDep,
    settings: ChannelSettingsDep,
    signer: LinkSignerDep,
) -> HTMLResponse:
    claims = _verified(signer, token, "preferences")
    if claims is None or claims.customer_id is None:
        return _invalid_link()  # before the body is read
    form = await read_form(request, LINK_FORM_MAX_BYTES, LINK_FORM_MAX_FIELDS)
    action = signer.base_url + LINK_PATHS["preferences"] + token
    return await _save_choices(store, settings, signer, form, claims, action)


async def _save_choices(
    store: Store,
    settings: Settings,
    signer: LinkSigner,
    form: dict[str, str],
    claims: LinkClaims,
    action: str,
) -> HTMLResponse:
    """Apply the preference form; the page again, with what was wrong, when it can't be read."""
    customer_id = claims.customer_id
    assert customer_id is not None  # the callers checked
    topics = settings.preference_topics
    keys = _topic_keys(settings)
    current = await run_in_threadpool(current_preferences, store, customer_id, keys)
    try:
        change = parse_preference_form(form, utcnow(), current=current, known_topics=keys)
    except PreferenceFormError as error:
        page = render_preference_page(claims, current, topics, action, errors=error.errors)
        return _page(page, status.HTTP_400_BAD_REQUEST)
    if change.opt_out and claims.kind == "unsubscribe":
        # The page's button says "all marketing": the whole channel, whatever the topic.
        await run_in_threadpool(
            unsubscribe, store, replace(claims, topic=None), UNSUBSCRIBE_PAGE_SOURCE
        )
    else:
        await run_in_threadpool(
            lambda: apply_preferences(
                store, customer_id, change, source=PREFERENCE_PAGE_SOURCE, known_topics=keys
            )
        )
    page = render_confirmation(
        change,
        topics,
        preferences_url=signer.preferences_url(customer_id),
        channel=claims.channel,
    )
    return _page(page)


# ================================================================ the router to include

feedback_router = APIRouter()
feedback_router.include_router(webhooks)
feedback_router.include_router(links)
