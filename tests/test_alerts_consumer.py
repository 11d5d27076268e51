"""The alerts sink against a real Alertmanager and local servers that implement Slack's and
PagerDuty's documented APIs, with real Kafka."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from consumers.sinks import SinkConfigError
from consumers.sinks.alerts import alerts_from_env
from onoff_events.logs import JsonFormatter, quiet_libraries
from tests.conftest import ROOT, wait_until
from tests.consumer_harness import InProcessConsumer, consumer_env, make_topics, publish
from tests.fakes.pagerduty import DEFAULT_ROUTING_KEY, FakePagerDuty
from tests.fakes.slack import FakeSlack
from tests.payloads import sms_event

SENDER = "+33611223344"


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = FakeSlack()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def pagerduty() -> AsyncIterator[FakePagerDuty]:
    fake = FakePagerDuty()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def write_rules(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def alertmanager_alerts(url: str, rule: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}/api/v2/alerts", params={"filter": f'rule="{rule}"'}) as response,
    ):
        assert response.status == 200
        alerts: list[dict[str, Any]] = await response.json()
        return alerts


def alerts_env(
    bootstrap: str, topic: str, tmp_path: Path, rules: Path, **extra: str
) -> dict[str, str]:
    settings = {
        "ALERT_RULES_FILE": str(rules),
        "DEDUPE_URL": f"sqlite:///{tmp_path}/state.sqlite3",
        # Required as soon as a rule sends beyond the log (test_..._needs_a_secret_sender_key).
        "ALERT_SENDER_KEY": "test-sender-key-" + uuid.uuid4().hex,
        **extra,
    }
    return consumer_env(bootstrap, topic, **settings)


async def test_same_id_five_times_is_one_alert_per_rule_and_target(
    kafka_bootstrap: str,
    alertmanager_url: str,
    slack: FakeSlack,
    pagerduty: FakePagerDuty,
    tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex[:8]
    rules = write_rules(
        tmp_path / "rules.toml",
        f"""
[[rule]]
name = "urgent-{tag}"
kind = "keyword"
words = ["urgent"]
targets = ["alertmanager", "slack", "pagerduty"]
severity = "critical"
include_body = true

[[rule]]
name = "stop-{tag}"
kind = "opt_out"
targets = ["alertmanager", "log"]
""",
    )
    topic = await make_topics(kafka_bootstrap, sink="alerts")
    urgent = sms_event(
        body="URGENT: the server room is flooding", externalNumber=SENDER, smsDirection="RECEIVED"
    )
    opt_out = sms_event(body="STOP", externalNumber="+33655443322", smsDirection="RECEIVED")
    quiet = sms_event(body="see you tomorrow", externalNumber=SENDER)
    env = alerts_env(
        kafka_bootstrap,
        topic,
        tmp_path,
        rules,
        ALERTMANAGER_URL=alertmanager_url,
        SLACK_WEBHOOK_URL=slack.webhook_url(),
        PAGERDUTY_URL=pagerduty.base_url,
        PAGERDUTY_ROUTING_KEY=DEFAULT_ROUTING_KEY,
    )
    async with InProcessConsumer(env, sink_name="alerts") as consumer:
        await publish(kafka_bootstrap, topic, [urgent] * 5 + [opt_out] * 5 + [quiet])
        await wait_until(
            lambda: consumer.metric("onoff_consumer_events_consumed_total") == 11,
            30,
            "11 records consumed",
        )
        await wait_until(
            lambda: (
                consumer.metric("onoff_consumer_commits_total") >= 1
                and consumer.metric("onoff_consumer_lag_records") == 0
            ),
            20,
            "caught up",
        )
        await asyncio.sleep(1.5)  # Slack is paced at one message a second: any extra shows now
        assert (
            consumer.metric("onoff_consumer_alert_rules_matched_total", rule=f"urgent-{tag}") == 1
        )
        assert consumer.metric("onoff_consumer_alert_rules_matched_total", rule=f"stop-{tag}") == 1

    [am_urgent] = await alertmanager_alerts(alertmanager_url, f"urgent-{tag}")
    [am_stop] = await alertmanager_alerts(alertmanager_url, f"stop-{tag}")
    assert am_urgent["labels"]["severity"] == "critical"
    assert am_urgent["labels"]["kind"] == "keyword"
    assert re.fullmatch(r"[0-9a-f]{16}", am_urgent["labels"]["sender"])
    assert am_urgent["labels"]["sender"] != am_stop["labels"]["sender"]
    assert am_urgent["annotations"]["body_excerpt"] == "URGENT: the server room is flooding"
    assert "body_excerpt" not in am_stop["annotations"]  # include_body defaults to false
    assert SENDER not in str(am_urgent)  # the number is masked: +33•••••••44
    assert am_urgent["endsAt"] > am_urgent["startsAt"]

    assert len(slack.messages) == 1
    assert "URGENT: the server room" in slack.messages[0].payload["text"]
    assert len(pagerduty.events) == 1
    assert pagerduty.events[0]["payload"]["severity"] == "critical"
    assert pagerduty.open_incident(pagerduty.events[0]["dedup_key"]) is not None


@pytest.mark.parametrize(
    "day",
    ["2024-03-01", "1969-07-20"],
    ids=["2024", "before-1970"],  # a negative timestamp: "never fired" must be earlier still
)
async def test_burst_fires_once_at_the_threshold_also_after_the_partition_moves(
    kafka_bootstrap: str,
    redis_url: str,
    pagerduty: FakePagerDuty,
    slack: FakeSlack,
    tmp_path: Path,
    *,
    day: str,
) -> None:
    tag = uuid.uuid4().hex[:8]
    rules = write_rules(
        tmp_path / "rules.toml",
        f"""
