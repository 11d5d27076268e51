"""``python -m onoff_events.topics [SINK…]``: create the project's topics on a development
broker: the events topic, the gateway's DLQ, one DLQ per sink named, the call webhook's topic
and DLQ, and the re-drive ledger.

Production topics belong to Strimzi (deploy/k8s); this is for ``make run`` and local brokers.
"""

from __future__ import annotations

import asyncio
import os
import sys

from onoff_events import settings as s
from onoff_events.event_kinds import CALL
from onoff_events.kafka import KafkaSettings, ensure_topics


def main() -> int:
    env = os.environ
    try:
        kafka = KafkaSettings.from_env(env, client_id="onoff-topics")
        topic = s.text(env, "KAFKA_TOPIC", "sms-events")
        partitions = s.number(env, "KAFKA_TOPIC_PARTITIONS", 3, int, minimum=1, maximum=1000)
    except s.SettingsError as exc:
        print(f"onoff-topics: invalid setting: {exc}", file=sys.stderr)
        return 2
    wanted = {topic: partitions, s.text(env, "KAFKA_DLQ_TOPIC", f"{topic}.dlq"): 1}
    wanted.update({f"{topic}.{sink}.dlq": 1 for sink in sys.argv[1:]})
    # The call webhook's topics (GATEWAY_EVENT_KINDS=sms,call), as partitioned as the SMS one.
    calls = s.text(env, "KAFKA_CALL_TOPIC", CALL.topic)
    wanted[calls] = partitions
    wanted[s.text(env, "KAFKA_CALL_DLQ_TOPIC", f"{calls}.dlq")] = 1
    wanted.update({f"{calls}.{sink}.dlq": 1 for sink in sys.argv[1:]})
    # onoff-dlq redrive's ledger: which DLQ records were moved (compacted in production).
    wanted[s.text(env, "KAFKA_REDRIVEN_TOPIC", f"{topic}.redriven")] = 1
    created = asyncio.run(ensure_topics(kafka, wanted))
    for name in wanted:
        print(f"onoff-topics: {name}: {'created' if name in created else 'exists'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
