"""``python -m bench.spool [--quick]``: what the spool costs and what it carries.

1. Saturation with Kafka healthy, the spool off and on, alternated in the same run (the
   spool only sees records Kafka did not acknowledge within 2 s, so it should cost nothing).
2. Spool-only: the broker stopped, every webhook spooled (fsynced, group commit): the rate
   wrk reaches, its latency, and the records per commit.
3. Replay: the broker started again; how fast the spool empties into Kafka while new
   webhooks arrive at a fixed rate (vegeta), and those webhooks' latency meanwhile.

Writes bench/results/spool.json and spool.md (the figures docs/benchmarks.md quotes).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.run import (
    KEY,
    PY,
    ROOT,
    WORK,
    create_topics,
    free_port,
    machine,
    process,
    sh,
    vegeta,
    write_results,
    wrk,
)

TOPIC = "bench-spool"


@dataclass(frozen=True)
class SpoolProfile:
    saturation_seconds: int
    rounds: int
    spool_only_seconds: int
    replay_rate: int  # new webhooks per second while the spool replays


FULL = SpoolProfile(20, 2, 20, 1000)
QUICK = SpoolProfile(3, 1, 3, 200)


def scrape(port: int) -> dict[str, float]:
    """``name{labels}`` → value of the gateway's /metrics."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:  # our own server
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            values[series] = float(value)
    return values


def total(values: dict[str, float], name: str) -> float:
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def gateway_env(bootstrap: str, port: int, spool: Path | None) -> dict[str, str]:
    env = {
        "GATEWAY_API_KEYS": f"bench:{KEY}",
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPIC": TOPIC,
        "GATEWAY_PORT": str(port),
        "GATEWAY_HOST": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
    }
    if spool is not None:
        env["GATEWAY_SPOOL_DIR"] = str(spool)
    return env


def saturation_ab(bootstrap: str, profile: SpoolProfile) -> dict[str, Any]:
    """The spool off and on, alternated, so drift in the machine hits both alike."""
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for round_ in range(profile.rounds):
        for mode in ("off", "on"):
            port = free_port()
            spool = WORK / f"spool-ab-{round_}" if mode == "on" else None
            env = gateway_env(bootstrap, port, spool)
            with process(PY, "-m", "gateway", env=env, ready=f"http://127.0.0.1:{port}/readyz"):
                time.sleep(1)
                result = wrk(f"http://127.0.0.1:{port}/v1/onoff/sms", profile.saturation_seconds)
                result["spooled"] = total(scrape(port), "onoff_gateway_spooled_records_total")
                runs[mode].append(result)
    off = statistics.median(r["requests_per_second"] for r in runs["off"])
    on = statistics.median(r["requests_per_second"] for r in runs["on"])
    return {
        "name": "saturation_spool_off_vs_on",
        "runs": runs,
        "off_requests_per_second": off,
        "on_requests_per_second": on,
        "ratio_on_to_off": round(on / off, 3) if off else 0.0,
    }


