"""The fault scenarios: each starts a fresh cluster, puts Onoff-like load on it, injects one
fault at a set time, waits for the consumers to catch up, and hands everything to the checker.

A scenario is a name, a load and an ``inject`` coroutine that runs alongside the load: it
sleeps until its moment, does the damage, marks the fault window, and repairs (or not).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from tests.fault.checker import check, install_attempt_counters
from tests.fault.cluster import API_KEY, Cluster, metric_sum
from tests.fault.sender import OnoffSender, SenderConfig
from tests.fault.toxiproxy import Toxiproxy


@dataclass
class Run:
    """One scenario in progress: its cluster, its sender and what was observed."""

    cluster: Cluster
    sender: OnoffSender
    fault_windows: list[list[Any]] = field(default_factory=list)
    lag: dict[str, list[list[float]]] = field(default_factory=dict)
    spool: list[list[float]] = field(default_factory=list)  # [t, records in the spools]
    notes: list[str] = field(default_factory=list)
    lag_errors: Counter[str] = field(default_factory=Counter)
    extra_figures: dict[str, Any] = field(default_factory=dict)
    extra_properties: list[dict[str, Any]] = field(default_factory=list)
    _open_fault: tuple[float, str] | None = None

    def now(self) -> float:
        return self.sender.now()

    async def until(self, at: float) -> None:
        """Sleep until ``at`` seconds after the load started."""
        delay = at - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    def fault_starts(self, label: str) -> None:
        self._open_fault = (self.now(), label)

    def fault_ends(self) -> None:
        if self._open_fault is not None:
            start, label = self._open_fault
            self.fault_windows.append([round(start, 2), round(self.now(), 2), label])
            self._open_fault = None


Inject = Callable[[Run], Awaitable[None]]


async def nothing(_: Run) -> None:
    return None


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    inject: Inject
    rate: float = 250  # events/s: with every process on 2 cores, 400 left no CPU for recovery
    seconds: float = 45
    sinks: tuple[str, ...] = ("warehouse", "alerts")
    gateways: int = 1
    members: int = 1
    drain_seconds: float = 120  # how long the consumers may take to catch up afterwards
    proxied: bool = False  # the wire between services goes through toxiproxy
    quick: bool = False  # part of the subset `make test` runs
    spool: bool = True  # the gateways spool (GATEWAY_SPOOL_DIR), as `make run` runs them
    # A property: no SMS given up by the sender (every one got a 200 in Onoff's retries).
    all_accepted: bool = False


# -- the faults ------------------------------------------------------------------------------


def broker_killed(at: float, down: float) -> Inject:
    async def inject(run: Run) -> None:
        await run.until(at)
        run.fault_starts(f"broker down (SIGKILL, {down:g} s)")
        run.cluster.kill_broker()
        await run.until(at + down)
        await run.cluster.start_broker()
        run.fault_ends()

    return inject


def broker_frozen(at: float, frozen: float) -> Inject:
    async def inject(run: Run) -> None:
        await run.until(at)
        run.fault_starts(f"broker frozen (SIGSTOP, {frozen:g} s)")
        run.cluster.freeze_broker()
        await run.until(at + frozen)
        run.cluster.resume_broker()
        run.fault_ends()

    return inject


def consumers_killed(kills: int, every: float, first: float) -> Inject:
    """SIGKILL a random member of a random sink at random points, start a fresh one in its
    place, and add one more member to each group mid-run (a scale-up during batches)."""

    async def inject(run: Run) -> None:
        chooser = random.Random(7)  # noqa: S311 # fault timing, not security
        cluster = run.cluster
        if cluster.toxiproxy is not None:
            # Stores 50 ms away (another zone): a batch spends most of its time being
            # delivered, so the kills land mid-batch, where a wrong commit order would lose it.
            for proxy in ("postgres", "redis"):
                await cluster.toxiproxy.latency(proxy, 50, 10, stream="downstream")
        for k in range(kills):
            await run.until(first + k * every + chooser.uniform(0, every / 2))
            sink = chooser.choice(cluster.sinks)
            victim = chooser.choice(cluster.consumers[sink])
            run.fault_starts(f"{victim.name} SIGKILLed")
            victim.signal(signal.SIGKILL)
            await victim.wait_exit(5)
            cluster.consumers[sink].remove(victim)
            await cluster.add_consumer(sink)
            run.fault_ends()
            run.notes.append(f"{victim.name} SIGKILLed at {run.now():.1f} s")
        run.fault_starts("one member added per group")
        await asyncio.gather(*(cluster.add_consumer(sink) for sink in cluster.sinks))
        run.fault_ends()

    return inject


def gateway_rolled(at: float) -> Inject:
    """A rolling update: a new gateway starts, the old one leaves the load balancer and gets
    SIGTERM (it drains, finishes what it holds, flushes and exits); then the same for the
    other one. Every answer a client waited for must come; none may be cut off."""

    async def inject(run: Run) -> None:
        cluster = run.cluster
        await run.until(at)
        run.fault_starts("rolling update of 2 gateways")
        for old in list(cluster.gateways):
            new = await cluster.add_gateway()
            serving = [g for g in cluster.gateways if g is not old]
            run.sender.route_to([cluster.webhook_url(g) for g in serving])
            old.signal(signal.SIGTERM)
            code = await old.wait_exit(30)
            cluster.gateways.remove(old)
            run.notes.append(f"{old.name} exited with {code} after SIGTERM; {new.name} took over")
            run.extra_figures.setdefault("gateway_exit_codes", []).append(code)
            await asyncio.sleep(3)
        run.fault_ends()

    return inject


def postgres_restarted(at: float) -> Inject:
    async def inject(run: Run) -> None:
        await run.until(at)
        run.fault_starts("PostgreSQL immediate restart")
        await run.cluster.restart_postgres_immediate()
        run.fault_ends()

    return inject


def redis_restarted(at: float, *, forget: bool) -> Inject:
    async def inject(run: Run) -> None:
        await run.until(at)
        run.fault_starts("Redis restarted" + (" empty" if forget else " from its AOF"))
        await run.cluster.restart_redis(forget=forget)
        run.fault_ends()

    return inject


def hubspot_storm(at: float, seconds: float) -> Inject:
    async def inject(run: Run) -> None:
        await run.until(at)
        run.fault_starts(f"HubSpot 503 for {seconds:g} s")
        await run.cluster.hubspot_call("/__fault/storm", {"status": 503, "seconds": seconds})
        await run.until(at + seconds)
        run.fault_ends()
        run.fault_starts(f"HubSpot 429 for {seconds:g} s")
        await run.cluster.hubspot_call(
            "/__fault/storm", {"status": 429, "seconds": seconds, "retry_after": 1}
        )
        await run.until(at + 2 * seconds)
        run.fault_ends()

    return inject


def alertmanager_frozen(at: float, seconds: float) -> Inject:
    async def inject(run: Run) -> None:
        await run.until(at)
        pid = int((run.cluster.alertmanager.folder / "alertmanager.pid").read_text())
        run.fault_starts(f"Alertmanager frozen (SIGSTOP, {seconds:g} s)")
        os.kill(pid, signal.SIGSTOP)
        try:
            await run.until(at + seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
        run.fault_ends()

    return inject


def wire_faults(proxies: tuple[str, ...], at: float, phase: float) -> Inject:
    """On each of ``proxies`` at once, one phase after the other: 300 ± 100 ms of latency each
    way, connections reset (TCP RST on every connection, new ones too), a black hole (bytes
    dropped, connections left hanging); then a clean wire."""

    async def inject(run: Run) -> None:
        toxiproxy = run.cluster.toxiproxy
        assert toxiproxy is not None, "a proxied scenario"  # programming error
        phases: list[tuple[str, Callable[[str], Awaitable[object]]]] = [
            ("latency 300±100 ms", lambda p: _both_ways_latency(toxiproxy, p)),
            ("connections reset", toxiproxy.reset_peer),
            ("black hole", toxiproxy.black_hole),
        ]
        where = "+".join(proxies)
        for k, (label, hurt) in enumerate(phases):
            await run.until(at + k * 2 * phase)
            run.fault_starts(f"{where}: {label}")
            for proxy in proxies:
                await hurt(proxy)
            await run.until(at + k * 2 * phase + phase)
            for proxy in proxies:
                await toxiproxy.clear(proxy)
            run.fault_ends()

    return inject


async def _both_ways_latency(toxiproxy: Toxiproxy, proxy: str) -> None:
    await toxiproxy.latency(proxy, 300, 100, stream="downstream")
    await toxiproxy.latency(proxy, 300, 100, stream="upstream")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _idle_connection(port: int, opened: list[asyncio.StreamWriter]) -> None:
    """One keep-alive connection that asks once and then says nothing."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
    opened.append(writer)


