"""The alerts sink: messages that match a rule raise an alert, once, where the rule says.

Rules come from a TOML file (docs/alert-rules.md). Targets: ``log`` (the embedded default),
Prometheus Alertmanager (API v2), a Slack incoming webhook, PagerDuty Events API v2. An alert
carries the rule, a pseudonymous sender id, masked numbers and, only when the rule allows
it, a short excerpt of the body.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from aiolimiter import AsyncLimiter
from prometheus_client import CollectorRegistry, Counter

from consumers.alert_rules import Rule as AlertRule
from consumers.alert_rules import (
    RulesError,
    RuleSet,
    burst_fires,
    burst_peak,
    call_matches,
    excerpt,
    load_rules,
    stateless_matches,
)
from consumers.phones import masked, phone_region, to_e164
from consumers.records import CallRecord, EventRecord, SmsRecord
from consumers.sinks import Delivery, SinkConfigError
from consumers.sinks.burst import BurstStore, burst_store_from_url
from consumers.sinks.http import JsonApi, RequestRejected, TargetMetrics
from onoff_events import settings as s
from onoff_events.logs import log_event

log = logging.getLogger("consumers.alerts")
DEFAULT_SUMMARIES = {
    "keyword": "SMS matched a watched keyword",
    "regex": "SMS matched a watched pattern",
    "opt_out": "Opt-out received by SMS",
    "burst": "Burst of SMS from one number",
    "blocklist": "SMS exchanged with a blocked number",
    "missed_call": "Missed call",
    "voicemail": "Voicemail left",
}


@dataclass(frozen=True, slots=True)
class Alert:
    rule: AlertRule
    event: EventRecord
    sender_id: str  # keyed hash of the external number: groups alerts, reveals nothing
    dedup_key: str
    summary: str
    description: str
    starts_at: datetime
    ends_at: datetime
    body_excerpt: str | None


class Target(Protocol):
    name: str

    async def send(self, alerts: Sequence[Alert]) -> None: ...

    async def close(self) -> None: ...


class LogTarget:
    name = "log"

    async def send(self, alerts: Sequence[Alert]) -> None:
        for a in alerts:
            log_event(log, "alert", logging.WARNING, **log_fields(a))

    async def close(self) -> None:
        """Nothing to release."""


class AlertmanagerTarget:
    """``POST /api/v2/alerts``: labels name the rule and the sender, so Alertmanager groups
    and dedupes repeats; ``endsAt`` lets the alert resolve by itself."""

    name = "alertmanager"

    def __init__(self, url: str, metrics: TargetMetrics) -> None:
        self._url = url.rstrip("/") + "/api/v2/alerts"
        self._api = JsonApi("alerts", self.name, metrics)

    async def send(self, alerts: Sequence[Alert]) -> None:
        if not alerts:
            return
        await self._api.call("POST", self._url, [alertmanager_alert(a) for a in alerts])
        self._api.count_delivered(len(alerts))

    async def close(self) -> None:
        await self._api.close()


class SlackTarget:
    name = "slack"

    def __init__(self, webhook_url: str, metrics: TargetMetrics) -> None:
        self._url = webhook_url
        # Slack allows about one message per second per incoming webhook.
        self._api = JsonApi("alerts", self.name, metrics, limiter=AsyncLimiter(1, 1))

    async def send(self, alerts: Sequence[Alert]) -> None:
        for a in alerts:
            await self._api.call("POST", self._url, slack_message(a))
            self._api.count_delivered()

    async def close(self) -> None:
        await self._api.close()


class PagerDutyTarget:
    name = "pagerduty"

    def __init__(self, base_url: str, routing_key: str, metrics: TargetMetrics) -> None:
        self._url = base_url.rstrip("/") + "/v2/enqueue"
        self._routing_key = routing_key
        # PagerDuty allows about 120 events a minute per integration key.
        self._api = JsonApi("alerts", self.name, metrics, limiter=AsyncLimiter(1, 0.55))

    async def send(self, alerts: Sequence[Alert]) -> None:
        for a in alerts:
            await self._api.call("POST", self._url, pagerduty_event(a, self._routing_key))
            self._api.count_delivered()

    async def close(self) -> None:
        await self._api.close()


PACED_BATCH_EVENTS = 20


class AlertsSink:
    name = "alerts"
    max_batch_events = 10**9  # bounded below when a target is paced per message
    # SMS rules on sms-events, call rules (missed_call, voicemail) on call-events: one rules
    # file, one service per topic (CONSUMER_EVENT_KIND).
    event_kinds = frozenset({"sms", "call"})

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        rules: RuleSet,
        targets: Mapping[str, Target],
        burst: BurstStore,
        region: str | None,
        sender_key: bytes,
    ) -> None:
        self._rules = rules
        self._targets = targets
        # No batch may outlive the group's rebalance timeout: Slack takes about one message a
        # second and PagerDuty two, so with either one a batch is at most ~20 s of posts even
        # if every event matches (an SMS flood built to trip the rules).
        if {"slack", "pagerduty"} & set(targets):
            self.max_batch_events = PACED_BATCH_EVENTS
        self._burst = burst
        self._region = region
        self._sender_key = sender_key
        self._matched = Counter(
            "onoff_consumer_alert_rules_matched",
            "Alerts raised, by rule (each counted once, when delivered).",
            ["sink", "rule"],
            registry=registry,
        )
        # (dedup key, target) already sent by this process: a batch retried after another
        # target failed does not post a second Slack message.
        self._sent: dict[tuple[str, str], None] = {}

    async def start(self) -> None:
        """Targets connect on first use."""

    async def close(self) -> None:
        for target in self._targets.values():
            await target.close()
        await self._burst.close()

    async def deliver(self, events: Sequence[EventRecord]) -> Delivery:
        calls = [e for e in events if isinstance(e, CallRecord)]
        sms = [e for e in events if isinstance(e, SmsRecord)]
        alerts, firing = await self._alerts_for(sms)
        alerts += [a for call in calls for a in self._call_alerts(call)]
        rejected: dict[str, str] = {}
        for name, target in self._targets.items():
            # A refusal by one target never keeps the alert from the others.
            todo = [
                a
                for a in alerts
                if name in a.rule.targets and (a.dedup_key, name) not in self._sent
            ]
            for alert in todo:
                try:
                    await target.send([alert])
                except RequestRejected as exc:
                    # The target refuses this alert's payload for good: keep the event on
                    # the DLQ rather than retry for ever.
                    rejected[alert.event.event_id] = str(exc)
                    continue
                self._sent[(alert.dedup_key, name)] = None
        for alert in alerts:
            if alert.rule.kind == "burst":
                window = alert.rule.window_minutes * 60
                # Quiet for one window after the busy one: the same burst never fires twice.
                # (A burst alert's key is always in ``firing``, its end at or after the event.)
                key = self._burst_key(alert.rule, alert.sender_id)
                await self._burst.mark_fired(key, firing[key] + window, window)
            self._matched.labels(self.name, alert.rule.name).inc()
        # Kept (bounded) after success too: a batch abandoned later (the dedupe confirm failing,
        # then a rebalance) and read again by this process must not post to Slack twice.
        while len(self._sent) > 50_000:
            del self._sent[next(iter(self._sent))]
        return Delivery(rejected)

    async def _alerts_for(
        self, events: Sequence[SmsRecord]
    ) -> tuple[list[Alert], dict[str, float]]:
        """The batch's alerts, and for each burst that fires the end of its busy window."""
        alerts: list[Alert] = []
        firing: dict[str, float] = {}  # burst key → end of the busy window, first event only
        for event in events:
            p = event.payload
            sender = to_e164(str(p.get("externalNumber", "")), self._region)
            sender_id = self._sender_id(sender or str(p.get("externalNumber", "")))
            body, direction = str(p.get("body", "")), str(p.get("smsDirection"))
            matched = stateless_matches(self._rules.rules, body, direction, sender)
            for rule in self._rules.burst_rules:
                if direction not in rule.directions:
                    continue
                key = self._burst_key(rule, sender_id)
                at, window = event.sent_at.timestamp(), rule.window_minutes * 60
                times = await self._burst.record(key, event.event_id, at, window)
                count, window_end = burst_peak(times, at, window)
                if (
                    burst_fires(count, rule)
                    and key not in firing
                    and window_end >= await self._burst.fired_until(key)
                ):
                    firing[key] = window_end
                    matched.append(rule)
            alerts.extend(self._alert(rule, event, sender, sender_id) for rule in matched)
        return alerts, firing

    def _call_alerts(self, call: CallRecord) -> list[Alert]:
        p = call.payload
        other = to_e164(str(p.get("externalNumber") or ""), self._region)
        other_id = self._sender_id(other or str(p.get("externalNumber") or ""))
        status, direction = p.get("callStatus"), p.get("callDirection")
        matched = call_matches(
            self._rules.rules,
            str(p.get("eventName")),
            status if isinstance(status, str) else None,
            direction if isinstance(direction, str) else None,
            other,
        )
        alerts = []
        line = to_e164(str(p.get("onoffUserNumber") or ""), self._region)
        started = call.started_at.isoformat() if call.started_at else "at an unknown time"
        for rule in matched:
            summary = rule.summary or DEFAULT_SUMMARIES[rule.kind]
            # Onoff's own status and direction words (upper case, at most 64 characters), never
            # a number, a name or the call's notes.
            description = (
                f"{summary}. Rule {rule.name} ({rule.kind}): {p.get('eventName')} "
                f"{_word(direction)} call, status {_word(status)}, Onoff line "
                f"{masked(line) if line else 'unknown'}, other party "
                f"{masked(other) if other else 'not a phone number'}, started {started}. "
                f"Event {call.event_id} ({call.topic}/{call.partition}@{call.offset})."
            )
            now = datetime.now(UTC)
            alerts.append(
                Alert(
                    rule=rule,
                    event=call,
                    sender_id=other_id,
                    dedup_key=hashlib.sha256(f"{rule.name}:{call.event_id}".encode()).hexdigest()[
                        :32
                    ],
                    summary=summary,
                    description=description,
                    starts_at=now,
                    ends_at=now + timedelta(minutes=rule.resolve_after_minutes),
                    body_excerpt=None,  # a call has no body; its notes are never sent
                )
            )
        return alerts

    def _alert(
        self, rule: AlertRule, event: SmsRecord, sender: str | None, sender_id: str
    ) -> Alert:
        p = event.payload
        summary = rule.summary or DEFAULT_SUMMARIES[rule.kind]
        if rule.kind == "burst":
            window = int(event.sent_at.timestamp() // (rule.window_minutes * 60))
            dedup = f"{rule.name}:{sender_id}:{window}"
            summary += f" (over {rule.max_messages} in {rule.window_minutes:g} min)"
        else:
            dedup = f"{rule.name}:{event.event_id}"
        line = to_e164(str(p.get("onoffUserNumber", "")), self._region)
        description = (
            f"{summary}. Rule {rule.name} ({rule.kind}): {p.get('smsDirection')} SMS, "
            f"Onoff line {masked(line) if line else 'unknown'}, other party "
            f"{masked(sender) if sender else 'not a phone number'}, sent "
            f"{event.sent_at.isoformat()}. Event {event.event_id} "
            f"({event.topic}/{event.partition}@{event.offset})."
        )
        now = datetime.now(UTC)
        return Alert(
            rule=rule,
            event=event,
            sender_id=sender_id,
            dedup_key=hashlib.sha256(dedup.encode()).hexdigest()[:32],
            summary=summary,
            description=description,
            starts_at=now,
            ends_at=now + timedelta(minutes=rule.resolve_after_minutes),
            body_excerpt=excerpt(str(p.get("body", ""))) if rule.include_body else None,
        )

    def _sender_id(self, sender: str) -> str:
        return hmac.new(self._sender_key, sender.encode(), hashlib.sha256).hexdigest()[:16]

    @staticmethod
    def _burst_key(rule: AlertRule, sender_id: str) -> str:
        return f"{rule.name}:{sender_id}"


def _word(value: Any) -> str:
    """One of Onoff's status or direction words for a description, or ``unknown``."""
    return value.upper()[:64] if isinstance(value, str) and value.strip() else "unknown"


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _utc_rfc3339(moment: datetime) -> str | None:
    """``moment`` in UTC, or None when UTC cannot hold it: a valid RFC 3339 time at the edges
    of years 0001 and 9999 (9999-12-31T23:59:59-01:00 is in year 10000 in UTC) makes Python's
    ``astimezone`` raise OverflowError, and one event must never stop the consumer."""
    try:
        return _rfc3339(moment)
    except OverflowError:
        return None


def log_fields(a: Alert) -> dict[str, Any]:
    """The ``alert`` log line's fields: no number, no body, nothing from the event's text."""
    return {
        "rule": a.rule.name,
        "kind": a.rule.kind,
        "severity": a.rule.severity,
        "sender_id": a.sender_id,
        "topic": a.event.topic,
        "partition": a.event.partition,
        "offset": a.event.offset,
    }


def alertmanager_alert(a: Alert) -> dict[str, Any]:
    """One alert of Alertmanager's ``POST /api/v2/alerts`` body."""
    annotations = {
        "summary": a.summary,
        "description": a.description,
        "runbook_url": "https://onoff-events.dev/docs/alert-rules#" + a.rule.kind,
    }
    if a.body_excerpt is not None:
        annotations["body_excerpt"] = a.body_excerpt
    return {
        "labels": {
            "alertname": "OnoffCallRule" if isinstance(a.event, CallRecord) else "OnoffSmsRule",
            "rule": a.rule.name,
            "kind": a.rule.kind,
            "severity": a.rule.severity,
            "sender": a.sender_id,
            "service": "onoff-events",
        },
        "annotations": annotations,
        "startsAt": _rfc3339(a.starts_at),
        "endsAt": _rfc3339(a.ends_at),
    }


def slack_message(a: Alert) -> dict[str, Any]:
    """The body of a Slack incoming-webhook post."""

    # Slack's mrkdwn control characters, escaped as Slack documents: a message saying
    # "<!channel>" must not notify the channel.
    def escape(text: str) -> str:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    text = f":rotating_light: *{escape(a.summary)}* ({a.rule.severity})\n{escape(a.description)}"
    if a.body_excerpt is not None:
        text += f"\n> {escape(a.body_excerpt)}"
    return {"text": text}


def pagerduty_event(a: Alert, routing_key: str) -> dict[str, Any]:
    """An Events API v2 ``trigger``. ``payload.timestamp`` is the SMS's date in UTC; when UTC
    cannot hold that date (the edges of years 0001 and 9999), it is the gateway's receive
    time, or absent when that is unknown too (the field is optional), and
    ``custom_details.sms_date`` keeps the date as Onoff sent it."""
    details: dict[str, Any] = {
        "description": a.description,
        "sender_id": a.sender_id,
        "event_id": a.event.event_id,
    }
    if a.body_excerpt is not None:
        details["body_excerpt"] = a.body_excerpt
    payload: dict[str, Any] = {
        "summary": f"{a.summary} [{a.rule.name}]"[:1024],
        "source": "onoff-events",
        "severity": a.rule.severity,
        "component": "call" if isinstance(a.event, CallRecord) else "sms",
        "group": a.rule.name,
        "class": a.rule.kind,
        "custom_details": details,
    }
    if isinstance(a.event, SmsRecord):
        timestamp = _utc_rfc3339(a.event.sent_at)
        if timestamp is None:
            details["sms_date"] = str(a.event.payload.get("date", a.event.sent_at.isoformat()))
    else:
        timestamp = _utc_rfc3339(a.event.started_at) if a.event.started_at else None
    if timestamp is None and a.event.received_at is not None:
        timestamp = _utc_rfc3339(a.event.received_at)
    if timestamp is not None:
        payload["timestamp"] = timestamp
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": a.dedup_key,
        "payload": payload,
    }