def spool_only(bootstrap: str, kafka_dir: Path, profile: SpoolProfile) -> dict[str, Any]:
    """The broker stopped: every webhook spooled. Then started: the replay."""
    port = free_port()
    spool = WORK / "spool-only"
    sh("scripts/kafka.sh", "stop", str(kafka_dir), cwd=ROOT)
    env = gateway_env(bootstrap, port, spool)
    url = f"http://127.0.0.1:{port}"
    with process(PY, "-m", "gateway", env=env, ready=f"{url}/readyz"):
        time.sleep(1)
        load = wrk(f"{url}/v1/onoff/sms", profile.spool_only_seconds)
        m = scrape(port)
        commits = m.get("onoff_gateway_spool_commit_records_count", 0.0)
        spooled = m.get("onoff_gateway_spool_records", 0.0)
        result: dict[str, Any] = {
            "name": "spool_only",
            **load,
            "spooled": total(m, "onoff_gateway_spooled_records_total"),
            "records_per_commit": round(
                m.get("onoff_gateway_spool_commit_records_sum", 0.0) / commits, 1
            )
            if commits
            else 0.0,
            "commit_ms_mean": round(
                1000 * m.get("onoff_gateway_spool_commit_duration_seconds_sum", 0.0) / commits, 2
            )
            if commits
            else 0.0,
            "spool_bytes": m.get("onoff_gateway_spool_bytes", 0.0),
        }

        # The replay, with new webhooks arriving at a fixed rate meanwhile.
        port_kafka = int(bootstrap.rsplit(":", 1)[1])
        sh("scripts/kafka.sh", "start", str(kafka_dir), str(port_kafka), cwd=ROOT)
        started = time.monotonic()
        new: dict[str, Any] = {}
        seconds = max(5, int(spooled / 2000) + 5)

        def offer() -> None:
            new.update(vegeta(f"{url}/v1/onoff/sms", profile.replay_rate, seconds))

        sender = threading.Thread(target=offer)
        sender.start()
        emptied_at = None
        while time.monotonic() - started < 300:
            if not scrape(port).get("onoff_gateway_spool_records", 0.0):
                emptied_at = time.monotonic() - started
                break
            time.sleep(0.2)
        sender.join()
        replayed = total(scrape(port), "onoff_gateway_replayed_records_total")
        result["replay"] = {
            "records": spooled,
            "replayed": replayed,
            # From the broker answering (kafka.sh start returns then) to an empty spool: the
            # gateway's reconnect (backoff ≤ 2 s, then a probe) is included.
            "seconds_to_empty": round(emptied_at, 1) if emptied_at is not None else None,
            "records_per_second_incl_reconnect": round(spooled / emptied_at)
            if emptied_at
            else None,
            "new_webhooks_meanwhile": new,
        }
    return result


def markdown(report: dict[str, Any]) -> str:
    ab, only = report["saturation"], report["spool_only"]
    replay = only["replay"]
    new = replay["new_webhooks_meanwhile"]
    return "\n".join(
        [
            f"# Spool benchmark ({report['profile']}, {report['when']})",
            "",
            "| scenario | figure |",
            "|---|---|",
            f"| saturation, Kafka healthy, spool off | {ab['off_requests_per_second']:,.0f} req/s |",
            f"| saturation, Kafka healthy, spool on | {ab['on_requests_per_second']:,.0f} req/s "
            f"(x {ab['ratio_on_to_off']} of off) |",
            f"| spool only (broker stopped) | {only['requests_per_second']:,} req/s, "
            f"p50 {only['p50_ms']} ms, p99 {only['p99_ms']} ms, "
            f"{only['records_per_commit']} records per fsync, "
            f"{only['commit_ms_mean']} ms per commit |",
            f"| replay of {replay['records']:,.0f} records | empty "
            f"{replay['seconds_to_empty']} s after the broker was back (the gateway's reconnect included): "
            f"{replay['records_per_second_incl_reconnect']} records/s |",
            f"| new webhooks during the replay | {new.get('rate')} req/s offered, "
            f"p99 {new.get('p99_ms')} ms, {new.get('errors')} errors |",
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    profile = QUICK if args.quick else FULL
    WORK.mkdir(parents=True, exist_ok=True)
    for old in WORK.glob("spool-*"):
        sh("rm", "-rf", str(old))
    kafka_dir = WORK / "spool-kafka"
    kafka_port = free_port()
    bootstrap = f"127.0.0.1:{kafka_port}"
    sh("scripts/kafka.sh", "start", str(kafka_dir), str(kafka_port), cwd=ROOT)
    try:
        create_topics(bootstrap, {TOPIC: 12, f"{TOPIC}.dlq": 1})
        report: dict[str, Any] = {
            "profile": "quick" if args.quick else "full",
            "machine": machine(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "saturation": saturation_ab(bootstrap, profile),
            "spool_only": spool_only(bootstrap, kafka_dir, profile),
        }
    finally:
        sh("scripts/kafka.sh", "stop", str(kafka_dir), cwd=ROOT)
    name = "spool-quick" if args.quick else "spool"
    write_results(name, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
