"""Starting real services for tests without Docker: the project's own scripts."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SCRIPT = ROOT / "scripts" / "kafka.sh"


def docker_engine_answers() -> bool:
    """True only when a Docker engine answers ``GET /_ping`` (the client alone is not enough)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = host.removeprefix("unix://")
        elif host.startswith("tcp://"):
            name, _, port = host.removeprefix("tcp://").rpartition(":")
            conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (name, int(port))
        else:
            return False
        with conn:
            conn.settimeout(2)
            conn.connect(address)
            conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return conn.recv(64).split(b" ")[1:2] == [b"200"]
    except (OSError, ValueError):
        return False


def free_port_pair() -> int:
    """A port P such that P and P+1 are free on 127.0.0.1 (broker and controller listeners)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return int(port)
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


@dataclass
class LocalKafka:
    """A real single-node Kafka broker run by scripts/kafka.sh in ``folder``; ``env`` adds to
    the script's environment (``KAFKA_PROXIED_PORT``/``KAFKA_PROXIED_ADVERTISED_PORT``: a
    second listener for a fault proxy)."""

    folder: Path
    port: int
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        subprocess.run(
            [str(KAFKA_SCRIPT), "start", str(self.folder), str(self.port)],
            check=True,
            timeout=180,
            env={**os.environ, **self.env},
        )

    def stop(self) -> None:
        subprocess.run([str(KAFKA_SCRIPT), "stop", str(self.folder)], check=True, timeout=60)


@dataclass
class ScriptService:
    """A real PostgreSQL or Redis run by scripts/postgres.sh or scripts/redis.sh."""

    script: str
    folder: Path
    port: int

    def _run(self, *args: str) -> str:
        done = subprocess.run(
            [str(ROOT / "scripts" / self.script), *args],
            check=True,
            timeout=300,
            capture_output=True,
            text=True,
        )
        return done.stdout.strip()

    def start(self) -> None:
        self._run("start", str(self.folder), str(self.port))

    def stop(self) -> None:
        self._run("stop", str(self.folder))

    @property
    def url(self) -> str:
        return self._run("url", str(self.folder), str(self.port))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
