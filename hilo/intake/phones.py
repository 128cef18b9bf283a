"""Phone numbers in E.164 (``+34600000000``), the form SMS and WhatsApp providers take, from
whatever a source sends: spaces, dashes, brackets, a ``00`` international prefix."""

from __future__ import annotations

import phonenumbers

__all__ = ["PHONE_HINT", "e164"]

PHONE_HINT = (
    "must be a phone number with its country code, such as +34 600 000 000 or +1 (415) 555-0100"
)


def e164(value: object) -> str | None:
    """``value`` in E.164, or None when it is not a phone number with a country code."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip()
    if text.startswith("00"):
        text = "+" + text[2:]
    elif isinstance(value, int):
        text = "+" + text  # a number as digits: the country code comes first
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
