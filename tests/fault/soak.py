"""``python -m tests.fault.soak``: the soak test (issue #12), ``make soak``.

Ten minutes at 2,000 events/s on a fresh cluster of real processes (``tests/fault/cluster.py``:
Kafka, PostgreSQL, Redis, Alertmanager, one gateway, one warehouse and one alerts consumer),
loaded by vegeta, open loop. Every ``--sample-every`` seconds the resident memory (``VmRSS``)
and the open file descriptors of the gateway, each consumer and the broker are read from
``/proc``, with each sink group's lag. At the end the consumers get time to catch up, then the
independent checker (``tests/fault/checker.py``) reads Kafka and the stores.

The soak passes when:

* every request got a 200 (vegeta's results: no other status, no transport error), and vegeta
  held the rate (at least 99 % of ``rate * seconds`` requests made);
* per process, resident memory and descriptors are **flat within 10 %**: after a warm-up
  (``--warmup``, 120 s by default), no sample taken under load is above 1.10 times the first
  sample after the warm-up (:func:`flatness`). Descriptors are counted without the inbound
  HTTP connections of the process's own port: those belong to the load tool's connection pool,
  which only grows (vegeta never closes a worker's connection);
* the consumers caught up, and every property of the checker holds.

Targets are generated while vegeta runs (a thread writes them to its stdin, ``-lazy``), each
with a unique id, an Onoff-shaped body (:func:`tests.fault.sender.sms_body`) and the id again
in the URL's query string (``?id=``; the gateway routes on the path only), so that vegeta's
results, which carry the URL, say which ids were acknowledged. Results are read live from
``vegeta encode --to=csv`` and tallied per window; nothing of size is written to disk.

    python -m tests.fault.soak                              the issue's run (10 min, 2,000/s)
    python -m tests.fault.soak --seconds 60 --rate 500      a smoke run
    python -m tests.fault.soak --report                     also docs/soak.md and docs/soak.png

Exit status 0 only when every property held.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import csv
import gzip
import io
import itertools
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from tests.fault.checker import check, install_attempt_counters
from tests.fault.cluster import API_KEY, Cluster, metric_sum
from tests.fault.run_info import git_commit, utc_now
from tests.fault.sender import SendResult, sms_body
from tests.services import ROOT

VEGETA = ROOT / ".cache" / "bin" / "vegeta"
DOC = ROOT / "docs" / "soak.md"
CHART = ROOT / "docs" / "soak.png"
START_MARKER = "<!-- soak:start -->"
END_MARKER = "<!-- soak:end -->"
TOLERANCE = 0.10  # "flat within 10 %"
FD_SLACK = 5  # descriptors: within 10 % or 5, whichever is more
SINKS = ("warehouse", "alerts")


# -- /proc --------------------------------------------------------------------------------------


def rss_kb(pid: int) -> int | None:
    """``VmRSS`` of ``pid`` in kB; None when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def fd_links(pid: int) -> list[str] | None:
    """What each open descriptor of ``pid`` points at (``socket:[123]``, a path, …)."""
    folder = f"/proc/{pid}/fd"
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    links = []
    for name in names:
        with contextlib.suppress(OSError):  # closed between the listing and the read
            links.append(os.readlink(f"{folder}/{name}"))
    return links


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of ``pid`` (``/proc/PID/stat`` fields 14 and 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


ESTABLISHED, CLOSE_WAIT = "01", "08"  # states in /proc/net/tcp


def inbound_sockets(tcp_tables: Iterable[str], port: int, state: str = ESTABLISHED) -> set[int]:
    """Socket inodes of TCP connections in ``state`` whose local port is ``port`` (established:
    the connections a server accepted on it), from the text of ``/proc/net/tcp`` and ``tcp6``."""
    inodes: set[int] = set()
    for table in tcp_tables:
        for line in table.splitlines()[1:]:
            parts = line.split()
            if len(parts) < 10:
                continue
            local, inode = parts[1], parts[9]
            if parts[3] == state and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(int(inode))
    return inodes


def read_tcp_tables() -> list[str]:
    tables = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            tables.append(Path(name).read_text())
    return tables


def socket_inode(link: str) -> int | None:
    if link.startswith("socket:[") and link.endswith("]"):
        return int(link[8:-1])
    return None


def fd_kind(link: str) -> str:
    """``socket``, ``pipe``, ``anon_inode`` (epoll, eventfd…) or ``file``."""
    for kind in ("socket", "pipe", "anon_inode"):
        if link.startswith(kind + ":"):
            return kind
    return "file"


def load_average() -> float:
    return os.getloadavg()[0]


# -- the verdict on a series --------------------------------------------------------------------


@dataclass(frozen=True)
class Flatness:
    """One process's series of one measure, judged."""

    ok: bool
    baseline: float | None  # the first sample at or after the warm-up
    peak: float | None  # the largest sample from there on
    first: float | None  # the first sample of the run (at rest, before the load)
    last: float | None  # the last sample under load
    samples: int  # samples judged

    @property
    def growth(self) -> float | None:
        """``peak / baseline - 1``: 0.04 is 4 % above the baseline."""
        if self.baseline is None or self.peak is None or self.baseline <= 0:
            return None
        return self.peak / self.baseline - 1


def flatness(
    points: Sequence[tuple[float, float | None]],
    warmup: float,
    end: float,
    tolerance: float = TOLERANCE,
    slack: float = 0.0,
) -> Flatness:
    """Judge ``(t, value)`` samples: flat when, of the samples with ``warmup <= t <= end``,
    none exceeds ``(1 + tolerance)`` times the first of them. A missing value (the process was
    gone) fails; fewer than two samples to judge fail too (nothing was shown).

    Why the first post-warm-up sample and not the minimum or the mean: growth is what a leak
    looks like, and a leak is growth from where the process settled; a dip later does not
    lower the bar, a series that starts high and falls passes (it is not growing)."""
    values = [v for _, v in points]
    judged = [(t, v) for t, v in points if warmup <= t <= end]
    first = next((v for v in values if v is not None), None)
    last = judged[-1][1] if judged else None
    if len(judged) < 2 or any(v is None for _, v in judged):
        baseline = judged[0][1] if judged else None
        return Flatness(False, baseline, None, first, last, len(judged))
    present = [v for _, v in judged if v is not None]
    baseline, peak = present[0], max(present)
    bound = max((1 + tolerance) * baseline, baseline + slack)
    return Flatness(peak <= bound, baseline, peak, first, last, len(judged))


def cpu_percent(samples: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Per process, CPU used from the first to the last sample under load, in % of one core."""
    load = [s for s in samples if s["phase"] == "load"]
    out: dict[str, float | None] = {}
    if len(load) < 2:
        return out
    first, last = load[0], load[-1]
    for name, now in last["processes"].items():
        before = first["processes"].get(name, {}).get("cpu_s")
        after = now.get("cpu_s")
        span = float(last["t"]) - float(first["t"])
        ok = before is not None and after is not None and span > 0
        out[name] = round(100 * (after - before) / span, 1) if ok else None
    return out


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of already sorted values (nearest rank, as bench/run.py)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- targets and results ------------------------------------------------------------------------


def target_line(url: str, event_id: str, body: bytes, api_key: str) -> bytes:
    """One vegeta JSON target (``-format=json``): the id also in the query string."""
    return (
        orjson.dumps(
            {
                "method": "POST",
                "url": f"{url}?id={event_id}",
                "header": {
                    "Authorization": [f"x-api-key {api_key}"],
                    "Content-Type": ["application/json"],
                },
                "body": base64.b64encode(body).decode(),
            }
        )
        + b"\n"
    )


def id_from_url(url: str) -> str | None:
    _, sep, query = url.partition("?id=")
    return query.split("&", 1)[0] if sep and query else None


@dataclass(frozen=True)
class Answer:
    """One row of ``vegeta encode --to=csv``."""

    started_ns: int  # when the request was made, ns since the epoch
    code: int  # HTTP status, 0 when there was none (timeout, refused, …)
    latency_ns: int
    error: str
    url: str

    @classmethod
    def from_csv(cls, row: Sequence[str]) -> Answer:
        # timestamp, code, latency, bytes out, bytes in, error, body, attack, seq, method, url,
        # headers (vegeta v12.12 lib/results.go NewCSVEncoder)
        return cls(int(row[0]), int(row[1]), int(row[2]), row[5], row[10])

    @property
    def outcome(self) -> str:
        """``"200"``, ``"503"``…; a transport error by its kind (``timeout``, ``refused``)."""
        if self.code:
            return str(self.code)
        text = self.error.lower()
        if "timeout" in text or "deadline" in text:
            return "timeout"
        if "refused" in text:
            return "refused"
        return "error"


@dataclass
class Window:
    """The answers to the requests made in one sampling window."""

    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)
        return {
            "requests": sum(self.outcomes.values()),
            "outcomes": dict(self.outcomes),
            "p50_ms": round(percentile(ordered, 0.50), 2),
            "p99_ms": round(percentile(ordered, 0.99), 2),
            "p999_ms": round(percentile(ordered, 0.999), 2),
            "max_ms": round(ordered[-1], 2) if ordered else 0.0,
        }


@dataclass
class Tally:
    """Everything vegeta's results say, by window of ``width`` seconds from ``origin_ns``."""

    origin_ns: int
    width: float
    windows: dict[int, Window] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)  # every id vegeta made a request for
    acknowledged: set[str] = field(default_factory=set)  # ids whose request got a 200
    outcomes: Counter[str] = field(default_factory=Counter)
    unidentified: int = 0  # results whose URL carried no id (should stay 0)
    latencies_ms: list[float] = field(default_factory=list)
    errors_sample: Counter[str] = field(default_factory=Counter)

    def add(self, answer: Answer) -> None:
        index = max(0, int((answer.started_ns - self.origin_ns) / 1e9 / self.width))
        window = self.windows.setdefault(index, Window())
        outcome = answer.outcome
        latency = answer.latency_ns / 1e6
        window.outcomes[outcome] += 1
        window.latencies_ms.append(latency)
        self.latencies_ms.append(latency)
        self.outcomes[outcome] += 1
        if outcome != "200":
            # The error without its URL (which names the id): one line per kind of failure.
            text = answer.error.split('": ', 1)[-1][:200] or f"HTTP {outcome}"
            if text in self.errors_sample or len(self.errors_sample) < 50:
                self.errors_sample[text] += 1
        event_id = id_from_url(answer.url)
        if event_id is None:
            self.unidentified += 1
            return
        self.ids.append(event_id)
        if outcome == "200":
            self.acknowledged.add(event_id)

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    @property
    def errors(self) -> int:
        return self.requests - self.outcomes["200"]

    def window_summaries(self) -> list[dict[str, Any]]:
        last = max(self.windows, default=-1)
        return [
            {"start": round(i * self.width, 2), **self.windows.get(i, Window()).summary()}
            for i in range(last + 1)
        ]


def read_answers(stream: Iterable[str], tally: Tally) -> None:
    for row in csv.reader(stream):
        if len(row) >= 11:
            tally.add(Answer.from_csv(row))


class Attack:
    """vegeta attack, fed by a thread, read by another through vegeta encode."""

    def __init__(self, url: str, config: SoakConfig, folder: Path) -> None:
        self.url, self.rate, self.seconds = url, config.rate, config.seconds
        self.alert_share = config.alert_share
        self.folder = folder
        self.generated = 0
        self.alert_ids: set[str] = set()
        self.started = 0.0
        self.tally = Tally(0, config.sample_every)
        self._attack: subprocess.Popen[bytes] | None = None
        self._encode: subprocess.Popen[bytes] | None = None
        self._threads: list[threading.Thread] = []
        self._random = random.Random(12)  # noqa: S311 # a load's shape, not a secret

    def start(self) -> None:
        stderr = (self.folder / "vegeta.log").open("ab")
        self.started = time.time()
        self.tally.origin_ns = time.time_ns()
        self._attack = subprocess.Popen(
            [
                str(VEGETA),
                "attack",
                "-format=json",
                "-lazy",
                f"-rate={self.rate}/s",
                f"-duration={self.seconds}s",
                "-timeout=11s",  # Onoff: 1 s connect + 10 s read
                "-max-workers=2000",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        self._encode = subprocess.Popen(
            [str(VEGETA), "encode", "--to=csv"],
            stdin=self._attack.stdout,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        stderr.close()
        assert self._attack.stdout is not None  # PIPE above
        self._attack.stdout.close()  # encode holds it now
        assert self._attack.stdin is not None
        assert self._encode.stdout is not None
        feed, results = self._attack.stdin, self._encode.stdout
        self._threads = [
            threading.Thread(target=self._feed, args=(feed,), daemon=True, name="targets"),
            threading.Thread(target=self._read, args=(results,), daemon=True, name="results"),
        ]
        for thread in self._threads:
            thread.start()

    def _targets(self) -> Iterator[bytes]:
        i = 0
        while True:
            event_id = str(uuid.uuid4())
            alert = self._random.random() < self.alert_share
            if alert:
                self.alert_ids.add(event_id)
            yield target_line(self.url, event_id, sms_body(event_id, i, alert=alert), API_KEY)
            i += 1

    def _feed(self, stdin: IO[bytes]) -> None:
        """Write targets until vegeta stops reading (its duration is over: a broken pipe)."""
        with contextlib.suppress(BrokenPipeError, OSError):
            batch: list[bytes] = []
            for line in self._targets():
                batch.append(line)
                if len(batch) == 64:
                    stdin.write(b"".join(batch))
                    stdin.flush()
                    self.generated += len(batch)
                    batch.clear()
        with contextlib.suppress(BrokenPipeError, OSError):
            stdin.close()

    def _read(self, stdout: IO[bytes]) -> None:
        read_answers(io.TextIOWrapper(stdout, encoding="utf-8", newline=""), self.tally)

    @property
    def pid(self) -> int:
        assert self._attack is not None, "start() first"
        return self._attack.pid

    def done(self) -> bool:
        return self._encode is not None and self._encode.poll() is not None

    def wait(self) -> int:
        assert self._attack is not None, "start() first"
        assert self._encode is not None, "start() first"
        attack = self._attack.wait()
        # vegeta stops reading targets at the end of its duration: a broken pipe for the feeder.
        if self._attack.stdin is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._attack.stdin.close()
        encode = self._encode.wait()
        for thread in self._threads:
            thread.join(30)
        return attack or encode

    def kill(self) -> None:
        for process in (self._attack, self._encode):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def save_ids(folder: Path, tally: Tally) -> None:
    """Every id requested, with its outcome, for a post-mortem (``ids.tsv.gz``, ~20 MB)."""
    with gzip.open(folder / "ids.tsv.gz", "wt", compresslevel=1) as out:
        for event_id in tally.ids:
            out.write(f"{event_id}\t{'200' if event_id in tally.acknowledged else 'no'}\n")


# -- sampling -----------------------------------------------------------------------------------


@dataclass
class Watched:
    name: str
    pid: int
    http_port: int | None  # inbound connections on it are the load tool's, not counted


def watched_processes(cluster: Cluster) -> list[Watched]:
    found = [Watched(g.name, g.pid, g.port) for g in cluster.gateways]
    for members in cluster.consumers.values():
        found += [Watched(m.name, m.pid, m.port) for m in members]
    broker = cluster.broker_pid
    if broker is not None:
        found.append(Watched("kafka", broker, None))
    return found


def sample_processes(processes: Sequence[Watched]) -> dict[str, dict[str, Any]]:
    """RSS (MB), descriptors (all; and without the inbound HTTP connections) and CPU seconds."""
    tables = read_tcp_tables()
    out: dict[str, dict[str, Any]] = {}
    for p in processes:
        rss = rss_kb(p.pid)
        links = fd_links(p.pid)
        inbound = closing = 0
        kinds: Counter[str] = Counter()
        if links is not None:
            kinds.update(fd_kind(link) for link in links)
        if links is not None and p.http_port is not None:
            accepted = inbound_sockets(tables, p.http_port)
            waiting = inbound_sockets(tables, p.http_port, CLOSE_WAIT)
            inbound = sum(1 for link in links if socket_inode(link) in accepted)
            closing = sum(1 for link in links if socket_inode(link) in waiting)
        out[p.name] = {
            "fd_kinds": dict(kinds),
            "http_in_close_wait": closing,
            "rss_mb": None if rss is None else round(rss / 1024, 2),
            "fds": None if links is None else len(links),
            "fds_own": None if links is None else len(links) - inbound,
            "http_in": inbound,
            "cpu_s": cpu_seconds(p.pid),
        }
    return out


class Lags:
    """Each sink group's lag, read from Kafka (``tests.fault.scenarios.group_lags``)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        bootstrap = cluster.kafka.bootstrap
        self.admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        self.probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        self.started = False

    async def read(self) -> dict[str, int] | None:
        from tests.fault.scenarios import group_lags  # noqa: PLC0415 # only for the lag

        try:
            if not self.started:
                await asyncio.wait_for(asyncio.gather(self.admin.start(), self.probe.start()), 10)
                self.started = True
            return await asyncio.wait_for(group_lags(self.admin, self.probe, self.cluster), 5)
        except Exception:  # noqa: BLE001 # a missed sample is shown as none, not fatal
            return None

    async def end_total(self) -> int:
        """The sum of the events topic's end offsets; -1 when Kafka did not answer."""
        lag = await self.read()  # starts the clients, refreshes the metadata
        partitions = self.probe.partitions_for_topic(self.cluster.topic) or set()
        if lag is None or not partitions:
            return -1
        tps = [TopicPartition(self.cluster.topic, p) for p in sorted(partitions)]
        try:
            ends = await asyncio.wait_for(self.probe.end_offsets(tps), 5)
        except Exception:  # noqa: BLE001 # a missed reading: the caller tries again
            return -1
        return int(sum(ends.values()))

    async def close(self) -> None:
        await asyncio.gather(self.admin.close(), self.probe.stop(), return_exceptions=True)


# -- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakConfig:
    rate: int = 2000
    seconds: int = 600
    sample_every: float = 10.0
    warmup: float = 120.0
    drain_seconds: float = 300.0
    sinks: tuple[str, ...] = SINKS
    alert_share: float = 0.01
    folder: Path = ROOT / ".data" / "fault" / "soak"
    broker_heap: str = "-Xms768m -Xmx768m -XX:+AlwaysPreTouch"  # "" keeps kafka.sh's default


def handler_ms(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, float | None]:
    """Per gateway, the mean time inside the handler and inside publish between two samples."""
    out: dict[str, float | None] = {}
    for name, now in after.get("gateways", {}).items():
        then = before.get("gateways", {}).get(name)
        if not then or not now:
            out[name] = None
            continue
        count = now["handler_count"] - then["handler_count"]
        total = now["handler_seconds_sum"] - then["handler_seconds_sum"]
        out[name] = round(1000 * total / count, 2) if count > 0 else None
    return out


def _progress(
    t: float,
    sample: Mapping[str, Any],
    previous: Mapping[str, Any],
    window: Mapping[str, Any] | None,
) -> None:
    inside = {
        name: (g["in_flight"] if g else None, handler_ms(previous, sample).get(name))
        for name, g in sample["gateways"].items()
    }
    procs = " ".join(
        f"{name}={v['rss_mb']}MB/{v['fds_own']}fd" for name, v in sample["processes"].items()
    )
    answers = (
        f"{window['requests']} req {window['outcomes']} p99 {window['p99_ms']} ms"
        if window
        else "-"
    )
    print(
        f"[soak {t:6.0f}s] load {sample['load_1m']:.2f} lag {sample['lag']} | {answers} | "
        f"gateway (in flight, handler ms) {inside} | {procs}",
        flush=True,
    )


GATEWAY_SERIES = {
    # The gateway's own view, to tell its queueing from the load tool's: requests inside the
    # handler now, and cumulative handler and publish times (sum and count of histograms).
    "in_flight": "onoff_gateway_webhook_requests_in_flight",
    "handler_seconds_sum": "onoff_gateway_http_request_duration_seconds_sum",
    "handler_count": "onoff_gateway_http_request_duration_seconds_count",
    "publish_seconds_sum": "onoff_gateway_publish_duration_seconds_sum",
    "publish_count": "onoff_gateway_publish_duration_seconds_count",
}


async def gateway_figures(cluster: Cluster) -> dict[str, dict[str, float] | None]:
    """Per gateway, :data:`GATEWAY_SERIES` from a scrape; None when it did not answer in 2 s."""
    out: dict[str, dict[str, float] | None] = {}
    for gateway in cluster.gateways:
        values = await gateway.metrics()
        out[gateway.name] = (
            {k: metric_sum(values, name, **_route(k)) for k, name in GATEWAY_SERIES.items()}
            if values
            else None
        )
    return out


def _route(series: str) -> dict[str, str]:
    return {"route": "/v1/onoff/sms"} if series.startswith("handler") else {}


async def _sample(
    t0: float, cluster: Cluster, processes: Sequence[Watched], lags: Lags, phase: str
) -> dict[str, Any]:
    lag, gateways = await asyncio.gather(lags.read(), gateway_figures(cluster))
    return {
        "t": round(time.time() - t0, 2),
        "phase": phase,
        "load_1m": round(load_average(), 2),
        "lag": lag,
        "gateways": gateways,
        "processes": sample_processes(processes),
    }


async def _drain(
    cluster: Cluster, lags: Lags, seconds: float, quiet: float = 5.0
) -> tuple[bool, float]:
    """Wait (at most ``seconds``) until the load's last records are written and consumed: no
    request inside any gateway, the topic's end offsets unchanged for ``quiet`` seconds, and
    every sink group at lag 0.

    vegeta ends when its last request is answered or timed out, but a request it gave up on
    is still inside the gateway, which may write it to Kafka seconds later. The checker reads
    the end offsets and then that many records: a topic still growing then would make it read
    some late records instead of earlier ones (seen in the first 10-minute run)."""
    started = time.monotonic()
    last_end, still_since = -1, time.monotonic()
    while time.monotonic() - started < seconds:
        end = await lags.end_total()
        if end != last_end:
            last_end, still_since = end, time.monotonic()
        gateways = await gateway_figures(cluster)
        idle = all(g is not None and g["in_flight"] == 0 for g in gateways.values())
        lag = await lags.read()
        caught_up = bool(lag) and all(v == 0 for v in (lag or {}).values())
        if idle and caught_up and end >= 0 and time.monotonic() - still_since >= quiet:
            return True, time.monotonic() - started
        await asyncio.sleep(1)
    return False, time.monotonic() - started


async def soak(config: SoakConfig) -> dict[str, Any]:
    """Run the soak in a fresh cluster; returns the result as JSON-ready data."""
    if not VEGETA.exists():
        raise RuntimeError(f"{VEGETA} missing: scripts/bench-tools.sh builds it")
    result: dict[str, Any] = {
        "started_at": utc_now(),
        "git_commit": git_commit(),
        "machine": f"{os.cpu_count()} cores",
        "config": {
            "rate": config.rate,
            "seconds": config.seconds,
            "sample_every": config.sample_every,
            "warmup": config.warmup,
            "drain_seconds": config.drain_seconds,
            "sinks": list(config.sinks),
            "alert_share": config.alert_share,
            "tolerance": TOLERANCE,
            "broker_heap": config.broker_heap,
        },
        "ok": False,
        "error": None,
        "properties": [],
    }
    run_folder = config.folder / time.strftime("%Y%m%d-%H%M%S")
    cluster = Cluster(run_folder, sinks=config.sinks)
    if config.broker_heap:
        # The JVM grows its committed heap from -Xms towards -Xmx under load, and resident
        # memory follows: growth that is not a leak (a heap leak ends in OutOfMemoryError at
        # -Xmx, not in RSS beyond it). A heap fixed and touched at start leaves RSS to show
        # what can leak without bound: native memory (threads, direct buffers, metaspace).
        cluster.kafka.env = {**cluster.kafka.env, "KAFKA_HEAP_OPTS": config.broker_heap}
    attack: Attack | None = None
    lags: Lags | None = None
    wall = time.monotonic()
    try:
        await cluster.start(gateways=1, members=1)
        if "warehouse" in config.sinks:
            await install_attempt_counters(cluster.postgres.url)
        processes = watched_processes(cluster)
        result["processes"] = {p.name: p.pid for p in processes}
        lags = Lags(cluster)
        attack = Attack(cluster.webhook_url(cluster.gateways[0]), config, run_folder)
        t0 = time.time()
        samples = [await _sample(t0, cluster, processes, lags, "rest")]
        samples[0]["t"] = 0.0
        attack.start()
        t0 = attack.started
        tick = 1
        # Samples strictly inside the load: at its end vegeta closes its connections, and the
        # gateway's sockets in their closing states would be counted as its own for a moment.
        while not attack.done() and tick * config.sample_every < config.seconds:
            due = t0 + tick * config.sample_every
            await asyncio.sleep(max(0.0, due - time.time()))
            if attack.done():
                break
            sample = await _sample(t0, cluster, processes, lags, "load")
            samples.append(sample)
            window = attack.tally.windows.get(tick - 1, Window()).summary()
            _progress(sample["t"], sample, samples[-2], window)
            sample["tools_cpu_s"] = {
                "vegeta": cpu_seconds(attack.pid),
                "soak-driver": cpu_seconds(os.getpid()),
            }
            tick += 1
        rc = await asyncio.to_thread(attack.wait)
        result["vegeta_exit"] = rc
        load_end = time.time() - t0
        drained, drain_took = await _drain(cluster, lags, config.drain_seconds)
        samples.append(await _sample(t0, cluster, processes, lags, "drained"))
        tally = attack.tally
        sent = SendResult(
            sent_ids=tally.ids,
            requests=tally.requests,
            acknowledged=tally.acknowledged,
            gave_up=set(tally.ids) - tally.acknowledged,
            alert_ids=attack.alert_ids & set(tally.ids),
            answers=tally.outcomes,
            duration=load_end,
        )
        save_ids(run_folder, tally)
        print(f"[soak] load over after {load_end:.0f} s; checking", flush=True)
        verdict = await check(cluster, sent)
        result.update(
            samples=samples,
            windows=tally.window_summaries(),
            load_seconds=round(load_end, 1),
            drained=drained,
            drain_seconds_taken=round(drain_took, 1),
            answers=dict(tally.outcomes),
            requests=tally.requests,
            targets_generated=attack.generated,
            unidentified_results=tally.unidentified,
            error_examples=dict(tally.errors_sample),
            checker=verdict.to_json(),
        )
        overall = sorted(tally.latencies_ms)
        result["latency_ms"] = {
            "p50": round(percentile(overall, 0.5), 2),
            "p99": round(percentile(overall, 0.99), 2),
            "p999": round(percentile(overall, 0.999), 2),
            "max": round(overall[-1], 2) if overall else 0.0,
        }
        result["cpu_percent"] = cpu_percent(samples)
        result["properties"], result["flatness"] = _properties(
            config, result, tally, processes=processes, samples=samples, load_end=load_end
        )
        result["properties"] += [p.__dict__ for p in verdict.properties]
        result["ok"] = all(p["ok"] for p in result["properties"])
    except Exception as error:  # noqa: BLE001 # reported in the JSON, and the exit status
        result["error"] = f"{type(error).__name__}: {error}"
    finally:
        if attack is not None:
            attack.kill()
        if lags is not None:
            await lags.close()
        await cluster.stop()
        result["wall_seconds"] = round(time.monotonic() - wall, 1)
        result["folder"] = str(run_folder)
    return result


def _properties(
    config: SoakConfig,
    result: Mapping[str, Any],
    tally: Tally,
    *,
    processes: Sequence[Watched],
    samples: Sequence[Mapping[str, Any]],
    load_end: float,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    expected = config.rate * config.seconds
    props: list[dict[str, Any]] = [
        {
            "name": "every answer a 200",
            "ok": tally.errors == 0 and tally.requests > 0 and tally.unidentified == 0,
            "detail": f"{tally.requests} requests, {tally.errors} not 200 "
            f"({dict(tally.outcomes)}), {tally.unidentified} results without an id",
        },
        {
            "name": "the rate was held",
            "ok": tally.requests >= 0.99 * expected,
            "detail": f"{tally.requests} requests made of {expected} due "
            f"({config.rate}/s × {config.seconds} s), open loop",
        },
        {
            "name": "consumers caught up",
            "ok": bool(result["drained"]),
            "detail": f"every sink group at lag 0 {result['drain_seconds_taken']} s after the "
            f"load (bound {config.drain_seconds:g} s)",
        },
    ]
    flat: dict[str, dict[str, Any]] = {}
    for p in processes:
        for measure, label in (("rss_mb", "RSS"), ("fds_own", "descriptors")):
            points = [
                (float(s["t"]), s["processes"][p.name][measure])
                for s in samples
                if s["phase"] in ("rest", "load")
            ]
            # Descriptors are small counts: at 15, one transient socket is +7 %. A leak grows
            # without bound, so they may also move by FD_SLACK (seen: 15 → 17 → 15).
            slack = FD_SLACK if measure != "rss_mb" else 0.0
            f = flatness(points, config.warmup, load_end, slack=slack)
            flat.setdefault(p.name, {})[measure] = {
                "ok": f.ok,
                "first": f.first,
                "baseline": f.baseline,
                "peak": f.peak,
                "last": f.last,
                "growth": None if f.growth is None else round(f.growth, 4),
                "samples": f.samples,
            }
            unit = " MB" if measure == "rss_mb" else ""
            held = [
                s["processes"][p.name]["http_in"]
                for s in samples
                if s["phase"] == "load" and float(s["t"]) >= config.warmup
            ]
            connections = (
                f"; inbound HTTP connections {held[0]} → {max(held)}"
                if held and max(held) > 0
                else ""
            )
            growth = "n/a" if f.growth is None else f"{100 * f.growth:+.1f} %"
            props.append(
                {
                    "name": f"{p.name}: {label} flat within {TOLERANCE:.0%}"
                    + (f" (or {FD_SLACK})" if slack else ""),
                    "ok": f.ok,
                    "detail": f"at rest {f.first}{unit}; after {config.warmup:g} s "
                    f"{f.baseline}{unit}, peak {f.peak}{unit} ({growth}), "
                    f"last {f.last}{unit}, {f.samples} samples{connections}",
                }
            )
    return props, flat


# -- the report ---------------------------------------------------------------------------------


def draw(result: Mapping[str, Any], path: Path) -> None:
    """A timeline: RSS and descriptors per process, answers and latency per window, lag."""
    import matplotlib  # noqa: PLC0415 # drawing only

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    samples = [s for s in result["samples"] if s["phase"] in ("rest", "load")]
    windows = result["windows"]
    names = list(result["processes"])
    figure = Figure(figsize=(11, 13), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(5, 1, sharex=True)
    ts = [s["t"] for s in samples]
    for name in names:
        axes[0].plot(ts, [s["processes"][name]["rss_mb"] for s in samples], marker=".", label=name)
        axes[1].plot(ts, [s["processes"][name]["fds_own"] for s in samples], marker=".", label=name)
    axes[0].set_ylabel("RSS (MB)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("open descriptors\n(without inbound HTTP)")
    for ax in axes[:2]:
        ax.axvline(result["config"]["warmup"], color="grey", linestyle=":", label="end of warm-up")
        ax.legend(fontsize=8, loc="upper left", ncols=3)
    width = result["config"]["sample_every"]
    starts = [w["start"] + width / 2 for w in windows]
    ok = [w["outcomes"].get("200", 0) / width for w in windows]
    bad = [(w["requests"] - w["outcomes"].get("200", 0)) / width for w in windows]
    axes[2].plot(starts, ok, marker=".", color="tab:green", label="200 /s")
    axes[2].plot(starts, bad, marker=".", color="tab:red", label="other /s")
    axes[2].set_ylabel("answers per second")
    axes[2].legend(fontsize=8, loc="center left")
    for key, colour in (("p50_ms", "tab:blue"), ("p99_ms", "tab:orange"), ("max_ms", "tab:red")):
        axes[3].plot(starts, [w[key] for w in windows], marker=".", color=colour, label=key)
    axes[3].set_yscale("log")
    axes[3].set_ylabel("latency (ms)")
    axes[3].legend(fontsize=8, loc="upper left", ncols=3)
    sinks = result["config"]["sinks"]
    for sink in sinks:
        points = [(s["t"], s["lag"][sink]) for s in samples if s["lag"] and sink in s["lag"]]
        axes[4].plot([t for t, _ in points], [v for _, v in points], marker=".", label=sink)
    axes[4].plot(ts, [100 * s["load_1m"] for s in samples], color="grey", label="load avg ×100")
    axes[4].set_ylabel("lag (events)")
    axes[4].set_xlabel("seconds since the load started")
    axes[4].legend(fontsize=8, loc="upper left")
    config = result["config"]
    figure.suptitle(
        f"soak: {config['rate']}/s for {config['seconds']} s, sampled every "
        f"{config['sample_every']:g} s ({result['started_at']})"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)


def render_markdown(result: Mapping[str, Any], chart: str | None) -> str:
    """The generated block of docs/soak.md (between the markers)."""
    config = result["config"]
    lines = [
        f"Run of {result['started_at']} (commit {result['git_commit']}, {result['machine']}): "
        f"{config['rate']:,}/s for {config['seconds']} s, sinks {', '.join(config['sinks'])}, "
        f"samples every {config['sample_every']:g} s, warm-up {config['warmup']:g} s. "
        f"**{'PASS' if result['ok'] else 'FAIL'}**.",
        "",
    ]
    if result.get("error"):
        lines += [f"The run broke: `{result['error']}`.", ""]
    if "requests" in result:
        windows = [w for w in result["windows"] if w["requests"]]
        p99s = [w["p99_ms"] for w in windows]
        loads = [s["load_1m"] for s in result["samples"] if s["phase"] == "load"]
        lat = result["latency_ms"]
        lines += [
            f"- Requests: {result['requests']:,}; answers {result['answers']}; "
            f"latency over the run p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
            f"p99.9 {lat['p999']} ms, max {lat['max']} ms.",
            f"- p99 per {config['sample_every']:g} s window: {min(p99s, default=0)} to "
            f"{max(p99s, default=0)} ms (median window "
            f"{sorted(p99s)[len(p99s) // 2] if p99s else 0} ms).",
            f"- Load average (1 min) during the load: {min(loads, default=0):.2f} to "
            f"{max(loads, default=0):.2f}, on {result['machine']} shared with other work.",
            f"- The gateway's own mean time inside its handler, per window: "
            f"{_handler_range(result['samples'])}; the rest of a request's latency is "
            "queueing before the handler runs (CPU) and in the load tool.",
            f"- Consumers caught up {result['drain_seconds_taken']} s after the load "
            f"({'yes' if result['drained'] else 'NO'}).",
            "",
            "| process | RSS at rest | RSS after warm-up → peak (growth) | RSS last | "
            "fds at rest | fds after warm-up → peak | fds last | CPU (one core) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, f in result.get("flatness", {}).items():
            r, d = f["rss_mb"], f["fds_own"]
            growth = "" if r["growth"] is None else f" ({100 * r['growth']:+.1f} %)"
            cpu = result.get("cpu_percent", {}).get(name)
            cpu_text = "" if cpu is None else f"{cpu:.0f} %"
            lines.append(
                f"| {name} | {r['first']} MB | {r['baseline']} → {r['peak']} MB{growth} | "
                f"{r['last']} MB | {d['first']} | {d['baseline']} → {d['peak']} | {d['last']} | "
                f"{cpu_text} |"
            )
        lines += ["", "| property | result | detail |", "|---|---|---|"]
        for p in result["properties"]:
            detail = str(p["detail"]).replace("|", "\\|")
            lines.append(f"| {p['name']} | {'PASS' if p['ok'] else 'FAIL'} | {detail} |")
        lines.append("")
    if chart:
        lines += [f"![soak timeline]({chart})", ""]
    return "\n".join(lines)


def _handler_range(samples: Sequence[Mapping[str, Any]]) -> str:
    load = [s for s in samples if s["phase"] in ("rest", "load")]
    values = [
        v
        for before, after in itertools.pairwise(load)
        for v in handler_ms(before, after).values()
        if v is not None
    ]
    return f"{min(values)} to {max(values)} ms" if values else "not measured"


def replace_between_markers(document: str, generated: str) -> str:
    """``document`` with what lies between the markers replaced (markers appended if absent)."""
    if START_MARKER not in document and END_MARKER not in document:
        document = document.rstrip("\n") + f"\n\n{START_MARKER}\n{END_MARKER}\n"
    head, _, rest = document.partition(START_MARKER)
    middle, sep, tail = rest.partition(END_MARKER)
    if not sep or START_MARKER in tail or END_MARKER in tail:
        raise ValueError(f"soak.md needs exactly one {START_MARKER} before one {END_MARKER}")
    del middle
    return f"{head}{START_MARKER}\n{generated.strip()}\n{END_MARKER}{tail}"


def write_report(result: Mapping[str, Any], doc: Path = DOC, chart: Path = CHART) -> None:
    chart_name: str | None = None
    if "samples" in result:
        try:
            draw(result, chart)
            chart_name = chart.name
        except ImportError:
            print("[soak] matplotlib missing: no chart (pip install -e '.[test]')")
    text = doc.read_text() if doc.exists() else "# Soak test\n"
    doc.write_text(replace_between_markers(text, render_markdown(result, chart_name)))


# -- entry point --------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fault.soak", description=__doc__)
    parser.add_argument("--rate", type=int, default=2000, help="requests per second")
    parser.add_argument("--seconds", type=int, default=600, help="how long the load lasts")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds")
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds not judged (120, or 20 %% of a run)"
    )
    parser.add_argument("--drain-seconds", type=float, default=300.0)
    parser.add_argument("--sinks", nargs="+", default=list(SINKS), choices=["warehouse", "alerts"])
    parser.add_argument("--alert-share", type=float, default=0.01)
    parser.add_argument(
        "--broker-heap",
        default=SoakConfig.broker_heap,
        help="KAFKA_HEAP_OPTS for the broker ('' for kafka.sh's default, which grows)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / ".data" / "fault" / "soak.json", help="the JSON"
    )
    parser.add_argument("--report", action="store_true", help="write docs/soak.md and soak.png")
    args = parser.parse_args(argv)
    if args.seconds < 3 * args.sample_every:
        # Flatness needs two samples after the warm-up, all inside the load.
        parser.error("--seconds must be at least 3 × --sample-every")
    warmup = args.warmup if args.warmup is not None else min(120.0, 0.2 * args.seconds)
    config = SoakConfig(
        rate=args.rate,
        seconds=args.seconds,
        sample_every=args.sample_every,
        warmup=warmup,
        drain_seconds=args.drain_seconds,
        sinks=tuple(args.sinks),
        alert_share=args.alert_share,
        broker_heap=args.broker_heap,
    )
    result = asyncio.run(soak(config))
    for p in result["properties"]:
        print(f"{'PASS' if p['ok'] else 'FAIL'}  {p['name']}: {p['detail']}")
    if result["error"]:
        print(f"ERROR  {result['error']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(f"[soak] {'PASS' if result['ok'] else 'FAIL'}; JSON in {args.out}")
    if args.report:
        write_report(result)
        print(f"[soak] wrote {DOC} and {CHART}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
