"""Secrets never leave the process: not in a settings object's repr, not in an error about a
bad setting, not in the settings logged at start (passwords in a URL's query string too).

Every secret here is a distinctive string that appears nowhere else, so its absence proves
something."""

from __future__ import annotations

import logging

import pytest

from consumers.settings import ConsumerSettings
from gateway.auth import ApiKeys
from gateway.settings import GatewaySettings
from onoff_events import settings
from onoff_events.kafka import KafkaSettings
from onoff_events.logs import JsonFormatter, log_event
from onoff_events.settings import SettingsError

SASL_MARK = "Sasl-Pw-Zq81xW"
URL_MARK = "Url-Pw-Kd47vN"
QUERY_MARK = "Query-Pw-Hm62tB"

SASL_ENV = {
    "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "KAFKA_SASL_USERNAME": "onoff-gateway",
    "KAFKA_SASL_PASSWORD": SASL_MARK,
}


def logged(fields: object) -> str:
    """The JSON line the service would print for ``starting`` with these settings."""
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "starting", None, None)
    record.fields = {"settings": fields}
    return JsonFormatter().format(record)


def test_kafka_settings_never_show_the_sasl_password_in_repr_or_logs() -> None:
    """The dataclass's generated repr (what a traceback or a debugger prints) leaves the
    password out, in every settings object that holds a KafkaSettings."""
    kafka = KafkaSettings.from_env(SASL_ENV, client_id="t")
    gateway = GatewaySettings.from_env(
        {"GATEWAY_API_KEYS": "primary:0123456789abcdef-key", **SASL_ENV}
    )
    consumer = ConsumerSettings.from_env("crm", SASL_ENV)
    for shown in (repr(kafka), str(kafka), repr(gateway), repr(consumer)):
        assert SASL_MARK not in shown
    assert SASL_MARK not in logged(gateway.describe())
    assert SASL_MARK not in logged(consumer.describe())


def test_consumer_settings_never_show_the_dedupe_url_password_in_repr() -> None:
    consumer = ConsumerSettings.from_env(
        "crm", {"DEDUPE_URL": f"redis://onoff:{URL_MARK}@redis.local:6379/0"}
    )
    assert URL_MARK not in repr(consumer)
    assert URL_MARK not in logged(consumer.describe())


def test_api_keys_repr_shows_neither_keys_nor_their_digests() -> None:
    keys = ApiKeys.parse("primary:Api-Key-Rq93mLp0xYz1")
    gateway = GatewaySettings.from_env({"GATEWAY_API_KEYS": "primary:Api-Key-Rq93mLp0xYz1"})
    for shown in (repr(keys), repr(gateway)):
        assert "Api-Key-Rq93mLp0xYz1" not in shown
        assert keys.digests[0][1].hex() not in shown
        assert repr(keys.digests[0][1]) not in shown


SWAPPED_KEY = "Swapped-Key-Tn58cV"


@pytest.mark.parametrize(
    "spec",
    [
        # key:label with a short label: the "key" is too short, the "label" is the key.
        f"{SWAPPED_KEY}:primary",
        # a key with characters a label may not hold (base64 keys have '+', '/', '=').
        f"{SWAPPED_KEY}+/=:primary",
        # key:label with a label of 16+ characters would parse as a valid pair today, making
        # the key a metric label logged at start: labels and keys may not share a length.
        f"{SWAPPED_KEY}:onoff-production-2026",
        # the same key given twice by mistake, swapped.
        f"{SWAPPED_KEY}:first-label-long-1,{SWAPPED_KEY}:first-label-long-2",
        f"ok:0123456789abcdef-key,{SWAPPED_KEY}:primary",
    ],
)
def test_a_swapped_key_and_label_is_refused_without_printing_the_key(spec: str) -> None:
    with pytest.raises(SettingsError) as caught:
        GatewaySettings.from_env({"GATEWAY_API_KEYS": spec})
    message = str(caught.value)
    assert message.startswith("GATEWAY_API_KEYS:")
    assert SWAPPED_KEY not in message
    assert SWAPPED_KEY[:8] not in message


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://onoff@db.local:5432/warehouse?password={QUERY_MARK}",
        f"postgresql://onoff@db.local/warehouse?sslmode=verify-full&sslpassword={QUERY_MARK}",
        f"redis://redis.local:6379/0?password={QUERY_MARK}&socket_timeout=5",
        f"https://hooks.example.com/x?token={QUERY_MARK}",
        f"https://api.example.com/x?api_key={QUERY_MARK}&Access_Token={QUERY_MARK}",
        f"redis://:{QUERY_MARK}@redis.local:6379/0",
        f"postgresql://onoff:{QUERY_MARK}@db.local/warehouse",
        f"postgresql://onoff:{QUERY_MARK}%40x@db.local/warehouse?password={QUERY_MARK}",
    ],
)
def test_urls_are_masked_for_logs_in_the_userinfo_and_the_query_string(url: str) -> None:
    masked = settings.mask_url(url)
    assert QUERY_MARK not in masked
    assert "***" in masked
    # What is not secret stays readable, so the operator still sees where it points.
    assert "example.com" in masked or ".local" in masked


def test_a_query_string_password_in_the_dedupe_url_is_not_logged_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="consumers")
    consumer = ConsumerSettings.from_env(
        "alerts", {"DEDUPE_URL": f"redis://redis.local:6379/0?password={QUERY_MARK}"}
    )
    log_event(logging.getLogger("consumers"), "starting", settings=consumer.describe())
    (record,) = caplog.records
    line = JsonFormatter().format(record)
    assert "redis.local" in line
    assert QUERY_MARK not in line
    assert QUERY_MARK not in repr(consumer)