def alerts_from_env(env: Mapping[str, str], registry: CollectorRegistry) -> AlertsSink:
    region = phone_region(env)
    rules_path = s.text(env, "ALERT_RULES_FILE", "")
    if not rules_path:
        raise SinkConfigError("ALERT_RULES_FILE: required (see docs/alert-rules.md)")
    try:
        rules = load_rules(Path(rules_path), lambda n: to_e164(n, region))
    except RulesError as exc:
        raise SinkConfigError(f"ALERT_RULES_FILE: {exc}") from None
    metrics = TargetMetrics.create(registry)
    available: dict[str, Any] = {"log": LogTarget}
    needs = {
        "alertmanager": "ALERTMANAGER_URL",
        "slack": "SLACK_WEBHOOK_URL",
        "pagerduty": "PAGERDUTY_ROUTING_KEY",
    }
    if env.get("ALERTMANAGER_URL"):
        available["alertmanager"] = lambda: AlertmanagerTarget(env["ALERTMANAGER_URL"], metrics)
    if env.get("SLACK_WEBHOOK_URL"):
        available["slack"] = lambda: SlackTarget(env["SLACK_WEBHOOK_URL"], metrics)
    if env.get("PAGERDUTY_ROUTING_KEY"):
        available["pagerduty"] = lambda: PagerDutyTarget(
            s.text(env, "PAGERDUTY_URL", "https://events.pagerduty.com"),
            env["PAGERDUTY_ROUTING_KEY"],
            metrics,
        )
    for rule in rules.rules:
        for target in rule.targets:
            if target not in available:
                raise SinkConfigError(
                    f"ALERT_RULES_FILE: rule {rule.name!r}: target "
                    f"{target!r} needs {needs[target]} to be set"
                )
    sender_key = _sender_key(env, rules.targets)
    state_url = s.text(env, "ALERT_STATE_URL", "") or s.text(
        env, "DEDUPE_URL", "sqlite:///.data/alerts-state.sqlite3"
    )
    try:
        burst = burst_store_from_url(state_url, s.text(env, "CONSUMER_GROUP", "onoff-alerts"))
    except ValueError as exc:
        raise SinkConfigError(f"ALERT_STATE_URL: {exc}") from None
    sink = AlertsSink(
        registry,
        rules=rules,
        targets={t: available[t]() for t in sorted(rules.targets)},
        burst=burst,
        region=region,
        sender_key=sender_key,
    )
    if env.get("CONSUMER_EVENT_KIND", "").strip() == "call":
        sink.name = "alerts-calls"  # its rule counts apart from the SMS service's
    return sink


