"""The CRM sink against a local server that implements HubSpot's documented CRM v3 API
(tests/fakes/hubspot.py), with real Kafka and the real client code."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from consumers.dedupe import DedupeStore
from tests.conftest import wait_until
from tests.consumer_harness import InProcessConsumer, consumer_env, make_topics, publish
from tests.fakes.hubspot import DEFAULT_TOKEN, FakeHubSpot
from tests.payloads import sms_event

CONTACT_NUMBER = "+33612345678"


@pytest.fixture
async def hubspot() -> AsyncIterator[FakeHubSpot]:
    fake = FakeHubSpot()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def crm_env(
    bootstrap: str, topic: str, fake: FakeHubSpot, tmp_path: Path, **extra: str
) -> dict[str, str]:
    settings = {
        "HUBSPOT_TOKEN": DEFAULT_TOKEN,
        "HUBSPOT_BASE_URL": fake.base_url,
        "DEDUPE_URL": f"sqlite:///{tmp_path}/dedupe.sqlite3",
        **extra,
    }
    return consumer_env(bootstrap, topic, **settings)


def add_contact(fake: FakeHubSpot, **properties: str) -> str:
    """Put a contact into the fake HubSpot as a sales person would have typed it."""
    return fake.seed_contact(dict(properties))


async def test_same_id_five_times_is_one_communication_on_the_right_contact(
    kafka_bootstrap: str, hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    right = add_contact(hubspot, firstname="John", phone="06 12 34 56 78")
    add_contact(hubspot, firstname="Other", phone="+33699999999")
    mobile = add_contact(hubspot, firstname="Mobile", mobilephone="+44 7911 123456")
    topic = await make_topics(kafka_bootstrap, sink="crm")
    event = sms_event(externalNumber="0612345678", smsDirection="RECEIVED", body="Bonjour <b>!")
    uk = sms_event(externalNumber="+447911123456")
    async with InProcessConsumer(
        crm_env(kafka_bootstrap, topic, hubspot, tmp_path), sink_name="crm"
    ) as consumer:
        await publish(kafka_bootstrap, topic, [event] * 5 + [uk])
        await wait_until(
            lambda: consumer.metric("onoff_consumer_events_consumed_total") == 6,
            30,
            "6 records consumed",
        )
        await wait_until(lambda: len(hubspot.communications) >= 2, 20, "two communications")
        await asyncio.sleep(1)
        assert consumer.metric("onoff_consumer_crm_contacts_total", outcome="found") == 2
        assert consumer.metric("onoff_consumer_target_delivered_total", target="hubspot") == 2
    by_event = {c.properties["onoff_event_id"]: c for c in hubspot.communications}
    assert len(hubspot.communications) == 2
    logged = by_event[event["id"]]
    assert logged.contact_ids == [right]
    assert by_event[uk["id"]].contact_ids == [mobile]
    props = logged.properties
    assert props["hs_communication_channel_type"] == "SMS"
    assert props["hs_communication_logged_from"] == "CRM"
    assert props["hs_timestamp"].startswith("2023-05-20T14:30:00")
    assert "Inbound SMS from 0612345678" in props["hs_communication_body"]
    assert "Bonjour &lt;b&gt;!" in props["hs_communication_body"]  # text, never markup


async def test_unknown_contacts_are_skipped_and_counted_or_created(
    kafka_bootstrap: str, hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    topic = await make_topics(kafka_bootstrap, sink="crm")
    stranger = sms_event(
        externalNumber="+33 6 00 00 00 01", externalName="Ann Lee", externalEmail="ann@example.com"
    )
    short_code = sms_event(externalNumber="36180")
    env = crm_env(kafka_bootstrap, topic, hubspot, tmp_path)
    async with InProcessConsumer(env, sink_name="crm") as consumer:
        await publish(kafka_bootstrap, topic, [stranger, short_code])
        await wait_until(
            lambda: consumer.metric("onoff_consumer_crm_contacts_total") == 2, 30, "two look-ups"
        )
        assert consumer.metric("onoff_consumer_crm_contacts_total", outcome="missing") == 1
        assert (
            consumer.metric("onoff_consumer_crm_contacts_total", outcome="unparseable_number") == 1
        )
    assert hubspot.communications == []
    assert hubspot.contacts == []

    creating = {
        **env,
        "CRM_UNKNOWN_CONTACT": "create",
        "CONSUMER_GROUP": env["CONSUMER_GROUP"] + "-c",
    }
    async with InProcessConsumer(creating, sink_name="crm") as consumer:
        await wait_until(lambda: len(hubspot.communications) == 1, 30, "a communication")
    [contact] = hubspot.contacts
    assert contact.properties["phone"] == "+33600000001"
    assert (contact.properties["firstname"], contact.properties["lastname"]) == ("Ann", "Lee")
    assert hubspot.communications[0].contact_ids == [contact.id]


class StopsBeforeConfirm:
    """A real dedupe store that never gets to confirm: the process 'dies' right after the
    sink created the communications, before the ids are marked done."""

    def __init__(self, store: DedupeStore) -> None:
        self._store = store
        self.reached = asyncio.Event()

    async def claim(self, ids: Sequence[str]) -> set[str]:
        return await self._store.claim(ids)

    async def confirm(self, ids: Sequence[str]) -> None:
        self.reached.set()
        await asyncio.Event().wait()  # blocks until the task is killed

    async def release(self, ids: Sequence[str]) -> None:
        await self._store.release(ids)

    async def refresh(self, ids: Sequence[str]) -> None:
        await self._store.refresh(ids)

    async def ping(self) -> None:
        await self._store.ping()

    async def close(self) -> None:
        await self._store.close()


BATCH_CREATE = "/crm/v3/objects/communications/batch/create"


def creates_per_event(fake: FakeHubSpot) -> Counter[str]:
    """Communications HubSpot created, per Onoff id, single or batch creates alike: the fake
    keeps no unique key, so a second create of an id is a second communication."""
    return Counter(c.properties.get("onoff_event_id", "") for c in fake.communications)


async def test_killed_between_create_and_confirm_still_one_communication(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """HubSpot's search shows a new communication seconds after its create (search_lag): the
    restarted consumer must not trust a search made before the dead one's creates show."""
    hubspot = FakeHubSpot(search_lag=1.5)
    await hubspot.start()
    try:
        await _killed_between_create_and_confirm(kafka_bootstrap, hubspot, tmp_path)
    finally:
        await hubspot.close()


