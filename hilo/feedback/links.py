"""Signed links in our messages: unsubscribe, preferences, click tracking and the open pixel.

A token is ``v1.<payload>.<signature>``: the payload is URL-safe base64 JSON of the claims,
the signature an HMAC-SHA256 under a key derived from the secret *and the link's kind*, so
a token verifies with nothing but the secret, and only as the kind it was made for. The
customer, message, channel, topic and click target all sit inside the signed payload: none
can be changed, and a link cannot be moved to another customer or used as another kind.

    Exception
    └── LinkRejected   changed, expired, of another kind, or signed with a key we don't have

An unsubscribe link only identifies; the endpoint behind it unsubscribes on POST (RFC 8058
one-click, or the page's button), so a mail scanner fetching it with GET changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html import escape, unescape
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from hilo.clock import utcnow
from hilo.errors import Rejected
from hilo.ids import b64url, b64url_decode

__all__ = [
    "LINK_PATHS",
    "PREFERENCES_TTL",
    "LinkClaims",
    "LinkKind",
    "LinkRejected",
    "LinkSigner",
    "TemplateLinks",
    "rewrite_links",
]

LinkKind = Literal["unsubscribe", "preferences", "click", "open"]
KINDS: tuple[LinkKind, ...] = get_args(LinkKind)
VERSION = "v1"
# Where the API mounts each kind; the token is the last path segment.
LINK_PATHS: dict[LinkKind, str] = {
    "unsubscribe": "/l/u/",
    "preferences": "/l/p/",
    "click": "/l/c/",
    "open": "/l/o/",
}
PREFERENCES_TTL = timedelta(days=60)
# The id of the preference page's pause choices (render_preference_page writes it).
PAUSE_FRAGMENT = "#pause"
MIN_SECRET_LENGTH = 32


class LinkRejected(Rejected):
    """A link token we will not act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class LinkClaims:
    """What a verified link says; fields a kind does not use are None."""

    kind: LinkKind
    issued_at: datetime
    expires_at: datetime | None = None
    customer_id: str | None = None
    message_id: str | None = None
    channel: str | None = None
    topic: str | None = None
    target_url: str | None = None


# Short keys keep the links short: a click link is in every tracked href of an email.
_FIELDS = {
    "customer_id": "c",
    "message_id": "m",
    "channel": "ch",
    "topic": "t",
    "target_url": "u",
}


