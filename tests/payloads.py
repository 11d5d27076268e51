"""Onoff-shaped request bodies for tests."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

# Onoff's own body example, verbatim from its "Send SMS log details" reference page.
ONOFF_SAMPLE = b"""{
"id": "12345",
"eventName": "SMS",
"onoffUserName": "John Doe",
"onoffUserEmail": "john.doe@example.com",
"onoffUserNumber": "1234567890",
"externalNumber": "0987654321",
"externalName": "John Smith",
"externalEmail": "smith@example.com",
"date": "2023-05-20T14:30:00Z",
"smsDirection": "SENT",
"body": "This is the body of the SMS"
}"""


def sms_event(**overrides: Any) -> dict[str, Any]:
    """A valid SMS event with a fresh UUID id; ``overrides`` replace or add fields."""
    event: dict[str, Any] = orjson.loads(ONOFF_SAMPLE)
    event["id"] = str(uuid.uuid4())
    event.update(overrides)
    return event


def sms_body(**overrides: Any) -> bytes:
    return orjson.dumps(sms_event(**overrides))


# A call log as Onoff's call webhook sends it. Onoff documents the field names, not a whole
# body: this one is our guess at a typical CDR (docs/topics.md says which parts are guesses).
CALL_SAMPLE = b"""{
"id": "67890",
"eventName": "CDR",
"onoffUserName": "John Doe",
"onoffUserEmail": "john.doe@example.com",
"onoffUserNumber": "1234567890",
"externalNumber": "0987654321",
"externalName": "John Smith",
"externalEmail": "smith@example.com",
"callStarted": "2023-05-20T14:30:00Z",
"callEnded": "2023-05-20T14:32:05Z",
"callDuration": 125,
"callDirection": "INCOMING",
"callStatus": "ANSWERED",
"callNotes": null,
"tags": [{"tagId": "t1", "tagName": "Support", "tagColor": "#2E86DE"}]
}"""


def call_event(**overrides: Any) -> dict[str, Any]:
    """A valid call event (a CDR unless ``eventName`` says otherwise) with a fresh UUID id."""
    event: dict[str, Any] = orjson.loads(CALL_SAMPLE)
    event["id"] = str(uuid.uuid4())
    event.update(overrides)
    return event