DEFAULT_SENDER_KEY = "onoff-events"
MIN_SENDER_KEY_CHARS = 16


def _sender_key(env: Mapping[str, str], targets: frozenset[str]) -> bytes:
    """``ALERT_SENDER_KEY``: the HMAC key that turns phone numbers into sender ids.

    With a known key, anyone can hash every number of a country (about a billion) and read
    the numbers back from the ids, so a key that is public, empty or short is refused as soon
    as an alert leaves the process (Alertmanager, Slack, PagerDuty). A log-only run (``make
    run``'s embedded default) keeps the public default, with a warning: its ids stay on the
    machine, next to the events themselves.
    """
    key = env.get("ALERT_SENDER_KEY", "")
    outside = sorted(targets - {"log"})
    if outside and (key == DEFAULT_SENDER_KEY or len(key.strip()) < MIN_SENDER_KEY_CHARS):
        # The value is never shown: it is a secret, even a weak one.
        problem = "is not set" if not key else "is the public default or too short"
        raise SinkConfigError(
            f"ALERT_SENDER_KEY: {problem}; rules send alerts to {', '.join(outside)}, so "
            f"set a random secret of at least {MIN_SENDER_KEY_CHARS} characters (sender ids "
            "made with a known key can be reversed to phone numbers)"
        )
    if not key:
        log_event(
            log,
            "alert_sender_key_default",
            logging.WARNING,
            detail="set ALERT_SENDER_KEY: sender ids use a public default key (log only)",
        )
        return DEFAULT_SENDER_KEY.encode()
    return key.encode()