async def _slowloris(port: int, until: float, counts: Counter[str]) -> None:
    """Headers, then one body byte a second, again and again: the gateway must cut each one
    off at its body-read timeout and stay fast for everybody else."""
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["connect_failed"] += 1
            await asyncio.sleep(0.5)
            continue
        counts["started"] += 1
        try:
            writer.write(
                b"POST /v1/onoff/sms HTTP/1.1\r\nHost: gw\r\n"
                + f"Authorization: x-api-key {API_KEY}\r\n".encode()
                + b"Content-Type: application/json\r\nContent-Length: 4096\r\n\r\n{"
            )
            while loop.time() < until:
                await writer.drain()
                try:
                    answer = await asyncio.wait_for(reader.read(256), 1.0)
                except TimeoutError:
                    writer.write(b" ")
                    continue
                counts[answer.split(b" ", 2)[1].decode() if answer else "closed"] += 1
                break
        except (OSError, IndexError):
            counts["reset"] += 1
        finally:
            writer.close()


def slow_clients(at: float, seconds: float, idle: int = 500, trickling: int = 50) -> Inject:
    """500 idle keep-alive connections and 50 slowloris senders while Onoff's traffic goes on:
    the gateway's memory stays bounded and Onoff's answers stay fast."""

    async def inject(run: Run) -> None:
        gateway = run.cluster.gateways[0]
        rss_before = _rss_mb(gateway.pid)
        await run.until(at)
        run.fault_starts(f"{idle} idle connections + {trickling} slowloris")
        loop = asyncio.get_running_loop()
        opened: list[asyncio.StreamWriter] = []
        counts: Counter[str] = Counter()
        idle_results = await asyncio.gather(
            *(_idle_connection(gateway.port, opened) for _ in range(idle)),
            return_exceptions=True,
        )
        trickle = [
            asyncio.create_task(_slowloris(gateway.port, loop.time() + seconds, counts))
            for _ in range(trickling)
        ]
        rss_peak = rss_before
        while run.now() < at + seconds:
            rss_peak = max(rss_peak, _rss_mb(gateway.pid))
            await asyncio.sleep(1)
        await asyncio.gather(*trickle)
        for writer in opened:
            writer.close()
        run.fault_ends()
        failed_idle = sum(1 for r in idle_results if isinstance(r, BaseException))
        calm = run.sender.result.p99_ms(2.0, at)
        during = run.sender.result.p99_ms(at, at + seconds)
        run.extra_figures["slow_clients"] = {
            "idle_opened": len(opened),
            "idle_failed": failed_idle,
            "slowloris": dict(counts),
            "gateway_rss_mb_before": round(rss_before, 1),
            "gateway_rss_mb_peak": round(rss_peak, 1),
            "p99_ms_calm": round(calm, 1),
            "p99_ms_during": round(during, 1),
        }
        run.extra_properties += [
            {
                "name": "slow clients: memory bounded",
                "ok": rss_peak <= rss_before + 64,
                "detail": f"gateway RSS {rss_before:.0f} MB before, {rss_peak:.0f} MB at peak "
                f"(bound: +64 MB) with {len(opened)} idle connections and {trickling} slowloris",
            },
            {
                "name": "slow clients: cut off at the body timeout",
                "ok": counts["408"] > 0,
                "detail": f"slowloris answers: {dict(counts)}",
            },
            {
                "name": "slow clients: Onoff's p99 within 2x calm",
                "ok": during <= 2 * max(calm, 50.0),
                "detail": f"p99 {during:.0f} ms during, {calm:.0f} ms calm "
                "(calm floored at 50 ms: below it, scheduling noise on 2 cores dominates)",
            },
        ]

    return inject


