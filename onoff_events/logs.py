"""Structured JSON logs: one line per notable event, fields named, no personal data.

Call sites pass an event name and explicit fields (``log_event(log, "publish_failed",
reason="timeout")``); nothing formats a payload into a message, so bodies, numbers and
e-mails cannot slip into a log line by accident.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson

from onoff_events.cloudevents import rfc3339_now


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": rfc3339_now(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # The type and message only: tracebacks of library errors can quote payloads.
            line["error_type"] = record.exc_info[0].__name__
        return orjson.dumps(line, default=str).decode()


def configure(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every logger's records to stdout as JSON lines (containers collect stdout), or to
    ``stream`` (the operator tools keep stdout for their results)."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_libraries(logging.getLevelName(level))


def quiet_libraries(level: int = logging.INFO) -> None:
    """Keep library loggers at INFO or above, whatever LOG_LEVEL says (and at LOG_LEVEL when
    it is higher).

    aiokafka's DEBUG lines quote whole records ("Sending (key=… value=…)"): message bodies,
    numbers and e-mails. Its INFO and above carry addresses and error names only.
    """
    for name in ("aiokafka", "kafka", "aiohttp.access"):
        logging.getLogger(name).setLevel(max(logging.INFO, level))


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one named event with its fields."""
    logger.log(level, event, extra={"fields": fields})