[[rule]]
name = "burst-{tag}"
kind = "burst"
max_messages = 3
window_minutes = 10
targets = ["pagerduty", "slack"]
""",
    )
    topic = await make_topics(kafka_bootstrap, sink="alerts")

    def message(minute: int, second: int = 0) -> dict[str, Any]:
        return sms_event(
            externalNumber=SENDER,
            smsDirection="RECEIVED",
            date=f"{day}T10:{minute:02d}:{second:02d}Z",
        )

    env = alerts_env(
        kafka_bootstrap,
        topic,
        tmp_path,
        rules,
        DEDUPE_URL=redis_url,
        SLACK_WEBHOOK_URL=slack.webhook_url(),
        PAGERDUTY_URL=pagerduty.base_url,
        PAGERDUTY_ROUTING_KEY=DEFAULT_ROUTING_KEY,
    )
    async with InProcessConsumer(env, sink_name="alerts") as first:
        await publish(kafka_bootstrap, topic, [message(0), message(1), message(2)])
        await wait_until(
            lambda: first.metric("onoff_consumer_events_delivered_total") == 3, 30, "three messages"
        )
        assert pagerduty.events == []  # at the limit, not past it
        await publish(kafka_bootstrap, topic, [message(3)])  # the 4th within 10 min: fires
        await wait_until(lambda: len(pagerduty.events) == 1, 30, "the burst alert")
        await publish(kafka_bootstrap, topic, [message(4)])
        await wait_until(
            lambda: first.metric("onoff_consumer_events_delivered_total") == 5, 30, "five messages"
        )
    # Another consumer of the same group now owns every partition.
    async with InProcessConsumer(env, sink_name="alerts") as second:
        await publish(kafka_bootstrap, topic, [message(5), message(6), message(9, 59)])
        await wait_until(
            lambda: second.metric("onoff_consumer_events_delivered_total") == 3,
            30,
            "three more messages",
        )
        await asyncio.sleep(1)
        assert len(pagerduty.events) == 1  # still within the window: no second alert
        # Twenty minutes on, a new burst of four fires again.
        await publish(kafka_bootstrap, topic, [message(20), message(21), message(22), message(23)])
        await wait_until(lambda: len(pagerduty.events) == 2, 30, "the next window's alert")
    assert len(slack.messages) == 2
    keys = {e["dedup_key"] for e in pagerduty.events}
    assert len(keys) == 2


def test_bad_rules_or_a_missing_sender_key_stop_the_service_at_start_with_a_clear_error(
    tmp_path: Path,
) -> None:
    """Each start-up error exits 2 naming the variable: bad rules, and a rule that sends
    beyond the log with no secret ALERT_SENDER_KEY (sender ids would be reversible)."""
    slack = {"SLACK_WEBHOOK_URL": "http://127.0.0.1:9/services/T0/B0/X"}
    cases: dict[str, tuple[dict[str, str], str, str]] = {
        "[[rule]]\nname = 'x'\nkind = 'keyword'\n": (
            {},
            "ALERT_RULES_FILE",
            "rule 'x': 'words' must be a non-empty list",
        ),
        "[[rule]]\nname = 'y'\nkind = 'opt_out'\ntargets = ['slack']\n": (
            {},
            "ALERT_RULES_FILE",
            "rule 'y': target 'slack' needs SLACK_WEBHOOK_URL",
        ),
        "[[rule\n": ({}, "ALERT_RULES_FILE", "not valid TOML"),
        SLACK_RULE: (slack, "ALERT_SENDER_KEY", "is not set"),
    }
    for text, (extra, variable, message) in cases.items():
        rules = write_rules(tmp_path / "rules.toml", text)
        done = subprocess.run(
            [sys.executable, "-m", "consumers", "alerts"],
            cwd=ROOT,
            capture_output=True,
            env={
                "PATH": "/usr/bin:/bin",
                "ALERT_RULES_FILE": str(rules),
                "DEDUPE_URL": f"sqlite:///{tmp_path}/s.sqlite3",
                **extra,
            },
            timeout=30,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert f"invalid setting: {variable}" in done.stderr.decode()
        assert message in done.stderr.decode()


async def test_no_body_number_or_email_in_logs_or_labels_even_on_errors(
    kafka_bootstrap: str, slack: FakeSlack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules = write_rules(
        tmp_path / "rules.toml",
        """
