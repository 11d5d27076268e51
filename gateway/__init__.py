"""The webhook gateway: Onoff's SMS webhook in, durable Kafka records out."""
