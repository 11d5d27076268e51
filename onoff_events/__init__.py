"""Shared pieces of onoff-events: the SMS event contract, schema loading, Kafka settings,
CloudEvents headers, settings parsing and logging. The gateway and the consumers import
from here; this package imports from neither."""
