"""The benchmark's latency-against-offered-rate chart: curves read from the fixed-rate
scenarios only, per server, in rate order; the PNG is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.run import draw_latency_vs_rate, latency_curves

REPORT: dict[str, Any] = {
    "when": "2026-11-27T00:00:00Z",
    "profile": "full",
    "scenarios": [
        {"name": "gateway_saturation", "requests_per_second": 7000, "p99_ms": 20.0},
        {"name": "gateway_fixed_2000", "p50_ms": 3.0, "p99_ms": 7.0},
        {"name": "gateway_fixed_500", "p50_ms": 2.0, "p99_ms": 5.0},
        {"name": "fastapi_send_and_wait_fixed_500", "p50_ms": 1.0, "p99_ms": 3.0},
        {"name": "gateway_rss", "rss_at_rest_mb": 50},
        {"name": "warehouse_drain_postgres", "requests_per_second": 40000},
    ],
}


def test_curves_come_from_fixed_rate_scenarios_in_rate_order() -> None:
    assert latency_curves(REPORT) == {
        "gateway": [(500, 2.0, 5.0), (2000, 3.0, 7.0)],
        "fastapi_send_and_wait": [(500, 1.0, 3.0)],
    }


def test_chart_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "latency.png"
    draw_latency_vs_rate(REPORT, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
