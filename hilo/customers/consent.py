"""Consent defaults and where each channel's address lives on a profile. Every change of
consent is written by :func:`hilo.db.consent.change_consent`."""

from __future__ import annotations

# Where no consent was recorded: email is opt-out (soft opt-in), the rest need an opt-in.
CONSENT_DEFAULTS = {
    "email": True,
    "sms": False,
    "whatsapp": False,
    "push": False,
    "webpush": False,
}
# The trait that holds a channel's address; push and web push reach devices instead.
ADDRESS_TRAITS = {"email": "email", "sms": "phone", "whatsapp": "phone"}
DEVICE_CHANNELS = frozenset({"push", "webpush"})
# What the customer chose on the preference page (frequency, pause, topics) is kept on the
# profile under this trait; the page is about marketing on this channel.
PREFERENCES_TRAIT = "preferences"
PREFERENCE_CHANNEL = "email"
# How far apart marketing on that channel may go out when the customer asked for less.
FREQUENCY_SPACING_DAYS = {"weekly": 7, "monthly": 30}

# The channels a customer can grant or withdraw consent for.
CONSENT_CHANNELS = ("email", "sms", "whatsapp", "push", "webpush")