[[rule]]
name = "secret"
kind = "keyword"
words = ["password"]
targets = ["slack", "log"]
""",
    )
    topic = await make_topics(kafka_bootstrap, sink="alerts")
    event = sms_event(
        body="my password is hunter2",
        externalNumber=SENDER,
        onoffUserEmail="alice@example.com",
        onoffUserNumber="+33699887766",
    )
    slack.fail_next(3, 500)
    quiet_libraries()
    caplog.set_level(logging.DEBUG)
    env = alerts_env(kafka_bootstrap, topic, tmp_path, rules, SLACK_WEBHOOK_URL=slack.webhook_url())
    async with InProcessConsumer(env, sink_name="alerts") as consumer:
        await publish(kafka_bootstrap, topic, [event, b"\x00 not json +33611223344"])
        await wait_until(lambda: len(slack.messages) == 1, 30, "the alert after 3 errors")
        await wait_until(lambda: consumer.metric("onoff_consumer_dlq_events_total") == 1, 20, "DLQ")
        labels = [
            value
            for family in consumer.registry.collect()
            for sample in family.samples
            for value in sample.labels.values()
        ]
    lines = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert '"event":"retrying"' in lines
    assert '"event":"alert"' in lines
    for secret in (
        "hunter2",
        "password is",
        SENDER,
        "611223344",
        "alice@example.com",
        "699887766",
        event["id"],
    ):
        assert secret not in lines, secret
        assert all(secret not in value for value in labels), secret
    logging.getLogger("aiokafka").setLevel(logging.NOTSET)


async def test_a_removed_slack_webhook_holds_alerts_back_instead_of_dead_lettering_them(
    kafka_bootstrap: str, slack: FakeSlack, tmp_path: Path
) -> None:
    """Slack answers 404 no_service for a removed webhook: a settings problem, so the alert
    waits (service unready, nothing on the DLQ) and goes out once the webhook exists again."""
    rules = write_rules(
        tmp_path / "rules.toml",
        """
