"""``python -m bench.run [--quick]``: every benchmark scenario, side by side, in one run.

Starts what it needs (a private Kafka broker, PostgreSQL and Redis, the gateway and the
baselines), loads them from separate processes with real HTTP load tools (wrk for saturation,
vegeta for fixed rates: open-loop, so latency is not hidden by a slow server), and writes
``bench/results/latest.json`` and ``latest.md``. ``--quick`` is a one-minute smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import io
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / ".data" / "bench"
PY = sys.executable
KEY = "bench-key-0123456789abcdef"
VEGETA = ROOT / ".cache" / "bin" / "vegeta"
TEMPLATE = (
    '{{"id":"{id}","eventName":"SMS","onoffUserName":"John Doe",'
    '"onoffUserEmail":"john.doe@example.com","onoffUserNumber":"+33612345678",'
    '"externalNumber":"+33698765432","externalName":"John Smith",'
    '"externalEmail":"smith@example.com","date":"2023-05-20T14:30:00Z",'
    '"smsDirection":"SENT","body":"This is the body of the SMS, about as long as a typical '
    'message people send to each other during a working day."}}'
)


@dataclass(frozen=True)
class Profile:
    saturation_seconds: int
    rates: tuple[int, ...]
    rate_seconds: int
    soak_seconds: int
    soak_rate: int
    drain_events: int
    e2e_seconds: int


# 1M events per drain (the figure): start-up is ~2% of a drain; the full run takes ~20 minutes.
FULL = Profile(30, (500, 2000, 5000), 20, 300, 2000, 1_000_000, 60)
QUICK = Profile(2, (1000,), 2, 4, 1000, 5_000, 3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sh(*args: str, **kwargs: Any) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs).stdout


def wait_http(url: str, seconds: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 # our own server
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def process(
    *args: str, env: dict[str, str] | None = None, ready: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    log = (WORK / f"{Path(args[1] if args[0] == PY else args[0]).stem}-{time.time_ns()}.log").open(
        "wb"
    )
    proc = subprocess.Popen(
        args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        if ready:
            wait_http(ready)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# --- load tools ----------------------------------------------------------------------------


def wrk(url: str, seconds: int, connections: int = 64) -> dict[str, Any]:
    out = sh(
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "-s",
        "bench/onoff.lua",
        "-H",
        f"Authorization: x-api-key {KEY}",
        url,
        cwd=ROOT,
    )
    line = next(x for x in out.splitlines() if x.startswith("JSON "))
    r = orjson.loads(line[5:])
    rps = r["requests"] / (r["duration_us"] / 1e6)
    return {
        "requests_per_second": round(rps),
        "p50_ms": r["p50_ms"],
        "p99_ms": r["p99_ms"],
        "p999_ms": r["p999_ms"],
        "errors": r["non_2xx"] + r["socket_errors"],
        "requests": r["requests"],
    }


def vegeta_targets(url: str, count: int) -> Path:
    path = WORK / f"targets-{count}.jsonl"
    prefix = uuid.uuid4().hex[:12]
    with path.open("wb") as f:
        for i in range(count):
            body = TEMPLATE.format(id=f"{prefix}-{i:09d}").encode()
            f.write(
                orjson.dumps(
                    {
                        "method": "POST",
                        "url": url,
                        "header": {
                            "Authorization": [f"x-api-key {KEY}"],
                            "Content-Type": ["application/json"],
                        },
                        "body": base64.b64encode(body).decode(),
                    }
                )
                + b"\n"
            )
    return path


def vegeta(url: str, rate: int, seconds: int) -> dict[str, Any]:
    targets = vegeta_targets(url, rate * seconds + rate)
    results = WORK / "vegeta.bin"
    with targets.open("rb") as stdin, results.open("wb") as stdout:
        subprocess.run(
            [
                str(VEGETA),
                "attack",
                "-format=json",
                "-lazy",
                f"-rate={rate}/s",
                f"-duration={seconds}s",
                "-timeout=11s",
                "-max-workers=2000",
            ],
            stdin=stdin,
            stdout=stdout,
            check=True,
        )
    encoded = sh(str(VEGETA), "encode", "--to=csv", str(results))
    latencies, errors = [], 0
    for row in csv.reader(io.StringIO(encoded)):
        latencies.append(int(row[2]) / 1e6)
        errors += row[1] != "200"
    targets.unlink()
    return {"rate": rate, "requests": len(latencies), "errors": errors, **percentiles(latencies)}


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "p999_ms": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "p999_ms": at(0.999)}


# --- scenarios -----------------------------------------------------------------------------


def http_scenarios(name: str, url: str, profile: Profile) -> list[dict[str, Any]]:
    out = [{"name": f"{name}_saturation", **wrk(url, profile.saturation_seconds)}]
    for rate in profile.rates:
        result = vegeta(url, rate, profile.rate_seconds)
        out.append({"name": f"{name}_fixed_{rate}", "requests_per_second": rate, **result})
    return out


def producer_performance(bootstrap: str, events: int) -> dict[str, Any]:
    topic = f"bench-perf-{uuid.uuid4().hex[:6]}"
    create_topics(bootstrap, {topic: 12})
    out = sh(
        "scripts/kafka.sh",
        "class",
        "org.apache.kafka.tools.ProducerPerformance",
        "--topic",
        topic,
        "--num-records",
        str(events),
        "--record-size",
        str(len(TEMPLATE.format(id="0" * 22))),
        "--throughput",
        "-1",
        "--producer-props",
        f"bootstrap.servers={bootstrap}",
        "acks=all",
        "enable.idempotence=true",
        cwd=ROOT,
    )
    last = [x for x in out.splitlines() if "records sent" in x][-1]
    # "N records sent, X records/sec (Y MB/sec), A ms avg latency, M ms max latency,
    #  P50 ms 50th, P95 ms 95th, P99 ms 99th, P999 ms 99.9th."
    numbers = [
        float(t)
        for t in last.replace(",", " ").replace("(", " ").split()
        if _is_number(t.replace(",", ""))
    ]
    return {
        "name": "kafka_producer_performance",
        "requests_per_second": round(numbers[1]),
        "p50_ms": numbers[5],
        "p99_ms": numbers[7],
        "p999_ms": numbers[8],
        "errors": 0,
        "requests": int(numbers[0]),
    }


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    from onoff_events.kafka import KafkaSettings, ensure_topics

    asyncio.run(ensure_topics(KafkaSettings(bootstrap_servers=bootstrap), topics))


def preload(bootstrap: str, topic: str, events: int, duplicate_share: float) -> int:
    """Write events as the gateway would; returns the number of unique ids."""
    from aiokafka import AIOKafkaProducer

    from onoff_events.cloudevents import SmsEventHeaders, rfc3339_now

    async def run() -> int:
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=20,
            max_batch_size=512 * 1024,
        )
        await producer.start()
        headers = SmsEventHeaders("/bench")
        prefix = uuid.uuid4().hex[:12]
        unique = int(events * (1 - duplicate_share))
        try:
            pending = []
            for i in range(events):
                n = i if i < unique else i % unique  # the last share repeats earlier ids
                event_id = f"{prefix}-{n:09d}"
                pending.append(
                    await producer.send(
                        topic,
                        TEMPLATE.format(id=event_id).encode(),
                        key=event_id.encode(),
                        headers=headers.build(event_id, "2023-05-20T14:30:00Z", rfc3339_now(), "b"),
                    )
                )
                if len(pending) >= 20_000:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
        finally:
            await producer.stop()
        return unique

    return asyncio.run(run())


def warehouse_consumer_env(bootstrap: str, topic: str, port: int, **extra: str) -> dict[str, str]:
    """What every benchmark's warehouse consumer process reads (a fresh group each time)."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPIC": topic,
        "CONSUMER_GROUP": f"bench-{uuid.uuid4().hex[:6]}",
        "CONSUMER_PORT": str(port),
        "CONSUMER_HOST": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        **extra,
    }


