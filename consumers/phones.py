"""Phone numbers to E.164, with Google's libphonenumber (the ``phonenumbers`` package).

Onoff sends numbers as its users typed or received them ("0612345678", "+33 6 12 34 56 78",
"0033612345678"). A number with an international prefix is read as is; a national one is
read in ``default_region`` (an ISO 3166 code such as FR, the country most of the company's
numbers belong to). Short codes and alphanumeric sender names are not phone numbers: None.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import phonenumbers

from onoff_events.settings import SettingsError


@lru_cache(maxsize=65_536)
def to_e164(raw: str, default_region: str | None) -> str | None:
    """``raw`` as E.164 (``+33612345678``), or None when it is not a valid phone number."""
    text = raw.strip()
    if text.startswith("00"):
        text = "+" + text[2:]
    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def masked(e164: str) -> str:
    """A number as on-call people may see it: country code and last two digits."""
    try:
        country = f"+{phonenumbers.parse(e164, None).country_code}"
    except phonenumbers.NumberParseException:
        return "•••"
    hidden = len(e164) - len(country) - 2
    return f"{country}{'•' * hidden}{e164[-2:]}" if hidden > 0 else "•••"


def phone_region(env: Mapping[str, str]) -> str | None:
    """``PHONE_DEFAULT_REGION`` (default FR): the country of numbers written without +."""
    region = env.get("PHONE_DEFAULT_REGION", "FR").strip().upper()
    if not region:
        return None
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise SettingsError(f"PHONE_DEFAULT_REGION: not an ISO 3166 region code: {region!r}")
    return region
