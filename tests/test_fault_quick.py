"""The quick subset of the fault suite (``make fault`` runs them all, docs/reliability.md):
the broker SIGKILLed under Onoff-like load, and consumers SIGKILLed at random points with a
member added mid-run. Each starts its own broker, PostgreSQL, Redis and Alertmanager, and the
independent checker (Kafka's console consumer, the stores themselves) decides."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault.scenarios import SCENARIOS, Scenario, run_scenario

QUICK = [s for s in SCENARIOS if s.quick]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("scenario", QUICK, ids=[s.name for s in QUICK])
async def test_fault_scenario_keeps_every_guarantee(scenario: Scenario, tmp_path: Path) -> None:
    result = await run_scenario(scenario, tmp_path, scale=0.7)
    assert result["error"] is None, result["error"]
    failed = [f"{p['name']}: {p['detail']}" for p in result["properties"] if not p["ok"]]
    assert not failed, failed
    figures = result["figures"]
    assert figures["sender"]["acknowledged"] > 0
    assert figures["lost"] == 0
    assert result["timeline"]["fault_windows"], "the fault was injected"