async def _killed_between_create_and_confirm(
    kafka_bootstrap: str, hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    contact = add_contact(hubspot, phone="+33612345678")  # searchable at once (seeded)
    # One partition, written before the consumer starts: its first fetch holds all three
    # events, so the "kill" below comes after all three creates (with three partitions written
    # while it ran, a first batch of one event could block alone, as seen once in CI).
    topic = await make_topics(kafka_bootstrap, partitions=1, sink="crm")
    events = [sms_event(externalNumber="+33612345678") for _ in range(3)]
    env = crm_env(kafka_bootstrap, topic, hubspot, tmp_path, CRM_CREATE_RETRY_SECONDS="2")
    wrappers: list[StopsBeforeConfirm] = []

    def wrap(store: DedupeStore) -> StopsBeforeConfirm:
        wrappers.append(StopsBeforeConfirm(store))
        return wrappers[-1]

    await publish(kafka_bootstrap, topic, events)
    dying = InProcessConsumer(env, sink_name="crm", wrap_dedupe=wrap)
    await dying.__aenter__()
    await asyncio.wait_for(wrappers[0].reached.wait(), 30)
    assert len(hubspot.communications) == 3
    assert dying.task is not None
    dying.task.cancel()  # the kill: nothing after the create runs, nothing is committed
    with contextlib.suppress(asyncio.CancelledError):
        await dying.task

    async with InProcessConsumer(env, sink_name="crm") as restarted:
        await wait_until(
            lambda: restarted.metric("onoff_consumer_commits_total") >= 1,
            30,
            "the re-read batch committed",
        )
        assert restarted.metric("onoff_consumer_events_consumed_total") == 3  # read again
    assert creates_per_event(hubspot) == Counter({e["id"]: 1 for e in events})
    assert len(hubspot.communications) == 3
    assert {c.properties["onoff_event_id"] for c in hubspot.communications} == {
        e["id"] for e in events
    }
    assert all(c.contact_ids == [contact] for c in hubspot.communications)


def max_in_window(times: Sequence[float], window: float) -> int:
    """The most requests in any rolling window of ``window`` seconds."""
    most, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= window:
            start += 1
        most = max(most, end - start + 1)
    return most


async def test_429_and_503_for_a_while_hold_the_rate_and_skip_nothing(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    fake = FakeHubSpot(rate_limit=12, rate_window=2.0)  # tighter than HubSpot, to test quickly
    await fake.start()
    try:
        numbers = [f"+336120000{i:02d}" for i in range(12)]
        for number in numbers:
            add_contact(fake, phone=number)
        topic = await make_topics(kafka_bootstrap, sink="crm")
        events = [sms_event(externalNumber=n) for n in numbers]
        fake.fail_next(3, 429, path=BATCH_CREATE, retry_after=1)
        fake.fail_next(3, 503, path=BATCH_CREATE)
        # 50 per 10 s is 1 per 0.2 s: at most 11 in any 2 s, under the fake's 12.
        env = crm_env(
            kafka_bootstrap,
            topic,
            fake,
            tmp_path,
            CRM_REQUESTS_PER_10S="50",
            CRM_CREATE_RETRY_SECONDS="1",
        )
        async with InProcessConsumer(env, sink_name="crm") as consumer:
            await publish(kafka_bootstrap, topic, events)
            await wait_until(lambda: len(fake.communications) == 12, 60, "12 communications")
            assert consumer.metric("onoff_consumer_target_rate_limit_waits_total", cause="429") == 3
            assert consumer.metric("onoff_consumer_retries_total", stage="deliver") >= 1
        answered_429 = [r for r in fake.requests if r.status == 429]
        assert len(answered_429) == 3  # only the injected ones: our limiter kept the pace
        times = [r.at for r in fake.requests]
        assert max_in_window(times, 2.0) <= 12
        assert sorted(c.properties["onoff_event_id"] for c in fake.communications) == sorted(
            e["id"] for e in events
        )
    finally:
        await fake.close()


async def test_rejected_token_makes_the_service_unready_and_consumes_nothing(
    kafka_bootstrap: str, hubspot: FakeHubSpot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_contact(hubspot, phone="+33612345678")
    topic = await make_topics(kafka_bootstrap, sink="crm")
    env = crm_env(kafka_bootstrap, topic, hubspot, tmp_path, HUBSPOT_TOKEN="pat-na1-revoked")  # noqa: S106
    async with InProcessConsumer(env, sink_name="crm") as consumer:
        await publish(
            kafka_bootstrap, topic, [sms_event(externalNumber="+33612345678") for _ in range(4)]
        )
        await wait_until(
            lambda: consumer.metric("onoff_consumer_target_requests_total", outcome="auth") >= 3,
            30,
            "several 401s",
        )
        assert consumer.metric("onoff_consumer_ready") == 0
        assert consumer.metric("onoff_consumer_commits_total") == 0
        assert hubspot.communications == []
        assert any(r.getMessage() == "credentials_rejected" for r in caplog.records)
        assert "pat-na1-revoked" not in caplog.text
        hubspot.token = "pat-na1-revoked"  # noqa: S105 # the admin fixes the token
        await wait_until(lambda: len(hubspot.communications) == 4, 30, "delivery after the fix")
        await wait_until(lambda: consumer.metric("onoff_consumer_ready") == 1, 10, "ready")


async def test_rolling_restart_mid_batch_at_hubspots_pace_creates_nothing_twice(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A second member joins (a rolling update's new pod) while the first is in the middle of
    a slow CRM batch (HubSpot answering in 2.5 s: a batch's three or four requests take about
    the 8 s revoke bound of a 10 s rebalance timeout), with HubSpot's search lagging its
    creates by 3 s. Whether the first member finishes within the bound or is evicted while
    still creating, every SMS is created exactly once: counted per create."""
    fake = FakeHubSpot(search_lag=3.0)
    fake.response_delay = 2.5
    await fake.start()
    try:
        numbers = [f"+3361200{i:04d}" for i in range(6)]
        for number in numbers:
            add_contact(fake, phone=number)  # searchable at once (seeded)
        topic = await make_topics(kafka_bootstrap, partitions=2, sink="crm")
        events = [sms_event(externalNumber=numbers[i % 6]) for i in range(120)]
        env = crm_env(
            kafka_bootstrap,
            topic,
            fake,
            tmp_path,
            CRM_CREATE_RETRY_SECONDS="3",
            CONSUMER_REBALANCE_TIMEOUT_MS="10000",
        )
        await publish(kafka_bootstrap, topic, events[:60])
        async with InProcessConsumer(env, sink_name="crm") as first:
            await wait_until(
                lambda: first.metric("onoff_consumer_events_consumed_total") > 0,
                60,
                "the first member's batch in hand",
            )
            async with InProcessConsumer(env, sink_name="crm") as second:
                await publish(kafka_bootstrap, topic, events[60:])
                await wait_until(lambda: len(fake.communications) >= 120, 150, "all 120 logged")
                await asyncio.sleep(4)  # a late duplicate would land here
                assert second.metric("onoff_consumer_events_consumed_total") > 0, (
                    "the second member never got a partition: no rebalance was tested"
                )
        assert creates_per_event(fake) == Counter({e["id"]: 1 for e in events})
        assert len(fake.communications) == 120
    finally:
        await fake.close()


async def test_search_answers_of_the_wrong_shape_are_retried_never_fatal_never_dead_lettered(
    kafka_bootstrap: str, hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    """A 2xx search answer that is not HubSpot's object (a JSON array, a proxy's page, results
    without ids) speaks for the whole batch: before, `_search` raised AttributeError and the
    consumer exited; now the batch is retried and then delivered, nothing dead-lettered."""
    add_contact(hubspot, phone=CONTACT_NUMBER)
    topic = await make_topics(kafka_bootstrap, sink="crm")
    search = "/crm/v3/objects/communications/search"
    hubspot.answer_next(1, 200, b"[1, 2]", path=search)
    hubspot.answer_next(1, 200, b'"<html>maintenance</html>"', path=search)
    hubspot.answer_next(1, 200, b'{"results": [{"properties": {}}]}', path=search)
    event = sms_event(externalNumber=CONTACT_NUMBER)
    async with InProcessConsumer(
        crm_env(kafka_bootstrap, topic, hubspot, tmp_path), sink_name="crm"
    ) as consumer:
        await publish(kafka_bootstrap, topic, [event])
        await wait_until(lambda: len(hubspot.communications) == 1, 30, "the SMS logged")
        assert consumer.task is not None
        assert not consumer.task.done()
        assert consumer.metric("onoff_consumer_retries_total", stage="deliver") == 3
        assert consumer.metric("onoff_consumer_dlq_events_total") == 0
        assert consumer.metric("onoff_consumer_unexpected_errors_total") == 0
    assert creates_per_event(hubspot) == Counter({event["id"]: 1})
