"""The CRM sink on HubSpot's batch APIs, against the HubSpot fake (a real HTTP server with
HubSpot's limits, 207 multi-status answers and search lag): requests per 100 SMS counted, a
refused input dead-letters its own SMS only, a whole-batch refusal never takes good events
down with it, and two deliveries of one batch at once log each SMS once."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from consumers.dedupe import ClaimHeld, SqliteDedupe
from consumers.records import SmsRecord
from consumers.sinks import TransientSinkError
from consumers.sinks.crm import CrmSink, batch_outcome
from tests.fakes.hubspot import DEFAULT_TOKEN, FakeHubSpot
from tests.payloads import sms_event

BATCH_CREATE = "/crm/v3/objects/communications/batch/create"


def record(**overrides: Any) -> SmsRecord:
    event = sms_event(**overrides)
    return SmsRecord(
        event["id"],
        event,
        orjson.dumps(event),
        datetime.now(UTC),
        datetime.now(UTC),
        "sms-events",
        0,
        0,
    )


def sink(fake: FakeHubSpot, **options: Any) -> CrmSink:
    return CrmSink(
        CollectorRegistry(),
        token=DEFAULT_TOKEN,
        base_url=fake.base_url,
        create_retry_seconds=0.5,
        **options,
    )


def numbers(count: int, start: int = 0) -> list[str]:
    return [f"+33612{i:06d}" for i in range(start, start + count)]


def requests_by_path(fake: FakeHubSpot) -> Counter[str]:
    return Counter(r.path for r in fake.requests)


def per_event(fake: FakeHubSpot) -> Counter[str]:
    return Counter(c.properties.get("onoff_event_id", "") for c in fake.communications)


@pytest.fixture
async def fake() -> Any:
    hubspot = FakeHubSpot()
    await hubspot.start()
    try:
        yield hubspot
    finally:
        await hubspot.close()


@pytest.mark.parametrize("contacts", ["known", "new"])
async def test_100_sms_cost_at_most_7_requests(fake: FakeHubSpot, contacts: str) -> None:
    """One already-logged search, four contact searches (25 numbers each), one batch create
    of the missing contacts, one of the communications: counted on the fake's request log."""
    phones = numbers(100)
    if contacts == "known":
        for phone in phones:
            fake.seed_contact({"phone": phone})
    crm = sink(fake, create_missing_contacts=True)
    try:
        events = [
            record(externalNumber=p, externalEmail=f"customer{i}@example.com")
            for i, p in enumerate(phones)
        ]
        outcome = await crm.deliver(events)
    finally:
        await crm.close()
    assert outcome.rejected == {}
    assert len(fake.communications) == 100
    assert set(per_event(fake).values()) == {1}
    paths = requests_by_path(fake)
    assert paths[BATCH_CREATE] == 1
    assert paths["/crm/v3/objects/communications/search"] == 1
    assert paths["/crm/v3/objects/contacts/search"] == 4
    assert paths["/crm/v3/objects/contacts/batch/create"] == (1 if contacts == "new" else 0)
    assert sum(paths.values()) <= 7


async def test_one_refused_contact_dead_letters_its_sms_only(fake: FakeHubSpot) -> None:
    phones = numbers(100)
    events = [record(externalNumber=p, externalEmail=f"c{i}@example.com") for i, p in
              enumerate(phones)]  # fmt: skip
    bad = record(externalNumber=phones[37], externalEmail="not an e-mail")
    events[37] = bad
    crm = sink(fake, create_missing_contacts=True)
    try:
        outcome = await crm.deliver(events)
    finally:
        await crm.close()
    assert list(outcome.rejected) == [bad.event_id]
    assert "VALIDATION_ERROR" in outcome.rejected[bad.event_id]
    # HubSpot's message quotes the address: only its category is kept (DLQ headers, logs).
    assert "not an e-mail" not in outcome.rejected[bad.event_id]
    logged = per_event(fake)
    assert len(logged) == 99
    assert bad.event_id not in logged


async def test_a_whole_batch_refusal_is_split_and_good_sms_are_all_logged(
    fake: FakeHubSpot,
) -> None:
    """HubSpot refusing a whole batch (a 400 that names no input): the halves go again, down
    to single inputs if need be, and nothing good is dead-lettered."""
    phones = numbers(40)
    for phone in phones:
        fake.seed_contact({"phone": phone})
    problem = orjson.dumps({"status": "error", "category": "VALIDATION_ERROR", "message": "x"})
    fake.answer_next(2, 400, problem, path=BATCH_CREATE)
    crm = sink(fake)
    try:
        outcome = await crm.deliver([record(externalNumber=p) for p in phones])
    finally:
        await crm.close()
    assert outcome.rejected == {}
    assert set(per_event(fake).values()) == {1}
    assert len(per_event(fake)) == 40
    assert requests_by_path(fake)[BATCH_CREATE] >= 3  # the refused batch, then its halves


