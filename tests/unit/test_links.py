"""Our signed links, the email rewrite that uses them, and the preference page behind them."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import pytest

from hilo.feedback.links import LinkKind, LinkRejected, LinkSigner, rewrite_links
from hilo.feedback.preferences import (
    PreferenceChange,
    PreferenceFormError,
    PreferenceState,
    Topic,
    parse_preference_form,
    render_confirmation,
    render_preference_page,
)
from hilo.ids import b64url, b64url_decode

SECRET = "k3j4h5g6f7d8s9a0q1w2e3r4t5y6u7i8o9p0"
BASE = "https://hilo.shop.example"
NOW = datetime(2027, 6, 1, 9, 30, tzinfo=UTC)


@pytest.fixture
def signer() -> LinkSigner:
    return LinkSigner(SECRET, BASE + "/")


def token_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def with_claims(token: str, **changes: object) -> str:
    """The same token with its payload edited and the original signature kept."""
    version, payload, signature = token.split(".")
    claims = json.loads(b64url_decode(payload))
    claims.update(changes)
    return f"{version}.{b64url(json.dumps(claims, separators=(',', ':')).encode())}.{signature}"


# --- signing and verifying ------------------------------------------------------------------


def test_unsubscribe_link_round_trip(signer: LinkSigner) -> None:
    url = signer.unsubscribe_url("msg_1", "cust_42", "email", "new-arrivals", now=NOW)
    assert url.startswith(f"{BASE}/l/u/v1.")
    claims = signer.verify(token_of(url), "unsubscribe", now=NOW)
    assert (claims.customer_id, claims.message_id, claims.channel, claims.topic) == (
        "cust_42",
        "msg_1",
        "email",
        "new-arrivals",
    )
    assert claims.issued_at == NOW.replace(second=0)
    # Unsubscribing must still work from a years-old email.
    assert claims.expires_at is None
    signer.verify(token_of(url), "unsubscribe", now=NOW + timedelta(days=5 * 365))


def test_link_cannot_be_moved_to_another_customer(signer: LinkSigner) -> None:
    token = token_of(signer.unsubscribe_url("msg_1", "cust_42", "email", now=NOW))
    with pytest.raises(LinkRejected, match="changed or is not ours"):
        signer.verify(with_claims(token, c="cust_43"), "unsubscribe")
    with pytest.raises(LinkRejected, match="changed or is not ours"):
        signer.verify(with_claims(token, t="everything"), "unsubscribe")


@pytest.mark.parametrize(
    ("make", "used_as"),
    [
        (lambda s: s.click_url("msg_1", "https://shop.example/"), "unsubscribe"),
        (lambda s: s.open_pixel_url("msg_1"), "click"),
        (lambda s: s.unsubscribe_url("msg_1", "cust_42", "email"), "preferences"),
        (lambda s: s.preferences_url("cust_42"), "unsubscribe"),
    ],
    ids=["click as unsubscribe", "open as click", "unsubscribe as preferences", "prefs as unsub"],
)
def test_link_cannot_be_used_as_another_kind(
    signer: LinkSigner, make: Callable[[LinkSigner], str], used_as: LinkKind
) -> None:
    token = token_of(make(signer))
    with pytest.raises(LinkRejected, match=f"not a {used_as} link"):
        signer.verify(token, used_as)
    # Rewriting the kind inside the payload breaks the signature instead.
    with pytest.raises(LinkRejected):
        signer.verify(with_claims(token, k=used_as[0]), used_as)


def test_forged_and_malformed_tokens_are_refused(signer: LinkSigner) -> None:
    theirs = LinkSigner("an-attacker-who-guessed-the-format-0000", BASE)
    forged = token_of(theirs.unsubscribe_url("msg_1", "cust_42", "email"))
    with pytest.raises(LinkRejected, match="not ours"):
        signer.verify(forged, "unsubscribe")
    genuine = token_of(signer.unsubscribe_url("msg_1", "cust_42", "email"))
    version, payload, signature = genuine.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    for token in [
        "",
        "v1",
        "v1.abc",
        "v1..sig",
        f"v2.{payload}.{signature}",
        f"v1.{payload}.{flipped}",
        f"v1.{payload}.{signature[:-1]}é",
    ]:
        with pytest.raises(LinkRejected):
            signer.verify(token, "unsubscribe")


def test_preferences_link_expires_after_60_days(signer: LinkSigner) -> None:
    token = token_of(signer.preferences_url("cust_42", now=NOW))
    claims = signer.verify(token, "preferences", now=NOW + timedelta(days=59))
    assert claims.expires_at == NOW.replace(second=0) + timedelta(days=60)
    with pytest.raises(LinkRejected, match="expired on 2027-07-31"):
        signer.verify(token, "preferences", now=NOW + timedelta(days=60))
    # Pushing the expiry out by hand breaks the signature.
    late = with_claims(token, exp=int((NOW + timedelta(days=600)).timestamp()))
    with pytest.raises(LinkRejected, match="changed"):
        signer.verify(late, "preferences", now=NOW + timedelta(days=61))


def test_rotated_secret_still_verifies_old_links() -> None:
    old = LinkSigner(SECRET, BASE)
    token = token_of(old.preferences_url("cust_42", now=NOW))
    new = LinkSigner("a-brand-new-secret-of-enough-length-xyz", BASE, previous_secrets=[SECRET])
    assert new.verify(token, "preferences", now=NOW).customer_id == "cust_42"
    with pytest.raises(LinkRejected):
        LinkSigner("a-brand-new-secret-of-enough-length-xyz", BASE).verify(
            token, "preferences", now=NOW
        )


def test_signer_refuses_weak_settings() -> None:
    with pytest.raises(ValueError, match="link secret: needs at least 32 characters"):
        LinkSigner("changeme", BASE)
    with pytest.raises(ValueError, match="link base_url"):
        LinkSigner(SECRET, "hilo.shop.example")
    with pytest.raises(ValueError, match="customer_id"):
        LinkSigner(SECRET, BASE).unsubscribe_url("msg_1", " ", "email")


def test_click_redirects_only_to_the_signed_target(signer: LinkSigner) -> None:
    url = signer.click_url("msg_1", "https://shop.example/cart?id=7&utm_source=hilo")
    assert signer.click_target(token_of(url)) == "https://shop.example/cart?id=7&utm_source=hilo"
    with pytest.raises(LinkRejected):
        signer.click_target(with_claims(token_of(url), u="https://evil.example/"))
    # A query string is not part of the token: nothing in the request can pick the target.
    assert "?" not in url
    for target in ["javascript:alert(1)", "//evil.example/", "/relative", "data:text/html,x"]:
        with pytest.raises(ValueError, match="target_url"):
            signer.click_url("msg_1", target)


# --- rewriting an email ---------------------------------------------------------------------

EMAIL = """<!DOCTYPE html>
<html><body>
<p>Your cart misses you.
<a href="https://shop.example/cart?id=7&amp;utm_source=hilo">Back to it</a></p>
<p><a class="cta" href='http://shop.example/sale'>Sale</a> <a href=https://shop.example/bare>Bare</a></p>
<p><a href="mailto:help@shop.example">Write to us</a> <a href="tel:+14155550123">Call</a>
<a href="#top">Top</a> <a href="/account">Account</a> <a name="x">No href</a></p>
<p><a href="{unsubscribe}">Unsubscribe</a>
<a href="https://list.example/unsubscribe?u=1">Leave list</a></p>
</BODY></html>"""


class Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "a" and values.get("href"):
            self.hrefs.append(values["href"] or "")
        if tag == "img":
            self.images.append(values.get("src") or "")


def parsed(html: str) -> Anchors:
    anchors = Anchors()
    anchors.feed(html)
    return anchors


def test_rewrite_tracks_web_links_and_keeps_the_rest(signer: LinkSigner) -> None:
    unsubscribe = signer.unsubscribe_url("msg_1", "cust_42", "email")
    email = EMAIL.replace("{unsubscribe}", unsubscribe)
    html = rewrite_links(email, "msg_1", signer, template=email)
    hrefs = parsed(html).hrefs
    tracked = [href for href in hrefs if href.startswith(f"{BASE}/l/c/")]
    assert [signer.click_target(token_of(href)) for href in tracked] == [
        "https://shop.example/cart?id=7&utm_source=hilo",  # &amp; read as &
        "http://shop.example/sale",
        "https://shop.example/bare",
    ]
    assert all(signer.verify(token_of(h), "click").message_id == "msg_1" for h in tracked)
    assert [href for href in hrefs if href not in tracked] == [
        "mailto:help@shop.example",
        "tel:+14155550123",
        "#top",
        "/account",
        unsubscribe,
        "https://list.example/unsubscribe?u=1",
    ]
    assert 'class="cta"' in html and '<a name="x">' in html


def test_rewrite_adds_one_open_pixel_before_body_end(signer: LinkSigner) -> None:
    html = rewrite_links(EMAIL, "msg_1", signer, template=EMAIL)
    [pixel] = parsed(html).images
    assert signer.verify(token_of(pixel), "open").message_id == "msg_1"
    assert html.index(pixel) < html.index("</BODY>")
    # Rewriting again neither wraps a tracked link twice nor adds a second pixel.
    assert rewrite_links(html, "msg_1", signer, template=EMAIL) == html


def test_rewrite_without_body_appends_the_pixel(signer: LinkSigner) -> None:
    email = '<p><a href="https://shop.example/">Shop</a></p>'
    html = rewrite_links(email, "msg_1", signer, template=email)
    assert html.endswith('border:0" />')
    assert html.startswith('<p><a href="https://hilo.shop.example/l/c/v1.')


# --- the preference page ----------------------------------------------------------------------

TOPICS = [
    Topic(key="new-arrivals", name="New arrivals", description="Fresh stock, once it lands."),
    Topic(key="sales", name="Sales & offers"),
]


def test_form_reads_every_choice() -> None:
    form = {
        "frequency": "weekly",
        "pause": "30d",
        "topic:sales": "yes",
        "topic:new-arrivals": "yes",
    }
    change = parse_preference_form(form, NOW, known_topics={"sales", "new-arrivals"})
    assert change == PreferenceChange(
        frequency="weekly",
        pause_until=NOW + timedelta(days=30),
        topics=["new-arrivals", "sales"],
        opt_out=False,
    )


def test_form_errors_name_every_wrong_field() -> None:
    form = {"frequency": "daily", "pause": "forever", "topic:crypto": "yes", "opt_out": "maybe"}
    with pytest.raises(PreferenceFormError) as caught:
        parse_preference_form(form, NOW, known_topics={"sales"})
    assert set(caught.value.errors) == {"frequency", "pause", "topic:crypto", "opt_out"}
    message = str(caught.value)
    assert "frequency: 'daily' is not one of normal, weekly or monthly" in message
    assert "pause: 'forever' is not one of no, 30d or keep" in message
    assert "topic:crypto: 'crypto' is not a topic we send" in message
    with pytest.raises(PreferenceFormError, match="frequency: choose how often"):
        parse_preference_form({}, NOW)


def test_unsubscribe_button_always_works() -> None:
    change = parse_preference_form({"frequency": "daily", "opt_out": "yes"}, NOW)
    assert change.opt_out and change.pause_until is None


def test_keep_pause_keeps_only_a_pause_still_running() -> None:
    paused = PreferenceState(pause_until=NOW + timedelta(days=12))
    kept = parse_preference_form({"frequency": "normal", "pause": "keep"}, NOW, current=paused)
    assert kept.pause_until == NOW + timedelta(days=12)
    later = parse_preference_form(
        {"frequency": "normal", "pause": "keep"}, NOW + timedelta(days=13), current=paused
    )
    assert later.pause_until is None


def test_page_shows_current_choices_and_labels_every_input() -> None:
    current = PreferenceState(
        frequency="monthly", pause_until=NOW + timedelta(days=3), topics=["sales"]
    )
    html = render_preference_page(None, current, TOPICS, "/l/p/v1.abc.def", now=NOW)
    assert html.startswith("<!DOCTYPE html>") and '<html lang="en">' in html
    checked = re.findall(r'<input [^>]*id="([^"]+)"[^>]* checked>', html)
    assert checked == ["frequency-monthly", "pause-keep", "topic-sales"]
    ids = re.findall(r'<input [^>]*id="([^"]+)"', html)
    assert ids and all(f'<label for="{element}">' in html for element in ids)
    assert "Stay paused until 4 June 2027" in html
    assert "Unsubscribe from all marketing email" in html
    # Self-contained: nothing to fetch, nothing to run.
    assert not re.search(r"<script|<link|src=|url\(|@import", html)


def test_page_escapes_everything_it_did_not_write() -> None:
    topics = [Topic(key="x", name='<img src=x onerror="alert(1)">', description="Tom & Jerry")]
    html = render_preference_page(
        None, PreferenceState(), topics, '/l/p/"><script>alert(1)</script>', now=NOW
    )
    assert "<script>" not in html and "<img" not in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html
    assert "Tom &amp; Jerry" in html
    assert 'action="/l/p/&#34;&gt;&lt;script&gt;' in html


def test_page_shows_errors_by_their_fields() -> None:
    errors = {"frequency": "'daily' is not one of normal, weekly or monthly"}
    html = render_preference_page(None, PreferenceState(), TOPICS, "/l/p/t", errors=errors, now=NOW)
    assert 'role="alert"' in html
    assert '<a href="#frequency">frequency</a>: &#39;daily&#39; is not one of' in html
    assert (
        '<fieldset id="frequency" aria-invalid="true" aria-describedby="frequency-error">' in html
    )


def test_page_from_an_sms_unsubscribe_link_speaks_of_text_messages(signer: LinkSigner) -> None:
    token = token_of(signer.unsubscribe_url("msg_1", "cust_42", "sms"))
    claims = signer.verify(token, "unsubscribe")
    html = render_preference_page(claims, PreferenceState(), [], "/l/u/" + token, now=NOW)
    assert "Unsubscribe from all marketing text messages" in html
    assert "Too many texts? Before you go" in html


def test_confirmation_says_what_happens_next() -> None:
    left = render_confirmation(
        PreferenceChange(frequency="normal", pause_until=None, topics=[], opt_out=True),
        TOPICS,
        preferences_url="/l/p/t?a=1&b=2",
    )
    assert "You're unsubscribed" in left and 'href="/l/p/t?a=1&amp;b=2"' in left
    paused = render_confirmation(
        PreferenceChange(
            frequency="weekly",
            pause_until=NOW + timedelta(days=30),
            topics=["sales"],
            opt_out=False,
        ),
        TOPICS,
    )
    assert "until 1 July 2027" in paused
    assert "at most once a week" in paused
    assert "Topics: Sales &amp; offers." in paused