SCENARIOS: list[Scenario] = [
    Scenario("calm", "No fault (the baseline)", nothing, seconds=30),
    Scenario(
        "broker-kill-15s",
        "Broker SIGKILLed, down 15 s",
        broker_killed(10, 15),
        seconds=45,
        quick=True,
        all_accepted=True,
    ),
    Scenario(
        "broker-kill-60s-no-spool",
        "Broker SIGKILLed, down 60 s, Kafka-only mode (GATEWAY_SPOOL_DIR unset)",
        broker_killed(10, 60),
        seconds=85,
        spool=False,
    ),
    Scenario(
        "broker-kill-120s",
        "Broker SIGKILLed, down 120 s",
        broker_killed(10, 120),
        seconds=150,
        drain_seconds=180,
        all_accepted=True,
    ),
    Scenario(
        "broker-kill-65s-400",
        "Broker SIGKILLed, down 65 s, at 400 SMS/s for 75 s (the durability issue's run)",
        broker_killed(5, 65),
        rate=400,
        seconds=75,
        sinks=("warehouse",),
        drain_seconds=180,
        all_accepted=True,
    ),
    Scenario(
        "broker-freeze-20s",
        "Broker frozen (SIGSTOP) 20 s",
        broker_frozen(10, 20),
        all_accepted=True,
    ),
    Scenario(
        "consumer-kill",
        "Consumers: 3 members a group, stores 50 ms away, SIGKILLed at random points, one added",
        consumers_killed(kills=3, every=10, first=5),
        members=3,
        proxied=True,
        seconds=45,
        quick=True,
    ),
    Scenario(
        "wire-gateway-broker",
        "Wire between gateway and broker: latency, then resets, then a black hole (10 s each)",
        wire_faults(("kafka",), 5, 10),
        seconds=60,
        proxied=True,
    ),
    Scenario(
        "wire-consumers-stores",
        "Wire between consumers and PostgreSQL/Redis: latency, resets, a black hole (10 s each)",
        wire_faults(("postgres", "redis"), 5, 10),
        seconds=60,
        proxied=True,
    ),
    Scenario(
        "gateway-rolling",
        "Gateway SIGTERMed under load, a second one behind the same traffic",
        gateway_rolled(10),
        gateways=2,
    ),
    Scenario(
        "slow-clients",
        "500 idle keep-alive connections and 50 slowloris senders during Onoff's traffic",
        slow_clients(10, 30),
        sinks=("warehouse",),
    ),
    Scenario(
        "postgres-restart",
        "PostgreSQL restarted (immediate: no checkpoint, crash recovery)",
        postgres_restarted(15),
        sinks=("warehouse",),
    ),
    Scenario(
        "redis-restart-aof",
        "Redis (dedupe store) SIGKILLed and restarted from its append-only file",
        redis_restarted(15, forget=False),
        sinks=("alerts", "crm"),
        rate=4,
        seconds=60,
    ),
    Scenario(
        "redis-restart-empty",
        "Redis (dedupe store) SIGKILLed and restarted empty (no persistence)",
        redis_restarted(15, forget=True),
        sinks=("alerts", "crm"),
        rate=4,
        seconds=60,
    ),
    Scenario(
        "hubspot-storms",
        "HubSpot answering 503, then 429, for a minute each",
        hubspot_storm(10, 60),
        sinks=("crm",),
        rate=3,
        seconds=140,
        drain_seconds=240,
    ),
    Scenario(
        "alertmanager-frozen",
        "Alertmanager frozen (SIGSTOP) 60 s",
        alertmanager_frozen(10, 60),
        sinks=("alerts",),
        seconds=80,
    ),
]


