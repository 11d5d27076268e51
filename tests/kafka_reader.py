"""Reading a topic back from the real broker, as a data team's consumer would."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaConsumer


async def read_records(
    bootstrap: str, topic: str, count: int | None = None, seconds: float = 20.0
) -> list[Any]:
    """Every record of ``topic`` from the beginning: stops at ``count`` records, or when no
    more arrive (``count=None``: read until the end offsets seen at the start), or after
    ``seconds``."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        end_offsets: dict[Any, int] | None = None
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for partition_records in batch.values():
                records.extend(partition_records)
            if count is not None and len(records) >= count:
                break
            if count is None:
                partitions = consumer.assignment()
                if partitions and end_offsets is None:
                    end_offsets = await consumer.end_offsets(list(partitions))
                if end_offsets is not None:
                    positions = [await _position(consumer, tp) for tp in end_offsets]
                    if all(
                        p >= end for p, end in zip(positions, end_offsets.values(), strict=True)
                    ):
                        break
    finally:
        await consumer.stop()
    return records


async def _position(consumer: AIOKafkaConsumer, tp: Any) -> int:
    return int(await consumer.position(tp))