async def test_a_batch_delivered_twice_at_once_logs_each_sms_once(
    tmp_path: Path,
) -> None:
    """Two members with the same 100 SMS at the same moment (a rebalance overlap), HubSpot's
    search 2 s behind its creates: the dedupe store's lease makes the second wait, and when it
    may go, the first one's communications are searchable. Counted per create."""
    fake = FakeHubSpot(search_lag=2.0)
    await fake.start()
    phones = numbers(100)
    for phone in phones:
        fake.seed_contact({"phone": phone})
    events = [record(externalNumber=p) for p in phones]
    ids = [e.event_id for e in events]
    members = []
    for _ in range(2):
        crm = sink(fake)
        crm.takeover_settle_seconds = 3.0
        store = SqliteDedupe(tmp_path / "dedupe.sqlite", "onoff-crm", settle_seconds=3.0)
        members.append((crm, store))

    async def deliver(crm: CrmSink, store: SqliteDedupe) -> str:
        while True:
            try:
                done = await store.claim(ids)
            except ClaimHeld as held:
                await asyncio.sleep(held.retry_after)
                continue
            todo = [e for e in events if e.event_id not in done]
            if not todo:
                return "all done already"
            await crm.deliver(todo)
            await store.confirm([e.event_id for e in todo])
            return f"delivered {len(todo)}"

    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(deliver(crm, store) for crm, store in members)), 60
        )
    finally:
        for crm, store in members:
            await crm.close()
            await store.close()
        await fake.close()
    assert sorted(outcomes) == ["all done already", "delivered 100"]
    assert per_event(fake) == Counter(dict.fromkeys(ids, 1))


async def test_new_numbers_sharing_one_email_cost_one_search(fake: FakeHubSpot) -> None:
    """Onoff's sample sends one e-mail for every SMS: HubSpot refuses a second contact with
    an e-mail it has (CONFLICT), and those SMS are logged on that contact, found with one
    search for the e-mail, not one per number."""
    phones = numbers(50)
    crm = sink(fake, create_missing_contacts=True)
    try:
        outcome = await crm.deliver(
            [record(externalNumber=p, externalEmail="shared@example.com") for p in phones]
        )
    finally:
        await crm.close()
    assert outcome.rejected == {}
    assert len(fake.contacts) == 1
    assert {c.contact_ids[0] for c in fake.communications} == {fake.contacts[0].id}
    assert len(per_event(fake)) == 50
    email_searches = [
        r for r in fake.requests
        if r.path == "/crm/v3/objects/contacts/search" and "email" in orjson.dumps(r.json).decode()
    ]  # fmt: skip
    assert len(email_searches) == 1


async def test_a_batch_answer_missing_inputs_is_retried_not_guessed(fake: FakeHubSpot) -> None:
    """A 201 that names fewer inputs than were sent: transient (after the search lag, the
    retry's already-logged search tells what exists), never a dead letter."""
    phones = numbers(3)
    for phone in phones:
        fake.seed_contact({"phone": phone})
    fake.answer_next(1, 201, orjson.dumps({"status": "COMPLETE", "results": []}), path=BATCH_CREATE)
    crm = sink(fake)
    try:
        with pytest.raises(TransientSinkError):
            await crm.deliver([record(externalNumber=p) for p in phones])
    finally:
        await crm.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
traces = st.sampled_from(["a", "b", "c", "zz"])
result = st.fixed_dictionaries({"id": st.text(max_size=3), "objectWriteTraceId": traces})
error = st.fixed_dictionaries(
    {
        "category": st.text(max_size=8),
        "message": st.text(max_size=8),
        "context": st.fixed_dictionaries({"objectWriteTraceId": st.lists(traces, max_size=2)}),
    }
)
answers = (
    st.fixed_dictionaries(
        {"results": st.lists(result, max_size=4), "errors": st.lists(error, max_size=4)}
    )
    | json_values
)


@settings(max_examples=300, deadline=None)
@given(answer=answers)
def test_any_batch_answer_maps_to_sent_inputs_or_is_transient(answer: Any) -> None:
    """Whatever HubSpot (or a proxy) answers with a 2xx: created and refused name only inputs
    we sent, never one input both ways; an answer of another shape is transient."""
    sent = {"a", "b", "c"}
    try:
        created, refused = batch_outcome(orjson.dumps(answer), sent)
    except TransientSinkError:
        return
    assert set(created) <= sent
    assert set(refused) <= sent
    assert not set(created) & set(refused)
