"""API-key authentication, pure: header values in, the authenticated key's label out.

Onoff sends ``Authorization: x-api-key <key>`` (its documentation, Authorization section); a
bare ``X-API-Key: <key>`` is accepted too. Several keys may be valid at once, so a key can be
rotated without downtime; each carries a label that is safe to log and to use as a metric label.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from enum import StrEnum

from onoff_events.settings import SettingsError

MIN_KEY_LENGTH = 16
# Labels are shorter than any key, so a pair written the wrong way round (key:label) is always
# refused instead of turning the key into a label that is logged and used as a metric label.
MAX_LABEL_LENGTH = MIN_KEY_LENGTH - 1
_LABEL = re.compile(rf"^[A-Za-z0-9_.-]{{1,{MAX_LABEL_LENGTH}}}$")
_SCHEME = "x-api-key"


class AuthFailure(StrEnum):
    """Why a request was refused; the values are metric labels."""

    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """The keys accepted now, as (label, SHA-256 of the key) pairs."""

    # Digests of the keys stay out of repr: unsalted, they still identify a key.
    digests: tuple[tuple[str, bytes], ...] = field(repr=False)

    @classmethod
    def parse(cls, spec: str, setting: str = "GATEWAY_API_KEYS") -> ApiKeys:
        """Parse ``label:key,label:key``; raise SettingsError naming ``setting``.

        An error names the entry by its position only: when key and label are swapped, the
        "label" is the key, so no part of an entry is ever quoted.
        """
        digests: list[tuple[str, bytes]] = []
        for position, item in enumerate(filter(None, (p.strip() for p in spec.split(","))), 1):
            label, sep, key = item.partition(":")
            if not sep:
                raise SettingsError(f"{setting}: entry {position} is not label:key")
            if not _LABEL.match(label):
                raise SettingsError(
                    f"{setting}: entry {position} has an invalid label; a label is 1-"
                    f"{MAX_LABEL_LENGTH} letters, digits, '_', '.' or '-' and comes before the "
                    "key (label:key)"
                )
            if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
                raise SettingsError(
                    f"{setting}: the key of entry {position} must be at least "
                    f"{MIN_KEY_LENGTH} characters without blanks (label:key)"
                )
            if any(label == known for known, _ in digests):
                raise SettingsError(f"{setting}: entry {position} repeats an earlier label")
            digests.append((label, _digest(key)))
        return cls(tuple(digests))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(label for label, _ in self.digests)

    def authenticate(self, authorization: str | None, x_api_key: str | None) -> str | AuthFailure:
        """The label of the presented key, or why it is refused."""
        presented = _presented_key(authorization, x_api_key)
        if isinstance(presented, AuthFailure):
            return presented
        candidate = _digest(presented)
        # Compare against every key without stopping early, on equal-length digests, so the
        # time taken says nothing about which key, or how much of one, matched.
        matched: str | None = None
        for label, digest in self.digests:
            if hmac.compare_digest(candidate, digest):
                matched = label
        return matched if matched is not None else AuthFailure.UNKNOWN_KEY


def _presented_key(authorization: str | None, x_api_key: str | None) -> str | AuthFailure:
    if authorization is not None:
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() == _SCHEME and key.strip():
            return key.strip()
        if x_api_key is None:
            return AuthFailure.MALFORMED
    if x_api_key is not None:
        return x_api_key.strip() or AuthFailure.MALFORMED
    return AuthFailure.MISSING


def _digest(key: str) -> bytes:
    # surrogateescape: a header that is not valid UTF-8 is simply an unknown key, not a 500.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