[[rule]]
name = "urgent"
kind = "keyword"
words = ["urgent"]
targets = ["slack"]
""",
    )
    topic = await make_topics(kafka_bootstrap, sink="alerts")
    removed = "T00000000/B11111111/YYYYYYYYYYYYYYYYYYYYYYYY"
    env = alerts_env(
        kafka_bootstrap, topic, tmp_path, rules, SLACK_WEBHOOK_URL=slack.webhook_url(removed)
    )
    async with InProcessConsumer(env, sink_name="alerts") as consumer:
        await publish(kafka_bootstrap, topic, [sms_event(body="urgent please")])
        await wait_until(
            lambda: consumer.metric("onoff_consumer_target_requests_total", outcome="config") >= 2,
            30,
            "404 answers",
        )
        assert consumer.metric("onoff_consumer_ready") == 0
        assert consumer.metric("onoff_consumer_dlq_events_total") == 0
        assert slack.messages == []
        slack.webhooks.add(removed)  # the admin recreates the webhook
        await wait_until(lambda: len(slack.messages) == 1, 30, "the alert, once the hook exists")
    assert consumer.metric("onoff_consumer_dlq_events_total") == 0


SLACK_RULE = """
[[rule]]
name = "urgent"
kind = "keyword"
words = ["urgent"]
targets = ["log", "slack"]
"""


@pytest.mark.parametrize("key", [None, "", "onoff-events", "abc123"])
def test_a_target_other_than_log_needs_a_secret_sender_key(tmp_path: Path, key: str | None) -> None:
    """Sender ids are HMACs of phone numbers: with the public default key (or none, or a
    guessable one) they can be reversed, so the service refuses to start when an alert leaves
    the process, naming the variable and never echoing its value."""
    env = {
        "ALERT_RULES_FILE": str(write_rules(tmp_path / "rules.toml", SLACK_RULE)),
        "SLACK_WEBHOOK_URL": "http://127.0.0.1:9/services/T0/B0/X",
        "DEDUPE_URL": f"sqlite:///{tmp_path}/state.sqlite3",
    }
    if key is not None:
        env["ALERT_SENDER_KEY"] = key
    with pytest.raises(SinkConfigError, match=r"^ALERT_SENDER_KEY: .*slack") as caught:
        alerts_from_env(env, CollectorRegistry())
    if key:
        assert key not in str(caught.value)
    assert not (tmp_path / "state.sqlite3").exists()  # refused before opening anything


async def test_a_log_only_run_keeps_the_default_sender_key_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``make run`` sends alerts to the log only: ids stay on the machine, next to the events."""
    rules = write_rules(tmp_path / "rules.toml", SLACK_RULE.replace('"log", "slack"', '"log"'))
    caplog.set_level(logging.WARNING, "consumers.alerts")
    sink = alerts_from_env(
        {"ALERT_RULES_FILE": str(rules), "DEDUPE_URL": f"sqlite:///{tmp_path}/s.sqlite3"},
        CollectorRegistry(),
    )
    await sink.close()
    assert "alert_sender_key_default" in caplog.text


async def test_with_a_per_message_target_batches_stay_small_enough_to_finish_in_time(
    kafka_bootstrap: str, slack: FakeSlack, tmp_path: Path
) -> None:
    """Slack takes about a message a second: a batch of 500 events that all match would take
    minutes and outlive the rebalance timeout. With Slack configured, the consumer reads at
    most 20 events a batch (counted by the batch-size histogram), whatever it is offered."""
    rules = write_rules(tmp_path / "rules.toml", SLACK_RULE)
    topic = await make_topics(kafka_bootstrap, partitions=1, sink="alerts")
    quiet = [sms_event(smsDirection="RECEIVED", body="nothing to see") for _ in range(45)]
    await publish(kafka_bootstrap, topic, quiet)
    env = alerts_env(kafka_bootstrap, topic, tmp_path, rules, SLACK_WEBHOOK_URL=slack.webhook_url())
    async with InProcessConsumer(env, sink_name="alerts") as consumer:
        await wait_until(
            lambda: consumer.metric("onoff_consumer_events_delivered_total") == 45, 30, "all 45"
        )
        batches = consumer.metric("onoff_consumer_batch_size_records_count")
        assert batches >= 3
        assert consumer.metric("onoff_consumer_batch_size_records_bucket", le="25.0") == batches
        assert consumer.metric("onoff_consumer_batch_size_records_sum") == 45
    assert slack.messages == []