def drain(
    name: str, bootstrap: str, topic: str, unique: int, env: dict[str, str], replicas: int = 1
) -> dict[str, Any]:
    """Time consumer processes of one group draining ``topic`` until ``unique`` rows."""
    ports = [free_port() for _ in range(replicas)]
    group = f"bench-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    with ExitStack() as stack:
        procs = [
            stack.enter_context(
                process(
                    PY,
                    "-m",
                    "consumers",
                    "warehouse",
                    env={
                        **warehouse_consumer_env(
                            bootstrap, topic, port, CONSUMER_MAX_BATCH="2000", **env
                        ),
                        "CONSUMER_GROUP": group,
                    },
                )
            )
            for port in ports
        ]
        while True:
            done = sum(delivered_from_metrics(port) for port in ports)
            if (
                done >= unique
                or any(proc.poll() is not None for proc in procs)
                or time.monotonic() - started > 1800
            ):
                break
            time.sleep(0.25)
        seconds = time.monotonic() - started
    return {
        "name": name,
        "requests_per_second": round(unique / seconds),
        "events": unique,
        "seconds": round(seconds, 2),
        "replicas": replicas,
        "errors": 0 if done >= unique else unique - done,
    }


def delivered_from_metrics(port: int) -> int:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("onoff_consumer_events_delivered_total{"):
                    return int(float(line.split()[-1]))
    except OSError:
        pass
    return 0


