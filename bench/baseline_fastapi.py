"""Baseline (b): a typical hand-written receiver. FastAPI on uvicorn, a pydantic model of
the payload, and one ``send_and_wait`` (acks=all, idempotent) per request, as most
tutorials write it."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI, Request
from pydantic import BaseModel

producer: AIOKafkaProducer | None = None


class SmsEvent(BaseModel):
    id: str
    eventName: str  # Onoff's field names
    onoffUserName: str
    onoffUserEmail: str
    onoffUserNumber: str
    externalNumber: str
    date: str
    smsDirection: str
    body: str


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    global producer  # noqa: PLW0603 # the tutorial way
    producer = AIOKafkaProducer(
        bootstrap_servers=os.environ["KAFKA_BOOTSTRAP_SERVERS"], acks="all", enable_idempotence=True
    )
    await producer.start()
    yield
    await producer.stop()


app = FastAPI(lifespan=lifespan)


@app.post("/v1/onoff/sms")
async def receive(event: SmsEvent, request: Request) -> dict[str, str]:
    assert producer is not None  # noqa: S101
    await producer.send_and_wait(
        os.environ["KAFKA_TOPIC"], await request.body(), key=event.id.encode()
    )
    return {}


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        access_log=False,
        loop="uvloop",
    )
