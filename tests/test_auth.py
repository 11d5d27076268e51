"""API-key parsing and checking, without any I/O."""

from __future__ import annotations

import pytest

from gateway.auth import ApiKeys, AuthFailure
from onoff_events.settings import SettingsError

KEYS = ApiKeys.parse("onoff:aaaaaaaaaaaaaaaaaaaa, next:bbbbbbbbbbbbbbbbbbbb")


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "expected"),
    [
        ("x-api-key aaaaaaaaaaaaaaaaaaaa", None, "onoff"),
        ("X-Api-Key   bbbbbbbbbbbbbbbbbbbb  ", None, "next"),
        (None, "aaaaaaaaaaaaaaaaaaaa", "onoff"),
        ("Bearer something", "bbbbbbbbbbbbbbbbbbbb", "next"),
        (None, None, AuthFailure.MISSING),
        ("Bearer aaaaaaaaaaaaaaaaaaaa", None, AuthFailure.MALFORMED),
        ("x-api-key", None, AuthFailure.MALFORMED),
        (None, "  ", AuthFailure.MALFORMED),
        ("x-api-key aaaaaaaaaaaaaaaaaaab", None, AuthFailure.UNKNOWN_KEY),
        ("x-api-key aaaaaaaaaaaaaaaaaaaaa", None, AuthFailure.UNKNOWN_KEY),
        (None, "aaaaaaaaaa", AuthFailure.UNKNOWN_KEY),
    ],
)
def test_authenticate_returns_the_label_or_the_reason(
    authorization: str | None, x_api_key: str | None, expected: str | AuthFailure
) -> None:
    assert KEYS.authenticate(authorization, x_api_key) == expected


def test_labels_are_kept_and_keys_are_not() -> None:
    assert KEYS.labels == ("onoff", "next")
    assert "aaaaaaaaaaaaaaaaaaaa" not in repr(KEYS)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("onoff", "entry 1 is not label:key"),
        ("a:aaaaaaaaaaaaaaaaaaaa,b", "entry 2 is not label:key"),
        (":aaaaaaaaaaaaaaaaaaaa", "entry 1 has an invalid label"),
        ("a b:aaaaaaaaaaaaaaaaaaaa", "entry 1 has an invalid label"),
        ("a:short", "at least 16 characters"),
        ("a:aaaaaaaa aaaaaaaaaaa", "at least 16 characters without blanks"),
        ("a:aaaaaaaaaaaaaaaaaaaa,a:bbbbbbbbbbbbbbbbbbbb", "entry 2 repeats an earlier label"),
    ],
)
def test_malformed_key_specs_are_refused_without_quoting_keys(spec: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as caught:
        ApiKeys.parse(spec)
    # Every entry's key part (or the whole entry when it has no colon: a key pasted alone)
    # is absent from the message; checking one fixed string missed most of these inputs.
    for entry in spec.split(","):
        secret = entry.partition(":")[2] or entry
        if len(secret) >= 5:  # a letter or two is in any sentence
            assert secret not in str(caught.value).removeprefix("GATEWAY_API_KEYS:"), entry
    assert str(caught.value).startswith("GATEWAY_API_KEYS:")


def test_empty_spec_means_no_keys() -> None:
    assert ApiKeys.parse(" , ").digests == ()
    assert ApiKeys.parse("").authenticate("x-api-key anything-at-all-here", None) == (
        AuthFailure.UNKNOWN_KEY
    )


def test_a_key_that_is_not_utf8_is_just_unknown() -> None:
    assert KEYS.authenticate(None, "caf\udce9-not-utf8-bytes") == AuthFailure.UNKNOWN_KEY