def copy_ceiling(url: str, events: int) -> dict[str, Any]:
    """The database's own ceiling: COPY of the same rows into a table like ours."""
    import asyncpg

    from consumers.records import RecordDecoder
    from consumers.sinks.warehouse import COLUMNS, POSTGRES_MIGRATIONS, warehouse_row

    decoder = RecordDecoder()

    class Rec:
        def __init__(self, i: int) -> None:
            self.topic, self.partition, self.offset, self.key = "copy", 0, i, None
            self.value = TEMPLATE.format(id=f"copy-{i:09d}").encode()
            self.headers = [("ce_receivedtime", b"2023-05-20T14:30:01.000Z")]

    rows = [warehouse_row(decoder.decode(Rec(i))) for i in range(events)]  # type: ignore[arg-type]

    async def run() -> float:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CREATE SCHEMA IF NOT EXISTS copy_ceiling")
            await conn.execute(POSTGRES_MIGRATIONS[0].format(schema="copy_ceiling"))
            await conn.execute("TRUNCATE copy_ceiling.sms_events")
            started = time.perf_counter()
            await conn.copy_records_to_table(
                "sms_events", schema_name="copy_ceiling", columns=list(COLUMNS), records=rows
            )
            return time.perf_counter() - started
        finally:
            await conn.close()

    seconds = asyncio.run(run())
    return {
        "name": "postgres_copy_ceiling",
        "requests_per_second": round(events / seconds),
        "events": events,
        "seconds": round(seconds, 2),
        "errors": 0,
    }


def end_to_end(
    gateway_url: str, pg_url: str, schema: str, bootstrap: str, topic: str, profile: Profile
) -> dict[str, Any]:
    import asyncpg

    port = free_port()
    with process(
        PY,
        "-m",
        "consumers",
        "warehouse",
        env=warehouse_consumer_env(
            bootstrap,
            topic,
            port,
            WAREHOUSE_URL=pg_url,
            WAREHOUSE_SCHEMA=schema,
            CONSUMER_POLL_TIMEOUT_MS="100",
        ),
        ready=f"http://127.0.0.1:{port}/healthz",
    ):
        time.sleep(3)
        load = vegeta(gateway_url, 1000, profile.e2e_seconds)
        time.sleep(3)

    async def run() -> list[float]:
        conn = await asyncpg.connect(pg_url)
        try:
            rows = await conn.fetch(
                f"SELECT extract(epoch FROM inserted_at - received_at) * 1000 AS ms "
                f"FROM {schema}.sms_events"
            )
            return [float(r["ms"]) for r in rows]
        finally:
            await conn.close()

    latencies = asyncio.run(run())
    return {
        "name": "end_to_end_gateway_to_warehouse_1000",
        "requests_per_second": 1000,
        "requests": load["requests"],
        "errors": load["errors"] + max(load["requests"] - load["errors"] - len(latencies), 0),
        **percentiles(latencies),
    }


