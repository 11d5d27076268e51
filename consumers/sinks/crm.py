"""The CRM sink: every SMS logged as a communication, every call as a call, on the right
HubSpot contact.

HubSpot CRM API v3, private-app token. Per batch: find the events already logged (a
communication whose ``onoff_event_id`` property holds the event id: a consumer that crashed
after creating it but before confirming it in the dedupe store must not log it twice), find
the contacts by phone number in E.164 (one search per 25 numbers), create the contacts that
are missing when ``CRM_UNKNOWN_CONTACT=create`` (else skip and count them), then create one
communication per event, associated with its contact. Calls (the service of call-events,
``CONSUMER_EVENT_KIND=call``) go the same way as HubSpot call engagements (``calls``: direction,
status, duration in ms, the recording or voicemail URL). Setup and limits: docs/crm.md.
"""

from __future__ import annotations

import html
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from aiolimiter import AsyncLimiter
from prometheus_client import CollectorRegistry, Counter

from consumers.phones import phone_region, to_e164
from consumers.records import CallRecord, EventRecord, SmsRecord
from consumers.sinks import Delivery, SinkConfigError, TransientSinkError
from consumers.sinks.http import AuthRejected, JsonApi, RequestRejected, TargetMetrics
from onoff_events import settings as s

log = logging.getLogger("consumers.crm")
COMMUNICATION_TO_CONTACT = 81  # HubSpot-defined association type id
CALL_TO_CONTACT = 194  # HubSpot-defined association type id, calls → contacts
SEARCH_PAGE = 100  # values per IN filter and results per page
# HubSpot's search index shows a new object a few seconds after it is written: after a create
# that may have succeeded (timeout, 5xx), wait this long before checking and retrying.
DEFAULT_CREATE_RETRY_SECONDS = 30.0
BATCH_SECONDS = 20.0  # a batch's budget at the configured pace
BATCH_INPUTS = 100  # inputs per batch create, HubSpot's limit
# Requests per 100 events at most: the already-logged search, four contact searches (25 numbers
# each), one batch create of contacts, one of communications.
REQUESTS_PER_100_EVENTS = 7
T = TypeVar("T")