def _is_web_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _required(value: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: must be a non-empty string")
    return value


class LinkSigner:
    """Makes and checks our signed links; ``previous_secrets`` still verify after a rotation."""

    def __init__(self, secret: str, base_url: str, *, previous_secrets: Sequence[str] = ()) -> None:
        for name, value in [
            ("secret", secret),
            *(("previous_secrets", s) for s in previous_secrets),
        ]:
            if len(value) < MIN_SECRET_LENGTH:
                raise ValueError(
                    f"link {name}: needs at least {MIN_SECRET_LENGTH} characters of random text, "
                    "for example from secrets.token_urlsafe(32)"
                )
        if not _is_web_url(base_url):
            raise ValueError(f"link base_url: {base_url!r} is not an http(s) URL")
        self.base_url = base_url.rstrip("/")
        self._keys = [self._kind_keys(s) for s in (secret, *previous_secrets)]

    @staticmethod
    def _kind_keys(secret: str) -> dict[LinkKind, bytes]:
        # One key per kind: a token signed as one kind can never verify as another.
        return {
            kind: hmac.new(
                secret.encode(), f"hilo-link/{VERSION}/{kind}".encode(), hashlib.sha256
            ).digest()
            for kind in KINDS
        }

    # --- making links ---------------------------------------------------------------------

    def unsubscribe_url(
        self,
        message_id: str,
        customer_id: str,
        channel: str,
        topic: str | None = None,
        *,
        now: datetime | None = None,
    ) -> str:
        # No expiry: an unsubscribe link in a years-old email must still work.
        return self._url(
            "unsubscribe",
            now,
            None,
            message_id=_required(message_id, "message_id"),
            customer_id=_required(customer_id, "customer_id"),
            channel=_required(channel, "channel"),
            topic=topic,
        )

    def preferences_url(
        self, customer_id: str, *, ttl: timedelta = PREFERENCES_TTL, now: datetime | None = None
    ) -> str:
        return self._url("preferences", now, ttl, customer_id=_required(customer_id, "customer_id"))

    def pause_url(
        self, customer_id: str, *, ttl: timedelta = PREFERENCES_TTL, now: datetime | None = None
    ) -> str:
        """The preference page opened at its "Take a break" choices: a GET changes nothing,
        the customer picks the pause there and saves."""
        return self.preferences_url(customer_id, ttl=ttl, now=now) + PAUSE_FRAGMENT

    def message_links(
        self,
        message_id: str,
        customer_id: str,
        channel: str,
        *,
        templates: Iterable[str] | None = None,
        now: datetime | None = None,
    ) -> dict[str, str]:
        """The links every template can show, by the variable that holds each.

        The unsubscribe link always (providers put it in the List-Unsubscribe header); the
        others only when one of ``templates`` names them, when given: each costs a signature
        on every send (about 7 us).
        """
        sources = None if templates is None else " ".join(templates)
        links = {"unsubscribe_url": self.unsubscribe_url(message_id, customer_id, channel, now=now)}
        if sources is None or "preferences_url" in sources:
            links["preferences_url"] = self.preferences_url(customer_id, now=now)
        if sources is None or "pause_url" in sources:
            links["pause_url"] = self.pause_url(customer_id, now=now)
        return links

    def click_url(self, message_id: str, target_url: str, *, now: datetime | None = None) -> str:
        if not _is_web_url(target_url):
            raise ValueError(f"target_url: {target_url!r} is not an http(s) URL")
        return self._url(
            "click",
            now,
            None,
            message_id=_required(message_id, "message_id"),
            target_url=target_url,
        )

    def open_pixel_url(self, message_id: str, *, now: datetime | None = None) -> str:
        return self._url("open", now, None, message_id=_required(message_id, "message_id"))

    def is_own_link(self, url: str) -> bool:
        """Whether ``url`` is one of our signed links (never wrapped in click tracking)."""
        return any(url.startswith(self.base_url + path) for path in LINK_PATHS.values())

    def _url(
        self, kind: LinkKind, now: datetime | None, ttl: timedelta | None, **fields: str | None
    ) -> str:
        return self.base_url + LINK_PATHS[kind] + self.sign(kind, now=now, ttl=ttl, **fields)

    def sign(
        self,
        kind: LinkKind,
        *,
        now: datetime | None = None,
        ttl: timedelta | None = None,
        **fields: str | None,
    ) -> str:
        """A bare token; the ``*_url`` methods are what messages use."""
        issued = now or utcnow()
        claims: dict[str, Any] = {"k": kind, "iat": int(issued.timestamp())}
        if ttl is not None:
            claims["exp"] = int((issued + ttl).timestamp())
        for name, value in fields.items():
            if value is not None:
                claims[_FIELDS[name]] = value
        payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{VERSION}.{payload}"
        return f"{signing_input}.{self._mac(self._keys[0][kind], signing_input)}"

    @staticmethod
    def _mac(key: bytes, signing_input: str) -> str:
        return b64url(hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest())

    # --- checking links -------------------------------------------------------------------

    def verify(self, token: str, kind: LinkKind, *, now: datetime | None = None) -> LinkClaims:
        """The claims of a token made by us as ``kind``, or LinkRejected saying why not."""
        # Tokens are ASCII by construction; anything else came from someone else.
        parts = token.split(".") if isinstance(token, str) and token.isascii() else []
        if len(parts) != 3 or not all(parts):
            raise LinkRejected("link token is malformed")
        version, payload, signature = parts
        if version != VERSION:
            raise LinkRejected(f"link token version {version!r} is not supported")
        signing_input = f"{version}.{payload}"
        if not self._matches(kind, signing_input, signature):
            other = next(
                (k for k in KINDS if k != kind and self._matches(k, signing_input, signature)),
                None,
            )
            if other is not None:
                raise LinkRejected(f"this is a {other} link, not a {kind} link")
            raise LinkRejected("link signature does not match: it was changed or is not ours")
        try:
            claims = json.loads(b64url_decode(payload))
            if not isinstance(claims, dict):
                raise ValueError("not an object")
            issued_at = datetime.fromtimestamp(int(claims["iat"]), UTC)
            expires_at = (
                datetime.fromtimestamp(int(claims["exp"]), UTC) if "exp" in claims else None
            )
        except (ValueError, KeyError, TypeError, OverflowError) as error:
            # Only reachable with our own key: a bug in signing, not an attacker.
            raise LinkRejected(f"link payload is unreadable: {error}") from error
        if claims.get("k") != kind:
            raise LinkRejected(f"this is a {claims.get('k')} link, not a {kind} link")
        if expires_at is not None and (now or utcnow()) >= expires_at:
            raise LinkRejected(f"link expired on {expires_at:%Y-%m-%d}: ask for a new one")
        result = LinkClaims(
            kind=kind,
            issued_at=issued_at,
            expires_at=expires_at,
            **{name: claims.get(short) for name, short in _FIELDS.items()},
        )
        if kind == "click" and not _is_web_url(result.target_url or ""):
            raise LinkRejected("click link has no http(s) target")
        return result

    def _matches(self, kind: LinkKind, signing_input: str, signature: str) -> bool:
        return any(
            hmac.compare_digest(self._mac(keys[kind], signing_input), signature)
            for keys in self._keys
        )

    def click_target(self, token: str, *, now: datetime | None = None) -> str:
        """Where a click redirects: the signed target and nothing else (no open redirect)."""
        target = self.verify(token, "click", now=now).target_url
        if target is None:  # verify already refuses this; keeps the type exact
            raise LinkRejected("click link has no target")
        return target


# --- rewriting an email's HTML ---------------------------------------------------------------

_ANCHOR = re.compile(r"<a\b[^>]*>", re.IGNORECASE)
_HREF = re.compile(
    r"""(?P<name>\bhref\s*=\s*)(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<bare>[^\s"'>]+))""",
    re.IGNORECASE,
)
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
_LIQUID = re.compile(r"\{\{|\{%")
# A scheme and a whole host: what follows the host can no longer move the link elsewhere.
_WHOLE_HOST = re.compile(r"https?://[^/?#\\\s]+[/?#]", re.IGNORECASE)


def _href(tag: str) -> tuple[re.Match[str], str] | None:
    href = _HREF.search(tag)
    if href is None:
        return None
    raw = href.group("dq") or href.group("sq") or href.group("bare") or ""
    return href, unescape(raw).strip()


@dataclass(frozen=True)
class TemplateLinks:
    """The links an email template writes itself: the only ones click tracking signs.

    An href written out in full is trusted as it is. An href with Liquid in it is trusted
    when the template writes its scheme and host before the Liquid
    (``https://shop.example/p/{{ product.id }}``): any rendering that begins with that
    written part is trusted. An href whose host comes from data (``{{ product.url }}``,
    ``https://{{ shop }}/``) is sent as it is and not tracked, and so is any link a value
    brought in (escaped in HTML bodies, or marked ``| safe``): a signed click link would
    lend our domain to wherever the data points.
    """

    urls: frozenset[str]
    prefixes: tuple[str, ...]

    @classmethod
    def of(cls, template: str) -> TemplateLinks:
        urls: set[str] = set()
        prefixes: set[str] = set()
        for anchor in _ANCHOR.finditer(template):
            found = _href(anchor.group(0))
            if found is None:
                continue
            target = found[1]
            liquid = _LIQUID.search(target)
            if liquid is None:
                urls.add(target)
            elif _WHOLE_HOST.match(target[: liquid.start()]):
                prefixes.add(target[: liquid.start()])
        return cls(frozenset(urls), tuple(sorted(prefixes)))

    def trusts(self, url: str) -> bool:
        return url in self.urls or url.startswith(self.prefixes)


def rewrite_links(html: str, message_id: str, signer: LinkSigner, *, template: str) -> str:
    """Wrap the http(s) links of an email in click tracking and add the open pixel.

    Only links the ``template`` itself writes are wrapped (:class:`TemplateLinks`).
    mailto:, tel:, anchors, relative links, our own signed links and any unsubscribe link
    stay as they are: a tracked unsubscribe would count as a click and hide the real
    target from mailbox providers.
    """
    trusted = TemplateLinks.of(template)

    def track_anchor(anchor: re.Match[str]) -> str:
        tag = anchor.group(0)
        found = _href(tag)
        if found is None:
            return tag
        href, target = found
        if (
            not _is_web_url(target)
            or signer.is_own_link(target)
            or "unsubscribe" in target.lower()
            or not trusted.trusts(target)
        ):
            return tag
        tracked = signer.click_url(message_id, target)
        start, end = href.span()
        return f'{tag[:start]}{href.group("name")}"{escape(tracked, quote=True)}"{tag[end:]}'

    tracked_html = _ANCHOR.sub(track_anchor, html)
    if message_id in _pixel_messages(tracked_html, signer):
        return tracked_html  # rewritten before: one pixel is enough
    pixel = (
        f'<img src="{escape(signer.open_pixel_url(message_id), quote=True)}" width="1" '
        'height="1" alt="" style="display:block;width:1px;height:1px;border:0" />'
    )
    ends = list(_BODY_END.finditer(tracked_html))
    if not ends:
        return tracked_html + pixel
    at = ends[-1].start()
    return tracked_html[:at] + pixel + tracked_html[at:]


_PIXEL_SRC = re.compile(r"""<img\b[^>]*\bsrc\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


def _pixel_messages(html: str, signer: LinkSigner) -> set[str]:
    """Message ids of the open pixels already in ``html``."""
    prefix = signer.base_url + LINK_PATHS["open"]
    found = set()
    for match in _PIXEL_SRC.finditer(html):
        src = unescape(match.group(1))
        if src.startswith(prefix):
            try:
                claims = signer.verify(src[len(prefix) :], "open")
            except LinkRejected:
                continue
            if claims.message_id:
                found.add(claims.message_id)
    return found