# --- the run -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = next(
        (
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if x.startswith("model name")
        ),
        platform.processor(),
    )
    kafka = os.environ.get("KAFKA_VERSION", "4.3.1")
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kafka": kafka,
        "postgres": sh("psql", "--version").strip(),
        "platform": platform.platform(),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    args = parser.parse_args()
    profile = QUICK if args.quick else FULL
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    scenarios: list[dict[str, Any]] = []

    kafka_port = free_port()
    sh("scripts/kafka.sh", "start", str(WORK / "kafka"), str(kafka_port), cwd=ROOT)
    pg_port, redis_port = free_port(), free_port()
    sh("scripts/postgres.sh", "start", str(WORK / "postgres"), str(pg_port), cwd=ROOT)
    sh("scripts/redis.sh", "start", str(WORK / "redis"), str(redis_port), cwd=ROOT)
    bootstrap = f"127.0.0.1:{kafka_port}"
    pg_url = sh(
        "scripts/postgres.sh", "url", str(WORK / "postgres"), str(pg_port), cwd=ROOT
    ).strip()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    try:
        create_topics(
            bootstrap,
            {
                "bench-gateway": 12,
                "bench-gateway.dlq": 1,
                "bench-fastapi": 12,
                "bench-drain": 12,
                "bench-dup": 12,
                "bench-drain.warehouse.dlq": 1,
                "bench-dup.warehouse.dlq": 1,
                "bench-gateway.warehouse.dlq": 1,
                "bench-e2e": 12,
                "bench-e2e.dlq": 1,
                "bench-e2e.warehouse.dlq": 1,
            },
        )
        # The gateway, its RSS at rest, its scenarios, then a soak for RSS over time.
        port = free_port()
        gw_env = {
            "GATEWAY_API_KEYS": f"bench:{KEY}",
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKA_TOPIC": "bench-gateway",
            "GATEWAY_PORT": str(port),
            "GATEWAY_HOST": "127.0.0.1",
            "LOG_LEVEL": "WARNING",
        }
        url = f"http://127.0.0.1:{port}/v1/onoff/sms"
        with process(
            PY, "-m", "gateway", env=gw_env, ready=f"http://127.0.0.1:{port}/readyz"
        ) as gw:
            time.sleep(2)
            rest = rss_mb(gw.pid)
            scenarios += http_scenarios("gateway", url, profile)
            samples = []
            soak_targets = vegeta_targets(url, 1)  # warm the tool's cache of this path
            soak_targets.unlink()
            started = time.monotonic()
            step = min(10, profile.soak_seconds)
            for _ in range(max(1, profile.soak_seconds // step)):
                vegeta(url, profile.soak_rate, step)
                samples.append(round(rss_mb(gw.pid), 1))
            scenarios.append(
                {
                    "name": "gateway_rss",
                    "rss_at_rest_mb": round(rest, 1),
                    "rss_samples_mb": samples,
                    "rss_after_mb": samples[-1],
                    "soak_seconds": round(time.monotonic() - started),
                    "soak_rate": profile.soak_rate,
                    "errors": 0,
                }
            )
        bare_port = free_port()
        with process(PY, "bench/baseline_aiohttp.py", str(bare_port)):
            time.sleep(2)
            scenarios += http_scenarios(
                "bare_aiohttp", f"http://127.0.0.1:{bare_port}/v1/onoff/sms", profile
            )
        fast_port = free_port()
        with process(
            PY,
            "bench/baseline_fastapi.py",
            str(fast_port),
            env={"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KAFKA_TOPIC": "bench-fastapi"},
        ):
            time.sleep(4)
            scenarios += http_scenarios(
                "fastapi_send_and_wait", f"http://127.0.0.1:{fast_port}/v1/onoff/sms", profile
            )
        scenarios.append(producer_performance(bootstrap, profile.drain_events))

        # Consumers: drain a preloaded topic into PostgreSQL and DuckDB, next to raw COPY.
        unique = preload(bootstrap, "bench-drain", profile.drain_events, 0.0)
        # The warehouse's default: its table is its dedupe store (DEDUPE_URL=sink).
        scenarios.append(
            drain(
                "warehouse_drain_postgres",
                bootstrap,
                "bench-drain",
                unique,
                {"WAREHOUSE_URL": pg_url, "WAREHOUSE_SCHEMA": "drain_pg"},
            )
        )
        # Two consumer processes of one group (6 partitions each): the warehouse's scale-out.
        scenarios.append(
            drain(
                "warehouse_drain_postgres_2_replicas",
                bootstrap,
                "bench-drain",
                unique,
                {"WAREHOUSE_URL": pg_url, "WAREHOUSE_SCHEMA": "drain_pg2"},
                replicas=2,
            )
        )
        # The same with a separate Redis dedupe store (claim and confirm: two round trips).
        scenarios.append(
            drain(
                "warehouse_drain_postgres_redis_dedupe",
                bootstrap,
                "bench-drain",
                unique,
                {
                    "WAREHOUSE_URL": pg_url,
                    "WAREHOUSE_SCHEMA": "drain_redis",
                    "DEDUPE_URL": redis_url,
                },
            )
        )
        scenarios.append(
            drain(
                "warehouse_drain_duckdb",
                bootstrap,
                "bench-drain",
                unique,
                {"WAREHOUSE_URL": f"duckdb:///{WORK}/drain.duckdb"},
            )
        )
        scenarios.append(copy_ceiling(pg_url, unique))
        unique_dup = preload(bootstrap, "bench-dup", profile.drain_events, 0.05)
        scenarios.append(
            drain(
                "warehouse_drain_postgres_5pct_duplicates",
                bootstrap,
                "bench-dup",
                unique_dup,
                {"WAREHOUSE_URL": pg_url, "WAREHOUSE_SCHEMA": "drain_dup"},
            )
        )
        # A topic of its own, so the consumer reads only what this scenario sends.
        e2e_env = {**gw_env, "KAFKA_TOPIC": "bench-e2e"}
        with process(PY, "-m", "gateway", env=e2e_env, ready=f"http://127.0.0.1:{port}/readyz"):
            scenarios.append(end_to_end(url, pg_url, "e2e", bootstrap, "bench-e2e", profile))
    finally:
        for script, folder in (
            ("kafka.sh", "kafka"),
            ("postgres.sh", "postgres"),
            ("redis.sh", "redis"),
        ):
            subprocess.run(
                [str(ROOT / "scripts" / script), "stop", str(WORK / folder)],
                check=False,
                capture_output=True,
            )

    by_name = {s["name"]: s for s in scenarios}
    ratios = {
        "gateway_vs_bare_aiohttp": _ratio(by_name, "gateway_saturation", "bare_aiohttp_saturation"),
        "gateway_vs_fastapi": _ratio(
            by_name, "gateway_saturation", "fastapi_send_and_wait_saturation"
        ),
        "warehouse_vs_copy": _ratio(by_name, "warehouse_drain_postgres", "postgres_copy_ceiling"),
        "warehouse_2_replicas_vs_copy": _ratio(
            by_name, "warehouse_drain_postgres_2_replicas", "postgres_copy_ceiling"
        ),
    }
    report = {
        "profile": "quick" if args.quick else "full",
        "machine": machine(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scenarios": scenarios,
        "ratios": ratios,
    }
    name = "quick" if args.quick else "latest"
    (RESULTS / f"{name}.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    (RESULTS / f"{name}.md").write_text(markdown(report))
    # A full run's chart is the one docs/benchmarks.md shows; a quick run's stays in results.
    draw_latency_vs_rate(
        report,
        RESULTS / "quick-latency.png" if args.quick else ROOT / "docs" / "benchmarks-latency.png",
    )
    print(markdown(report))
    return 0


def write_results(name: str, report: dict[str, Any], text: str) -> None:
    """``bench/results/<name>.json`` and ``.md``, and the markdown on stdout."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


def latency_curves(report: dict[str, Any]) -> dict[str, list[tuple[int, float, float]]]:
    """server → [(offered rate, p50 ms, p99 ms)] from the fixed-rate (vegeta) scenarios."""
    curves: dict[str, list[tuple[int, float, float]]] = {}
    for s in report["scenarios"]:
        server, found, rate = s["name"].rpartition("_fixed_")
        if found and rate.isdigit() and "p99_ms" in s:
            curves.setdefault(server, []).append((int(rate), s["p50_ms"], s["p99_ms"]))
    return {k: sorted(v) for k, v in curves.items()}


def draw_latency_vs_rate(report: dict[str, Any], path: Path) -> None:
    """Latency against offered rate, the gateway beside its baselines (log scale: a server
    past its knee jumps by orders of magnitude). Needs matplotlib (the test extra, which make bench installs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for server, points in latency_curves(report).items():
        rates = [p[0] for p in points]
        line = axes.plot(rates, [p[2] for p in points], marker="o", label=f"{server} p99")[0]
        axes.plot(
            rates,
            [p[1] for p in points],
            marker=".",
            linestyle="--",
            color=line.get_color(),
            label=f"{server} p50",
        )
    axes.set_yscale("log")
    axes.set_xlabel("offered rate (requests/s, open loop)")
    axes.set_ylabel("latency (ms)")
    axes.set_title(f"Latency against offered rate ({report['when']}, {report['profile']})")
    axes.grid(visible=True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)


def _ratio(by_name: dict[str, dict[str, Any]], a: str, b: str) -> float:
    return round(by_name[a]["requests_per_second"] / max(by_name[b]["requests_per_second"], 1), 3)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Run {report['when']} ({report['profile']}): {m['cores']} cores, {m['cpu']}, "
        f"Python {m['python']}, Kafka {m['kafka']}, {m['postgres']}.",
        "",
        "| scenario | req or events /s | p50 ms | p99 ms | p99.9 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for s in report["scenarios"]:
        if s["name"] == "gateway_rss":
            continue
        lines.append(
            f"| {s['name']} | {s.get('requests_per_second', '')} | {s.get('p50_ms', '')} "
            f"| {s.get('p99_ms', '')} | {s.get('p999_ms', '')} | {s.get('errors', '')} |"
        )
    rss = next(s for s in report["scenarios"] if s["name"] == "gateway_rss")
    lines += [
        "",
        f"Gateway RSS: {rss['rss_at_rest_mb']} MB at rest; sampled through a "
        f"{rss['soak_seconds']} s run at {rss['soak_rate']}/s: {rss['rss_samples_mb']} MB.",
        "",
        "| ratio | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in report["ratios"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
