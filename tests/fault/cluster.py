"""Every process of one fault run, real and on 127.0.0.1: a Kafka broker, PostgreSQL, Redis,
Alertmanager, a HubSpot-like server, gateways and consumers, each started by the project's own
scripts or entry points, each with its log in the run's folder.

The scenarios (``tests/fault/scenarios.py``) kill, freeze and restart these processes; nothing
here knows about a scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.fault.toxiproxy import Toxiproxy
from tests.services import ROOT, LocalKafka, ScriptService, free_port, free_port_pair

API_KEY = "fault-suite-key-0123456789abcdef"
HUBSPOT_TOKEN = "pat-na1-fault-suite"  # noqa: S105 # the fake's own token, not a secret
ALERT_RULE = "urgent-fault"
SINKS = ("warehouse", "crm", "alerts")


def _clean_environment() -> dict[str, str]:
    """This process's environment without any service setting a developer may have exported."""
    prefixes = (
        "KAFKA_",
        "CONSUMER_",
        "WAREHOUSE_",
        "DEDUPE_",
        "GATEWAY_",
        "HUBSPOT_",
        "CRM_",
        "ALERT",
    )
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


class ServiceProcess:
    """One gateway or consumer: ``python -m gateway`` / ``python -m consumers <sink>``."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], port: int, log: Path):
        self.name = name
        self.argv = argv
        self.env = {**_clean_environment(), **env}
        self.port = port
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # our own entry points
                [sys.executable, *self.argv],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None, "start() first"  # programming error
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.running():
            os.kill(self.pid, sig)

    async def wait_exit(self, seconds: float) -> int | None:
        deadline = time.monotonic() + seconds
        while self.running() and time.monotonic() < deadline:  # noqa: ASYNC110 # a process: no event to await
            await asyncio.sleep(0.1)
        return None if self.process is None else self.process.poll()

    async def stop(self, seconds: float = 30) -> None:
        """SIGTERM (the graceful path), SIGKILL if it has not ended in ``seconds``."""
        self.signal(signal.SIGTERM)
        if await self.wait_exit(seconds) is None:
            self.signal(signal.SIGKILL)
            await self.wait_exit(5)

    async def metrics(self) -> dict[str, float]:
        """``name{label=value,…}`` → value from a real scrape; empty when it does not answer."""
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
                http.get(f"http://127.0.0.1:{self.port}/metrics") as response,
            ):
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return {}
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}"] = sample.value
        return values

    async def status(self, path: str) -> int | None:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
                http.get(f"http://127.0.0.1:{self.port}{path}") as response,
            ):
                return response.status
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def wait_ready(self, seconds: float = 60, path: str = "/readyz") -> None:
        deadline = time.monotonic() + seconds
        while await self.status(path) != 200:
            if not self.running():
                raise RuntimeError(f"{self.name} exited during start-up; log: {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {seconds} s; log: {self.log_path}")
            await asyncio.sleep(0.2)


def metric_sum(values: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in values.items():
        metric, _, rest = key.partition("{")
        if metric != name:
            continue
        have = dict(p.split("=", 1) for p in rest.rstrip("}").split(",") if "=" in p)
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


@dataclass
class Cluster:
    """The processes of one run, in ``folder``."""

    folder: Path
    sinks: tuple[str, ...] = SINKS
    # With ``proxied``, the gateways reach the broker, and the consumers reach PostgreSQL and
    # Redis, through toxiproxy (proxies "kafka", "postgres", "redis") so the wire can be hurt.
    proxied: bool = False
    # Each gateway spools to a folder of its own (a StatefulSet pod's volume), as `make run`
    # does; False: Kafka-only mode (GATEWAY_SPOOL_DIR unset).
    spool: bool = True
    toxiproxy: Toxiproxy | None = None
    kafka: LocalKafka = field(init=False)
    postgres: ScriptService = field(init=False)
    redis: ScriptService = field(init=False)
    alertmanager: ScriptService = field(init=False)
    hubspot: ServiceProcess | None = None
    hubspot_control: str = ""
    gateways: list[ServiceProcess] = field(default_factory=list)
    consumers: dict[str, list[ServiceProcess]] = field(default_factory=dict)
    topic: str = "sms-events"
    _member_seq: int = 0
    _gateway_seq: int = 0

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.kafka = LocalKafka(self.folder / "kafka", free_port_pair())
        self.proxy_ports: dict[str, int] = {}
        if self.proxied:
            self.toxiproxy = Toxiproxy(free_port(), self.folder / "toxiproxy")
            self.proxy_ports = {"kafka": free_port(), "postgres": free_port(), "redis": free_port()}
            self.kafka_proxied_port = free_port()
            # The broker's second listener advertises the proxy's port: a client that came in
            # through the proxy is told to stay on it (Kafka clients follow the metadata).
            self.kafka.env = {
                "KAFKA_PROXIED_PORT": str(self.kafka_proxied_port),
                "KAFKA_PROXIED_ADVERTISED_PORT": str(self.proxy_ports["kafka"]),
            }
        self.postgres = ScriptService("postgres.sh", self.folder / "postgres", free_port())
        self.redis = ScriptService("redis.sh", self.folder / "redis", free_port())
        self.alertmanager = ScriptService(
            "alertmanager.sh", self.folder / "alertmanager", free_port()
        )
        self.rules_file = self.folder / "alert-rules.toml"

    # -- start and stop ---------------------------------------------------------------------

    async def start(self, gateways: int = 1, members: int = 1) -> None:
        await asyncio.gather(
            asyncio.to_thread(self.kafka.start),
            asyncio.to_thread(self._start_stores),
        )
        await self._make_topics()
        if self.toxiproxy is not None:
            await self._start_proxies(self.toxiproxy)
        if "crm" in self.sinks:
            await self._start_hubspot()
        self.rules_file.write_text(
            f"""[[rule]]
