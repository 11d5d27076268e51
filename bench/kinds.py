"""``python -m bench.kinds [BASE_COMMIT]``: the SMS webhook's saturation before and after the
gateway became generic over event kinds (issue: the call webhook, "the SMS path must stay as
fast": within 3 %).

The same machine, the same private broker, the same wrk load; the gateway of ``BASE_COMMIT``
(a git worktree) and the gateway of the working tree (with the call webhook on too, as
deployed) take turns, ``ROUNDS`` times each, so drift of the machine hits both alike. Writes
``bench/results/kinds.json`` and ``kinds.md``.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.run import (
    KEY,
    PY,
    ROOT,
    WORK,
    create_topics,
    free_port,
    sh,
    wait_http,
    write_results,
    wrk,
)

ROUNDS = 5
SECONDS = 15


@contextmanager
def gateway(source: Path, env: dict[str, str], log: Path) -> Iterator[str]:
    """``python -m gateway`` from ``source`` (its own packages first on the path)."""
    port = free_port()
    full = {**os.environ, **env, "GATEWAY_PORT": str(port), "PYTHONPATH": str(source)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PY, "-m", "gateway"], cwd=source, env=full, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz")
            yield f"http://127.0.0.1:{port}/v1/onoff/sms"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> int:
    base = sys.argv[1] if len(sys.argv) > 1 else "HEAD~1"
    work = WORK / "kinds"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    before = work / "before"
    sh("git", "worktree", "add", "--detach", str(before), base, cwd=ROOT)
    kafka_port = free_port()
    sh("scripts/kafka.sh", "start", str(work / "kafka"), str(kafka_port), cwd=ROOT)
    bootstrap = f"127.0.0.1:{kafka_port}"
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    try:
        create_topics(
            bootstrap,
            {"bench-kinds": 12, "bench-kinds.dlq": 1, "bench-calls": 12, "bench-calls.dlq": 1},
        )
        common = {
            "GATEWAY_API_KEYS": f"bench:{KEY}",
            "GATEWAY_HOST": "127.0.0.1",
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKA_TOPIC": "bench-kinds",
            "LOG_LEVEL": "WARNING",
        }
        after_env = {
            **common,
            "GATEWAY_EVENT_KINDS": "sms,call",
            "KAFKA_CALL_TOPIC": "bench-calls",
            "KAFKA_CALL_DLQ_TOPIC": "bench-calls.dlq",
        }
        for round_ in range(ROUNDS):
            # Alternate which goes first, so neither always runs on a warmer machine.
            order = ["before", "after"] if round_ % 2 == 0 else ["after", "before"]
            for name in order:
                source, env = (before, common) if name == "before" else (ROOT, after_env)
                with gateway(source, env, work / f"{name}-{round_}.log") as url:
                    time.sleep(2)
                    wrk(url, 3)  # warm up: connections, the producer's first batches
                    result = wrk(url, SECONDS)
                runs[name].append(result)
                print(name, round_, result["requests_per_second"], "req/s", flush=True)
    finally:
        sh("scripts/kafka.sh", "stop", str(work / "kafka"), cwd=ROOT)
        sh("git", "worktree", "remove", "--force", str(before), cwd=ROOT)
    medians = {n: statistics.median(r["requests_per_second"] for r in rs) for n, rs in runs.items()}
    ratio = medians["after"] / medians["before"]
    report = {
        "base_commit": sh("git", "rev-parse", base, cwd=ROOT).strip(),
        "rounds": ROUNDS,
        "seconds": SECONDS,
        "runs": runs,
        "median_requests_per_second": medians,
        "after_over_before": round(ratio, 4),
        "errors": sum(r["errors"] for rs in runs.values() for r in rs),
    }
    rows = "\n".join(
        f"| {n} | {', '.join(str(r['requests_per_second']) for r in rs)} | {medians[n]:,.0f} |"
        for n, rs in runs.items()
    )
    text = (
        "# The SMS webhook before and after the event kinds\n\n"
        f"wrk, 64 connections, {SECONDS} s per run, {ROUNDS} runs each, alternated; the same "
        f"private broker. Base: `{report['base_commit'][:10]}`.\n\n"
        "| gateway | req/s per run | median |\n|---|---|---|\n"
        f"{rows}\n\n**after / before: {ratio:.3f}** ({report['errors']} errors)\n"
    )
    write_results("kinds", report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
