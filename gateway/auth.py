"""API-key authentication, pure: header values in, the authenticated key's label out.

Onoff sends ``Authorization: x-api-key <key>`` (its documentation, Authorization section); a
bare ``X-API-Key: <key>`` is accepted too. Several keys may be valid at once, so a key can be
rotated without downtime; each carries a label that is safe to log and to use as a metric label.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import StrEnum

from onoff_events.settings import SettingsError

_LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SCHEME = "x-api-key"
MIN_KEY_LENGTH = 16


class AuthFailure(StrEnum):
    """Why a request was refused; the values are metric labels."""

    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """The keys accepted now, as (label, SHA-256 of the key) pairs."""

    digests: tuple[tuple[str, bytes], ...]

    @classmethod
    def parse(cls, spec: str, setting: str = "GATEWAY_API_KEYS") -> ApiKeys:
        """Parse ``label:key,label:key``; raise SettingsError naming ``setting`` (never a key)."""
        digests: list[tuple[str, bytes]] = []
        for position, item in enumerate(filter(None, (p.strip() for p in spec.split(","))), 1):
            label, sep, key = item.partition(":")
            if not sep:
                raise SettingsError(f"{setting}: entry {position} is not label:key")
            if not _LABEL.match(label):
                raise SettingsError(
                    f"{setting}: entry {position} has label {label!r}; "
                    "use 1-64 letters, digits, '_', '.' or '-'"
                )
            if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
                raise SettingsError(
                    f"{setting}: the key labelled {label!r} must be at least "
                    f"{MIN_KEY_LENGTH} characters without blanks"
                )
            if any(label == known for known, _ in digests):
                raise SettingsError(f"{setting}: label {label!r} appears twice")
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