class CrmSink:
    name = "crm"
    event_kinds = frozenset({"sms", "call"})  # communications, calls

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        token: str,
        base_url: str = "https://api.hubapi.com",
        create_missing_contacts: bool = False,
        default_region: str | None = "FR",
        requests_per_10s: int = 90,
        searches_per_second: int = 4,
        event_id_property: str = "onoff_event_id",
        create_retry_seconds: float = DEFAULT_CREATE_RETRY_SECONDS,
        event_kind: str = "sms",
    ) -> None:
        self._create_retry = create_retry_seconds
        # The engagement each event becomes: an SMS a communication, a call a call. The call
        # service's metrics say so (the sink label, as the runner's: consumers/settings.py).
        self._object = "calls" if event_kind == "call" else "communications"
        self.name = "crm-calls" if event_kind == "call" else "crm"
        # The search index lags our creates by up to create_retry_seconds: a batch taken over
        # from another member waits that long past its last lease renewal (runner renews
        # every third of it), so whatever that member created is searchable first.
        self.takeover_settle_seconds = create_retry_seconds * 1.5
        # No batch may outlive the group's rebalance timeout: at most ~20 s of requests at our
        # pace, counting REQUESTS_PER_100_EVENTS (90 requests per 10 s: 2,571 events; capped
        # at 1,000, which HubSpot's 4 searches a second take 12.5 s to look up).
        per_batch = requests_per_10s / 10 * BATCH_SECONDS / REQUESTS_PER_100_EVENTS * 100
        self.max_batch_events = max(1, min(1000, int(per_batch)))
        self._base = base_url.rstrip("/")
        self._create_missing = create_missing_contacts
        self._region = default_region
        self._id_property = event_id_property
        # Buckets of one, paced evenly: any 10 s then holds at most requests_per_10s + 1
        # requests (a bucket of N would allow 2N), and any second searches_per_second + 1.
        self._searches = AsyncLimiter(1, 1 / searches_per_second)
        self._api = JsonApi(
            self.name,
            "hubspot",
            TargetMetrics.create(registry),
            limiter=AsyncLimiter(1, 10 / requests_per_10s),
            headers={"Authorization": f"Bearer {token}"},
        )
        self._contacts_seen = Counter(
            "onoff_consumer_crm_contacts",
            "Contact look-ups per event, by outcome "
            "(found, created, missing: skipped, unparseable_number: skipped).",
            ["sink", "outcome"],
            registry=registry,
        )
        # Ids logged by this process: a batch retried after a later failure skips them at
        # once, without waiting for HubSpot's search index to show them.
        self._logged: OrderedDict[str, str] = OrderedDict()
        self._contact_cache: dict[str, str] = {}

    async def start(self) -> None:
        """Nothing to open: the first call makes the session."""

    async def close(self) -> None:
        await self._api.close()

    async def deliver(self, events: Sequence[EventRecord]) -> Delivery:
        """A batch in a fixed number of requests per 100 events: one search for the ids
        already logged, the contact searches (25 numbers each, cached), one batch create of
        the missing contacts, one batch create of the communications. An input HubSpot
        refuses goes to the DLQ with its reason; its batch-mates are logged."""
        pending = [e for e in events if e.event_id not in self._logged]
        already = await self._already_logged([e.event_id for e in pending])
        pending = [e for e in pending if e.event_id not in already]
        numbers = {
            e.event_id: to_e164(str(e.payload.get("externalNumber") or ""), self._region)
            for e in pending
        }
        cached_before = set(self._contact_cache)
        contacts = await self._find_contacts({n for n in numbers.values() if n is not None})
        rejected: dict[str, str] = {}
        if self._create_missing:
            rejected = await self._add_missing_contacts(pending, numbers, contacts)
        to_log: list[tuple[EventRecord, str]] = []
        for event in pending:
            number = numbers[event.event_id]
            if event.event_id in rejected:
                continue
            if number is None:
                self._contacts_seen.labels(self.name, "unparseable_number").inc()
            elif number not in contacts:
                self._contacts_seen.labels(self.name, "missing").inc()
            else:
                self._contacts_seen.labels(self.name, "found").inc()
                to_log.append((event, contacts[number]))
        stale: set[str] = set()
        for chunk in _chunks(to_log, BATCH_INPUTS):
            for event, reason in (await self._log_batch(chunk)).items():
                number = numbers[event.event_id]
                if number in cached_before:
                    stale.add(number)
                else:
                    rejected[event.event_id] = reason
        if stale:
            # A cached contact may have been merged or deleted since: look those numbers up
            # again on the retry before concluding their SMS cannot be logged (the SMS logged
            # meanwhile are remembered, and skipped then).
            for number in stale:
                self._contact_cache.pop(number, None)
            raise TransientSinkError("hubspot: cached contact refused")
        # Found by HubSpot's search: logged before this batch (a copy, or a replay): counted
        # as already present, not delivered. (Those this process logged on an earlier try of
        # the same batch are skipped before the search, and count as delivered.)
        return Delivery(rejected, already_held=frozenset(already))

    async def _add_missing_contacts(
        self,
        pending: Sequence[EventRecord],
        numbers: Mapping[str, str | None],
        contacts: dict[str, str],
    ) -> dict[str, str]:
        """Create the contacts ``contacts`` lacks (in place); return the events whose contact
        HubSpot refused, with why (they go to the DLQ)."""
        unknown: dict[str, EventRecord] = {}
        for event in pending:
            number = numbers[event.event_id]
            if number is not None and number not in contacts:
                unknown.setdefault(number, event)  # the first SMS names the contact
        created, refused = await self._create_contacts(unknown)
        contacts.update(created)
        self._contact_cache.update(created)
        return {
            event.event_id: f"contact: {refused[number]}"
            for event in pending
            if (number := numbers[event.event_id]) is not None and number in refused
        }

    async def _create_contacts(
        self, unknown: Mapping[str, EventRecord]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Batch-create a contact per number: (number → new contact id, number → why HubSpot
        refused it). A number whose e-mail belongs to another contact gets that contact."""
        created: dict[str, str] = {}
        refused: dict[str, str] = {}
        conflicts: dict[str, str] = {}  # number → the e-mail HubSpot says is taken
        for chunk in _chunks(sorted(unknown), BATCH_INPUTS):
            inputs = {number: _contact_properties(unknown[number], number) for number in chunk}
            results, errors = await self._batch_create(
                "contacts", {n: {"properties": p} for n, p in inputs.items()}
            )
            for number, contact in results.items():
                created[number] = contact
                self._contacts_seen.labels(self.name, "created").inc()
            for number, category in errors.items():
                email = inputs[number].get("email")
                if category == "CONFLICT" and email:
                    conflicts[number] = email
                else:
                    refused[number] = f"hubspot refused: {category}"
        owners: dict[str, str] = {}  # e-mail → its contact: one search per e-mail
        for number, email in conflicts.items():
            # The e-mail belongs to a contact whose number differs: log the SMS there.
            if email not in owners:
                query = {"filterGroups": [{"filters": [
                    {"propertyName": "email", "operator": "EQ", "value": email}]}]}  # fmt: skip
                matches = await self._search("contacts", query)
                if not matches:
                    # Created seconds ago (maybe by this very batch) and not in the search
                    # index yet: ask again later.
                    raise TransientSinkError(
                        "hubspot: conflicting contact not searchable yet",
                        retry_after=self._create_retry,
                    )
                owners[email] = str(matches[0]["id"])
            created[number] = owners[email]
        return created, refused

    async def _log_batch(self, chunk: Sequence[tuple[EventRecord, str]]) -> dict[EventRecord, str]:
        """One batch create of engagements; returns the events HubSpot refused, with why.
        Those it created are remembered (a retry of the batch skips them)."""
        inputs = {event.event_id: self._engagement(event, contact) for event, contact in chunk}
        results, errors = await self._batch_create(self._object, inputs)
        by_id = {event.event_id: event for event, _ in chunk}
        for event_id, engagement in results.items():
            self._remember(event_id, engagement)
        self._api.count_delivered(len(results))
        return {
            by_id[event_id]: f"hubspot refused: {category}" for event_id, category in errors.items()
        }

    def _engagement(self, event: EventRecord, contact: str) -> dict[str, Any]:
        if isinstance(event, CallRecord):
            properties = call_properties(event)
            association = CALL_TO_CONTACT
        else:
            properties = {
                "hs_communication_channel_type": "SMS",
                "hs_communication_logged_from": "CRM",
                "hs_communication_body": communication_body(event.payload),
                "hs_timestamp": hubspot_timestamp(event),
            }
            association = COMMUNICATION_TO_CONTACT
        return {
            "properties": {**properties, self._id_property: event.event_id},
            "associations": [{"to": {"id": contact}, "types": [
                {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": association}]}],
        }  # fmt: skip

    async def _batch_create(
        self, object_type: str, inputs: Mapping[str, dict[str, Any]]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """``POST …/{object_type}/batch/create`` in HubSpot's multi-status mode: each input
        carries its key as ``objectWriteTraceId``. Returns (key → created id, key → (category,
        category of a refused input). A whole-batch refusal (one input HubSpot would not take
        in multi-status mode) is split in halves until the culprit is alone: good inputs are
        never refused with it."""
        body = {"inputs": [{**value, "objectWriteTraceId": key} for key, value in inputs.items()]}
        try:
            _, data = await self._create(f"{object_type}/batch/create", body)
        except RequestRejected as exc:
            if len(inputs) == 1:
                (key,) = inputs
                return {}, {key: exc.category or str(exc.status)}
            keys = list(inputs)
            halves = (keys[: len(keys) // 2], keys[len(keys) // 2 :])
            created: dict[str, str] = {}
            refused: dict[str, str] = {}
            for half in halves:
                c, r = await self._batch_create(object_type, {k: inputs[k] for k in half})
                created |= c
                refused |= r
            return created, refused
        created, refused = batch_outcome(data, set(inputs))
        if len(created) + len(refused) < len(inputs):
            # An input the answer does not mention may or may not exist: wait out the search
            # index's lag, then the already-logged check of the retry tells.
            raise TransientSinkError(
                "hubspot batch: answer names fewer inputs than sent", retry_after=self._create_retry
            )
        return created, refused

    async def _already_logged(self, event_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(event_ids):
            query = {"filterGroups": [{"filters": [
                {"propertyName": self._id_property, "operator": "IN", "values": chunk}]}],
                "properties": [self._id_property]}  # fmt: skip
            for result in await self._search(self._object, query):
                found.add(result["properties"].get(self._id_property))
        return found

    async def _find_contacts(self, numbers: set[str]) -> dict[str, str]:
        """E.164 number → contact id, for the contacts HubSpot has (phone or mobile)."""
        known = {n: self._contact_cache[n] for n in numbers if n in self._contact_cache}
        wanted = sorted(numbers - known.keys())
        # Four spellings per number: 25 numbers keep an IN filter at 100 values.
        for chunk in _chunks(wanted, SEARCH_PAGE // 4):
            # HubSpot matches stored text exactly: ask for the usual ways a number is typed.
            variants = sorted({v for n in chunk for v in _spellings(n, self._region)})
            query = {
                "filterGroups": [
                    {"filters": [{"propertyName": prop, "operator": "IN", "values": variants}]}
                    for prop in ("phone", "mobilephone")
                ],
                "properties": ["phone", "mobilephone"],
            }
            for contact in await self._search("contacts", query):
                for prop in ("phone", "mobilephone"):
                    stored = contact["properties"].get(prop)
                    number = to_e164(stored, self._region) if stored else None
                    if number in chunk:
                        known.setdefault(number, contact["id"])
        self._contact_cache.update(known)
        if len(self._contact_cache) > 50_000:
            self._contact_cache.clear()
        return known

    async def _create(self, object_type: str, body: dict[str, Any]) -> tuple[int, bytes]:
        """A create whose failure may hide a success: wait out the search index's lag before
        the retry, so the already-logged check can see what HubSpot may have stored."""
        try:
            return await self._api.call("POST", f"{self._base}/crm/v3/objects/{object_type}", body)
        except AuthRejected:
            raise
        except TransientSinkError as exc:
            raise TransientSinkError(
                str(exc), retry_after=max(exc.retry_after or 0.0, self._create_retry)
            ) from exc

    async def _search(self, object_type: str, query: dict[str, Any]) -> list[dict[str, Any]]:
        url = f"{self._base}/crm/v3/objects/{object_type}/search"
        results: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page = {**query, "limit": SEARCH_PAGE, **({"after": after} if after else {})}
            try:
                _, data = await self._api.call("POST", url, page, also_limited_by=self._searches)
            except RequestRejected as exc:
                # A search speaks for the whole batch: no single event to set aside. Retry
                # with backoff (visible in metrics and logs) rather than skip anything.
                raise TransientSinkError(f"hubspot search refused: {exc}") from exc
            page_results, after = search_page(data)
            results.extend(page_results)
            if not after:
                return results

    def _remember(self, event_id: str, communication: str) -> None:
        self._logged[event_id] = communication
        if len(self._logged) > 100_000:
            self._logged.popitem(last=False)


def search_page(data: bytes) -> tuple[list[dict[str, Any]], str | None]:
    """The results and the next page's cursor of a 2xx search answer. An answer of another
    shape (a proxy's page, an outage notice) speaks for the whole batch, not for one event:
    transient, retried with backoff, never a crash and never a dead letter."""
    try:
        answer = orjson.loads(data)
        results = answer.get("results", [])
        after = (answer.get("paging") or {}).get("next", {}).get("after")
    except (orjson.JSONDecodeError, AttributeError) as exc:
        raise TransientSinkError(
            f"hubspot search: unexpected answer ({type(exc).__name__})"
        ) from exc
    well_formed = isinstance(results, list) and all(
        isinstance(r, dict) and "id" in r and isinstance(r.get("properties", {}), dict)
        for r in results
    )
    if not well_formed:
        raise TransientSinkError("hubspot search: unexpected answer (results)")
    return [{"properties": {}, **r} for r in results], str(after) if after else None


def hubspot_timestamp(event: SmsRecord) -> str:
    """``hs_timestamp`` in UTC. The decoder only lets through dates that have a UTC time;
    should one slip by anyway, the receive time stands in rather than the batch failing."""
    try:
        moment = event.sent_at.astimezone(UTC)
    except (OverflowError, ValueError):
        moment = (event.received_at or datetime.now(UTC)).astimezone(UTC)
    return moment.isoformat().replace("+00:00", "Z")


# Onoff's callStatus and callDirection values are undocumented; these are the ones we expect.
# A value not listed is left out of the engagement (HubSpot refuses values it does not know).
CALL_STATUSES = {
    "ANSWERED": "COMPLETED",
    "COMPLETED": "COMPLETED",
    "MISSED": "NO_ANSWER",
    "NO_ANSWER": "NO_ANSWER",
    "BUSY": "BUSY",
    "FAILED": "FAILED",
    "CANCELED": "CANCELED",
    "CANCELLED": "CANCELED",
}
CALL_DIRECTIONS = {"INCOMING": "INBOUND", "INBOUND": "INBOUND", "OUTGOING": "OUTBOUND",
                   "OUTBOUND": "OUTBOUND"}  # fmt: skip


def call_properties(event: CallRecord) -> dict[str, str]:
    """The HubSpot call engagement's properties for one Onoff call (pure). A voicemail is a
    call with no answer whose recording is the voicemail; ``hs_call_duration`` is in ms."""
    p = event.payload
    voicemail = p.get("eventName") == "VM"
    direction = CALL_DIRECTIONS.get(str(p.get("callDirection") or "").upper())
    status = CALL_STATUSES.get(str(p.get("callStatus") or "").upper())
    if voicemail:
        direction, status = direction or "INBOUND", status or "NO_ANSWER"
    seconds = p.get("voicemailDuration") if voicemail else p.get("callDuration")
    recording = p.get("voicemailUrl") if voicemail else p.get("callRecordingUrl")
    moment = event.started_at or event.received_at or datetime.now(UTC)
    try:
        stamp = moment.astimezone(UTC)
    except (OverflowError, ValueError):
        stamp = datetime.now(UTC)
    properties = {
        "hs_timestamp": stamp.isoformat().replace("+00:00", "Z"),
        "hs_call_title": "Onoff voicemail" if voicemail else "Onoff call",
        "hs_call_body": call_body(p),
    }
    if direction:
        properties["hs_call_direction"] = direction
    if status:
        properties["hs_call_status"] = status
    # The schema bounds durations below only: a call over a year long is no call's duration
    # (and 1e306 seconds would not even convert to milliseconds).
    if isinstance(seconds, int | float) and not isinstance(seconds, bool) and 0 <= seconds < 3e7:
        properties["hs_call_duration"] = str(round(seconds * 1000))
    if isinstance(recording, str) and recording:
        properties["hs_call_recording_url"] = recording
    return properties


def call_body(payload: Mapping[str, Any]) -> str:
    """The call's description (HubSpot renders it as HTML): who, which way, how it ended."""
    kind = {"VM": "Voicemail", "RECORDING": "Recorded call"}.get(
        str(payload.get("eventName")), "Call"
    )
    incoming = str(payload.get("callDirection") or "").upper() in ("INCOMING", "INBOUND")
    way = "from" if incoming or payload.get("eventName") == "VM" else "to"
    external = html.escape(str(payload.get("externalNumber") or ""))
    line = html.escape(str(payload.get("onoffUserNumber") or ""))
    user = html.escape(str(payload.get("onoffUserName") or ""))
    status = html.escape(str(payload.get("callStatus") or "unknown"))
    text = f"<p><b>{kind} {way} {external}</b> (Onoff line {line}, {user}): {status}</p>"
    notes = payload.get("callNotes")
    if isinstance(notes, str) and notes:
        text += "<p>" + html.escape(notes).replace("\n", "<br>") + "</p>"
    return text


def communication_body(payload: Mapping[str, Any]) -> str:
    """The communication's text (HubSpot renders it as HTML): who, which way, the message."""
    received = payload.get("smsDirection") == "RECEIVED"
    way = "Inbound SMS from" if received else "Outbound SMS to"
    external = html.escape(str(payload.get("externalNumber", "")))
    line = html.escape(str(payload.get("onoffUserNumber", "")))
    user = html.escape(str(payload.get("onoffUserName", "")))
    text = html.escape(str(payload.get("body", ""))).replace("\n", "<br>")
    return f"<p><b>{way} {external}</b> (Onoff line {line}, {user})</p><p>{text}</p>"


def _spellings(e164: str, region: str | None) -> Iterable[str]:
    import phonenumbers  # noqa: PLC0415

    number = phonenumbers.parse(e164, None)
    yield e164
    yield phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
    if region and phonenumbers.region_code_for_number(number) == region:
        national = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
        yield national
        yield national.replace(" ", "")


def _chunks(items: Sequence[T], size: int = SEARCH_PAGE) -> list[list[T]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _contact_properties(event: EventRecord, number: str) -> dict[str, str]:
    first, _, last = (event.payload.get("externalName") or "").strip().partition(" ")
    properties = {"phone": number, "firstname": first, "lastname": last}
    email = event.payload.get("externalEmail")
    if email:
        properties["email"] = email
    return properties


def batch_outcome(data: bytes, keys: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """A 2xx batch create answer (201, or 207 in multi-status mode): (trace id → created
    object id, trace id → HubSpot's error category for a refused input), for the trace ids
    we sent. Only the category is kept: HubSpot's messages quote values (an e-mail address),
    and a reason travels to the DLQ's headers and logs. An answer of another shape speaks for
    the whole batch: transient (retried, never a crash and never a dead letter)."""
    try:
        answer = orjson.loads(data)
        results = answer.get("results") or []
        errors = answer.get("errors") or []
        created = {
            str(r["objectWriteTraceId"]): str(r["id"])
            for r in results
            if isinstance(r, dict) and r.get("objectWriteTraceId") in keys and "id" in r
        }
        refused: dict[str, str] = {}
        for error in errors:
            traces = (error.get("context") or {}).get("objectWriteTraceId") or []
            for trace in traces if isinstance(traces, list) else [traces]:
                if trace in keys and trace not in created:
                    refused[str(trace)] = str(error.get("category") or "UNKNOWN")[:64]
    except (orjson.JSONDecodeError, AttributeError, TypeError, KeyError) as exc:
        raise TransientSinkError(
            f"hubspot batch: unexpected answer ({type(exc).__name__})"
        ) from exc
    return created, refused


def crm_from_env(env: Mapping[str, str], registry: CollectorRegistry) -> CrmSink:
    token = env.get("HUBSPOT_TOKEN", "").strip()
    if not token:
        raise SinkConfigError("HUBSPOT_TOKEN: required (a HubSpot private-app access token)")
    unknown = s.choice(env, "CRM_UNKNOWN_CONTACT", "skip", frozenset({"skip", "create"}))
    region = phone_region(env)
    return CrmSink(
        registry,
        token=token,
        base_url=s.text(env, "HUBSPOT_BASE_URL", "https://api.hubapi.com"),
        create_missing_contacts=unknown == "create",
        default_region=region,
        requests_per_10s=s.number(env, "CRM_REQUESTS_PER_10S", 90, int, minimum=1, maximum=190),
        searches_per_second=s.number(env, "CRM_SEARCHES_PER_SECOND", 4, int, minimum=1, maximum=5),
        event_id_property=s.text(env, "CRM_EVENT_ID_PROPERTY", "onoff_event_id"),
        create_retry_seconds=s.number(
            env,
            "CRM_CREATE_RETRY_SECONDS",
            DEFAULT_CREATE_RETRY_SECONDS,
            float,
            minimum=0,
            maximum=600,
        ),
        # The service's event kind (consumers/settings.py): SMS or calls.
        event_kind=env.get("CONSUMER_EVENT_KIND", "sms").strip(),
    )