# -- running one --------------------------------------------------------------------------------


async def _lag_sampler(run: Run, stop: asyncio.Event) -> None:
    """Every second: each sink group's lag (end offsets minus committed), read from Kafka,
    and the records in the gateways' spools."""
    cluster = run.cluster
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.kafka.bootstrap, request_timeout_ms=3000)
    probe = AIOKafkaConsumer(bootstrap_servers=cluster.kafka.bootstrap, request_timeout_ms=3000)
    started = False
    try:
        while not stop.is_set():
            try:
                if not started:
                    await asyncio.wait_for(asyncio.gather(admin.start(), probe.start()), 5)
                    started = True
                lags = await asyncio.wait_for(group_lags(admin, probe, cluster), 3)
                for sink, value in lags.items():
                    run.lag.setdefault(sink, []).append([round(run.now(), 2), value])
            except Exception as error:  # noqa: BLE001 # the broker may be down: no sample now
                run.lag_errors[type(error).__name__] += 1
            if cluster.spool:
                with contextlib.suppress(Exception):  # a gateway stopping: no sample now
                    run.spool.append([round(run.now(), 2), await _spooled_left(cluster)])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        await asyncio.gather(admin.close(), probe.stop(), return_exceptions=True)


async def group_lags(
    admin: AIOKafkaAdminClient, probe: AIOKafkaConsumer, cluster: Cluster
) -> dict[str, int]:
    partitions = probe.partitions_for_topic(cluster.topic) or set()
    if not partitions:
        await probe._client.force_metadata_update()  # no public refresh
        partitions = probe.partitions_for_topic(cluster.topic) or set()
    tps = [TopicPartition(cluster.topic, p) for p in sorted(partitions)]
    ends = await probe.end_offsets(tps)
    lags: dict[str, int] = {}
    for sink in cluster.sinks:
        committed = await admin.list_consumer_group_offsets(f"onoff-{sink}", partitions=tps)
        lags[sink] = sum(
            ends[tp]
            - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0)
            for tp in tps
        )
    return lags