name = "{ALERT_RULE}"
kind = "keyword"
words = ["URGENT"]
targets = ["alertmanager"]
severity = "warning"
"""
        )
        for _ in range(gateways):
            await self.add_gateway()
        await asyncio.gather(
            *(self.add_consumer(sink) for sink in self.sinks for _ in range(members))
        )

    async def _start_proxies(self, toxiproxy: Toxiproxy) -> None:
        await toxiproxy.start()
        upstreams = {
            "kafka": f"127.0.0.1:{self.kafka_proxied_port}",
            "postgres": f"127.0.0.1:{self.postgres.port}",
            "redis": f"127.0.0.1:{self.redis.port}",
        }
        for name, upstream in upstreams.items():
            await toxiproxy.create_proxy(name, self.proxy_ports[name], upstream)

    def _via_proxy(self, url: str, name: str, port: int) -> str:
        """``url`` with its port replaced by the proxy's, when the cluster is proxied."""
        if not self.proxied:
            return url
        return url.replace(f":{port}/", f":{self.proxy_ports[name]}/")

    def _start_stores(self) -> None:
        if "warehouse" in self.sinks:
            self.postgres.start()
        if {"crm", "alerts"} & set(self.sinks):
            self.redis.start()
        if "alerts" in self.sinks:
            self.alertmanager.start()

    async def _make_topics(self) -> None:
        done = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "onoff_events.topics",
            *self.sinks,
            cwd=ROOT,
            env={**_clean_environment(), "KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await done.communicate()
        if done.returncode != 0:
            raise RuntimeError(f"topics: {err.decode()[-2000:]}")

    async def _start_hubspot(self) -> None:
        port, control = free_port(), free_port()
        self.hubspot = ServiceProcess(
            "hubspot",
            ["-m", "tests.fault.hubspot_server", str(port), str(control)],
            {},
            control,
            self.folder / "hubspot.log",
        )
        self.hubspot.start()
        self.hubspot_url = f"http://127.0.0.1:{port}"
        self.hubspot_control = f"http://127.0.0.1:{control}"
        await self.hubspot.wait_ready(30, "/__fault/ready")

    async def stop(self) -> None:
        everything = [*self.gateways, *(m for ms in self.consumers.values() for m in ms)]
        if self.hubspot is not None:
            everything.append(self.hubspot)
        for service in everything:  # a frozen process cannot take SIGTERM
            service.signal(signal.SIGCONT)
        await asyncio.gather(*(s.stop(20) for s in everything))
        self.resume_broker()
        if self.toxiproxy is not None:
            with contextlib.suppress(Exception):
                await self.toxiproxy.stop()
        for stop in (self.kafka.stop, self.postgres.stop, self.redis.stop, self.alertmanager.stop):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                await asyncio.to_thread(stop)

    # -- services ---------------------------------------------------------------------------

    def gateway_env(self, port: int) -> dict[str, str]:
        spool = {"GATEWAY_SPOOL_DIR": str(self.folder / f"spool-{port}")} if self.spool else {}
        return {
            **spool,
            "GATEWAY_API_KEYS": f"onoff:{API_KEY}",
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(port),
            "KAFKA_BOOTSTRAP_SERVERS": (
                f"127.0.0.1:{self.proxy_ports['kafka']}" if self.proxied else self.kafka.bootstrap
            ),
            "GATEWAY_DRAIN_SECONDS": "2",
            "LOG_LEVEL": "WARNING",
        }

    async def add_gateway(self) -> ServiceProcess:
        port = free_port()
        self._gateway_seq += 1  # names stay unique after a rolling update removes some
        name = f"gateway-{self._gateway_seq}"
        gateway = ServiceProcess(
            name, ["-m", "gateway"], self.gateway_env(port), port, self.folder / f"{name}.log"
        )
        gateway.start()
        await gateway.wait_ready(60)
        self.gateways.append(gateway)
        return gateway

    def webhook_url(self, gateway: ServiceProcess) -> str:
        return f"http://127.0.0.1:{gateway.port}/v1/onoff/sms"

    def consumer_env(self, sink: str, port: int) -> dict[str, str]:
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap,
            "CONSUMER_HOST": "127.0.0.1",
            "CONSUMER_PORT": str(port),
            "RETRY_INITIAL_SECONDS": "0.2",
            "RETRY_MAX_SECONDS": "2",
            "CONSUMER_WATCHDOG_INTERVAL_SECONDS": "1",
            "LOG_LEVEL": "WARNING",
        }
        if sink == "warehouse":
            env["WAREHOUSE_URL"] = self._via_proxy(
                self.postgres.url, "postgres", self.postgres.port
            )
        else:
            env["DEDUPE_URL"] = self._via_proxy(self.redis.url, "redis", self.redis.port)
        if sink == "crm":
            env.update(
                HUBSPOT_TOKEN=HUBSPOT_TOKEN,
                HUBSPOT_BASE_URL=self.hubspot_url,
                CRM_REQUESTS_PER_10S="190",
                CRM_SEARCHES_PER_SECOND="5",
            )
        if sink == "alerts":
            env.update(
                ALERT_RULES_FILE=str(self.rules_file),
                ALERTMANAGER_URL=self.alertmanager_url,
                ALERT_SENDER_KEY="fault-suite-sender-key-0123456789",
            )
        return env

    @property
    def alertmanager_url(self) -> str:
        return self.alertmanager.url

    async def add_consumer(self, sink: str) -> ServiceProcess:
        port = free_port()
        self._member_seq += 1
        name = f"{sink}-{self._member_seq}"
        member = ServiceProcess(
            name,
            ["-m", "consumers", sink],
            self.consumer_env(sink, port),
            port,
            self.folder / f"{name}.log",
        )
        member.start()
        await member.wait_ready(120, "/healthz")  # a loaded 2-core machine starts slowly
        self.consumers.setdefault(sink, []).append(member)
        return member

    # -- the broker -------------------------------------------------------------------------

    @property
    def broker_pid(self) -> int | None:
        try:
            return int((self.kafka.folder / "kafka.pid").read_text())
        except (OSError, ValueError):
            return None

    def kill_broker(self) -> None:
        """SIGKILL: no flush, no controlled shutdown."""
        pid = self.broker_pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

    def freeze_broker(self) -> None:
        pid = self.broker_pid
        if pid is not None:
            os.kill(pid, signal.SIGSTOP)

    def resume_broker(self) -> None:
        pid = self.broker_pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    async def start_broker(self) -> None:
        await asyncio.to_thread(self.kafka.start)

    # -- stores -----------------------------------------------------------------------------

    def postgres_pid(self) -> int:
        return int((self.postgres.folder / "data" / "postmaster.pid").read_text().split()[0])

    async def restart_postgres_immediate(self) -> None:
        """What ``pg_ctl -m immediate`` does (SIGQUIT to the postmaster: no checkpoint, crash
        recovery at the next start), then a start by our script."""
        pid = self.postgres_pid()
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:  # noqa: ASYNC110 # another process
            await asyncio.sleep(0.1)
        await asyncio.to_thread(self.postgres.start)

    def redis_pid(self) -> int:
        return int((self.redis.folder / "redis.pid").read_text())

    async def restart_redis(self, *, forget: bool) -> None:
        """SIGKILL Redis and start it again: with its append-only file (it remembers what was
        fsynced, up to a second lost) or, with ``forget``, without it (a cache with no disk)."""
        pid = self.redis_pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:  # noqa: ASYNC110 # another process
            await asyncio.sleep(0.05)
        if forget:
            for path in self.redis.folder.iterdir():
                if path.name.startswith(("appendonly", "dump")):
                    if path.is_dir():
                        for part in path.iterdir():
                            part.unlink()
                        path.rmdir()
                    else:
                        path.unlink()
        (self.redis.folder / "redis.pid").unlink(missing_ok=True)
        await asyncio.to_thread(self.redis.start)

    # -- the HubSpot fake's controls --------------------------------------------------------

    async def hubspot_call(self, path: str, body: object | None = None) -> object:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
            http.post(self.hubspot_control + path, json=body) as response,
        ):
            response.raise_for_status()
            return await response.json()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return not stat.rsplit(")", 1)[1].strip().startswith("Z")