def _recovery(run: Run, per_second: dict[int, dict[str, int]]) -> float | None:
    """Seconds from the end of the last fault window to the first second in which every
    answer was a 200 (and at least one came) and every sink's lag was within 2 s of load."""
    if not run.fault_windows:
        return None
    end = max(float(w[1]) for w in run.fault_windows)
    rate = run.sender.config.rate
    last = int(run.sender.result.duration)
    for second in range(int(end), last + 1):
        answers = per_second.get(second, {})
        if second < run.sender.config.seconds and (not answers or set(answers) != {"200"}):
            continue
        lag_ok = all(
            any(t >= second and v <= 2 * rate for t, v in samples) for samples in run.lag.values()
        )
        if lag_ok:
            return round(max(0.0, second - end), 1)
    return None


async def _spooled_left(cluster: Cluster) -> float:
    """Records still in the running gateways' spools (a stopped one's stay on its disk)."""
    left = 0.0
    for gateway in cluster.gateways:
        if gateway.running():
            left += metric_sum(await gateway.metrics(), "onoff_gateway_spool_records")
    return left


async def _spool_figures(cluster: Cluster) -> dict[str, float]:
    totals = {"spooled": 0.0, "replayed": 0.0, "left": 0.0, "failures": 0.0}
    for gateway in cluster.gateways:
        if gateway.running():
            values = await gateway.metrics()
            totals["spooled"] += metric_sum(values, "onoff_gateway_spooled_records_total")
            totals["replayed"] += metric_sum(values, "onoff_gateway_replayed_records_total")
            totals["left"] += metric_sum(values, "onoff_gateway_spool_records")
            totals["failures"] += metric_sum(values, "onoff_gateway_spool_failures_total")
    return totals


async def _wait_drained(run: Run, seconds: float) -> bool:
    """True once the gateways' spools are empty and every sink group has committed up to
    the end of the topic."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not await _spooled_left(run.cluster):
            break
        await asyncio.sleep(1)
    while time.monotonic() < deadline:
        samples = [s[-1][1] for s in run.lag.values() if s]
        if len(samples) == len(run.cluster.sinks) and all(v == 0 for v in samples):
            latest = min(s[-1][0] for s in run.lag.values())
            if latest >= run.now() - 2:
                return True
        await asyncio.sleep(1)
    return False


async def run_scenario(
    scenario: Scenario, folder: Path, *, scale: float = 1.0, keep_logs: Path | None = None
) -> dict[str, Any]:
    """Run one scenario in a fresh cluster under ``folder``; returns its result as JSON."""
    cluster = Cluster(
        folder / scenario.name,
        sinks=scenario.sinks,
        proxied=scenario.proxied,
        spool=scenario.spool,
    )
    result: dict[str, Any] = {
        "name": scenario.name,
        "title": scenario.title,
        "rate": scenario.rate,
        "seconds": scenario.seconds,
        "ok": False,
        "error": None,
        "properties": [],
        "figures": {},
        "timeline": {},
    }
    started = time.monotonic()
    try:
        await cluster.start(gateways=scenario.gateways, members=scenario.members)
        if "warehouse" in scenario.sinks:
            await install_attempt_counters(cluster.postgres.url)
        sender = OnoffSender(
            SenderConfig(
                urls=[cluster.webhook_url(g) for g in cluster.gateways],
                api_key=API_KEY,
                rate=scenario.rate,
                seconds=scenario.seconds * scale,
            )
        )
        run = Run(cluster, sender)
        stop_sampling = asyncio.Event()
        sender_task = asyncio.create_task(sender.run())
        await asyncio.sleep(0)  # the sender's clock starts
        sampler = asyncio.create_task(_lag_sampler(run, stop_sampling))
        try:
            await scenario.inject(run)
            sent = await sender_task
            drained = await _wait_drained(run, scenario.drain_seconds)
            if not drained:
                run.notes.append(f"consumers not caught up {scenario.drain_seconds:g} s after load")
        finally:
            stop_sampling.set()
            await sampler
            if not sender_task.done():
                sender_task.cancel()
        verdict = await check(cluster, sent)
        figures = verdict.figures
        figures["consumer_counters"] = await _consumer_counters(cluster)
        if scenario.spool:
            figures["spool"] = await _spool_figures(cluster)
        per_second = {s: dict(c) for s, c in sent.per_second.items()}
        fault_start = min((float(w[0]) for w in run.fault_windows), default=None)
        fault_end = max((float(w[1]) for w in run.fault_windows), default=None)
        figures["p99_ms_calm"] = round(sent.p99_ms(2.0, fault_start or float("inf")), 1)
        figures["p99_ms_fault"] = (
            round(sent.p99_ms(fault_start, fault_end + 10), 1)
            if fault_start is not None and fault_end is not None
            else None
        )
        figures["recover_seconds"] = _recovery(run, per_second)
        figures["drained"] = drained
        figures.update(run.extra_figures)
        properties = [p.__dict__ for p in verdict.properties] + run.extra_properties
        properties.append(
            {
                "name": "consumers caught up",
                "ok": drained,
                "detail": f"every sink's group committed to the end of the topic within "
                f"{scenario.drain_seconds:g} s of the load's end",
            }
        )
        if scenario.all_accepted:
            properties.append(
                {
                    "name": "every SMS accepted",
                    "ok": not sent.gave_up,
                    "detail": f"{len(sent.gave_up)} of {len(sent.sent_ids)} SMS given up by the "
                    f"sender after Onoff's 5 tries; 200s by durability {dict(sent.durability)}",
                }
            )
        if scenario.gateways > 1:
            cut = sent.disconnects_mid_request
            codes = run.extra_figures.get("gateway_exit_codes", [])
            properties += [
                {
                    "name": "no answer cut off",
                    "ok": cut == 0,
                    "detail": f"{cut} requests lost their connection (closed or reset) before "
                    "an answer",
                },
                {
                    "name": "gateways exit 0 after SIGTERM",
                    "ok": bool(codes) and all(code == 0 for code in codes),
                    "detail": f"exit codes {codes}",
                },
            ]
        last = max(per_second, default=0)
        statuses = sorted({k for c in per_second.values() for k in c})
        result.update(
            ok=all(p["ok"] for p in properties),
            properties=properties,
            figures=figures,
            notes=run.notes,
            timeline={
                "seconds": list(range(last + 1)),
                "answers": {
                    s: [per_second.get(i, {}).get(s, 0) for i in range(last + 1)] for s in statuses
                },
                "durability": {
                    where: [
                        sent.durability_per_second.get(i, Counter())[where] for i in range(last + 1)
                    ]
                    for where in sorted(sent.durability)
                },
                "in_flight": [[round(t, 2), n] for t, n in sent.in_flight],
                "lag": run.lag,
                "spool": run.spool,
                "fault_windows": run.fault_windows,
            },
        )
    except Exception as error:  # noqa: BLE001 # one broken scenario must not hide the others
        result["error"] = f"{type(error).__name__}: {error}"
    finally:
        await cluster.stop()
        result["wall_seconds"] = round(time.monotonic() - started, 1)
        if not result["ok"] and keep_logs is not None:
            result["logs"] = str(_keep_logs(cluster.folder, keep_logs / scenario.name))
    return result


async def _consumer_counters(cluster: Cluster) -> dict[str, dict[str, float]]:
    """Each sink's own counters at the end, by series, summed over its members: what the
    sink says it did (e.g. contacts found or missing), next to what the checker found."""
    counters: dict[str, dict[str, float]] = {}
    for sink, members in cluster.consumers.items():
        totals: dict[str, float] = {}
        for member in members:
            for key, value in (await member.metrics()).items():
                name = key.partition("{")[0]
                if name.endswith("_total") and name.startswith("onoff_"):
                    totals[key] = totals.get(key, 0.0) + value
        counters[sink] = {k: v for k, v in sorted(totals.items()) if v}
    return counters


def _keep_logs(folder: Path, into: Path) -> Path:
    """Copy every log of a failed scenario's cluster (services, broker, stores) out of its
    scratch folder, which is deleted after the run."""
    into.mkdir(parents=True, exist_ok=True)
    for log in folder.rglob("*.log"):
        relative = log.relative_to(folder)
        if "data" in relative.parts:
            continue  # Kafka's segments (*.log) hold the events themselves, not logs
        target = into / str(relative).replace("/", "__")
        shutil.copyfile(log, target)
    return into
