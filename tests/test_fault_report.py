"""tests/fault/report.py: a fault run's JSON → docs/reliability.md and one PNG per scenario."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fault.report import (
    END_MARKER,
    START_MARKER,
    Chart,
    Timeline,
    draw_timeline,
    main,
    render_markdown,
    replace_between_markers,
    write_report,
)

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _timeline(seconds: int = 40) -> dict[str, Any]:
    ts = list(range(seconds))
    down = range(10, 25)
    return {
        "seconds": ts,
        "answers": {
            "200": [0 if t in down else 400 for t in ts],
            "503": [380 if t in down else 0 for t in ts],
            "timeout": [20 if t in down else 0 for t in ts],
            "refused": [0] * seconds,
        },
        "in_flight": [[t / 2, 40 + (900 if 20 <= t < 50 else 0)] for t in range(2 * seconds)],
        "lag": {
            "warehouse": [[t, 5000 if t in down else 12] for t in ts],
            "alerts": [[t, 300 if t in down else 0] for t in ts],
        },
        "fault_windows": [[10, 25, "broker down"]],
    }


def _run() -> dict[str, Any]:
    return {
        "started_at": "2026-11-27T18:40:00Z",
        "finished_at": "2026-11-27T19:02:00Z",
        "git_commit": "abc1234",
        "machine": "2 cores, 24 GiB",
        "quick": False,
        "scenarios": [
            {
                "name": "broker-kill-15s",
                "title": "Broker SIGKILLed, down 15 s",
                "ok": False,
                "rate": 400,
                "seconds": 60,
                "properties": [
                    {"name": "acknowledged-is-durable", "ok": True, "detail": "23990 got a 200"},
                    {"name": "exactly-once-warehouse", "ok": False, "detail": "3 | ids twice"},
                ],
                "figures": {
                    "sender": {
                        "unique_events": 24000,
                        "copies": 1200,
                        "requests": 26000,
                        "acknowledged": 23990,
                        "gave_up": 10,
                        "answers": {"200": 25000, "503": 900, "timeout": 3},
                        "disconnects_mid_request": 0,
                        "duration_seconds": 75.2,
                    },
                    "lost": 0,
                    "gave_up": 10,
                    "delivered_twice": {"warehouse": 3, "alerts": 0},
                    "dead_lettered": {"warehouse": 0, "alerts": 1},
                    "missing": {"warehouse": 0, "alerts": 0},
                    "recover_seconds": 4.25,
                    "p99_ms_fault": 5100.0,
                    "p99_ms_calm": 12.0,
                },
                "timeline": _timeline(),
                "error": None,
            },
            {
                "name": "postgres-restart",
                "title": "PostgreSQL restarted",
                "ok": False,
                "rate": 400,
                "seconds": 60,
                "properties": [],
                "figures": {},
                "timeline": {},
                "error": "RuntimeError: postgres did not come back\n```\nits log\n```",
            },
        ],
    }


def _generated(document: str) -> str:
    return document.split(START_MARKER, 1)[1].split(END_MARKER, 1)[0]


def _table_rows(document: str) -> list[list[str]]:
    rows = [line for line in _generated(document).splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in row.strip("|").split(" | ")] for row in rows]
    return [row for row in cells[1:] if not set(row[0]) <= {"-", ":", " "}]


def test_report_writes_the_table_sections_and_pngs(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    write_report(_run(), docs)
    document = (docs / "reliability.md").read_text(encoding="utf-8")

    assert document.startswith("# Reliability")
    assert document.count(START_MARKER) == document.count(END_MARKER) == 1
    generated = _generated(document)
    assert "2026-11-27 18:40 UTC, 22 min" in generated
    assert "`abc1234`" in generated
    assert "2 cores, 24 GiB" in generated
    assert "all (`make fault`)" in generated

    kill, postgres = _table_rows(document)
    assert kill == [
        "[Broker SIGKILLed, down 15 s](#broker-sigkilled-down-15-s)",
        "**FAIL**",
        "24,000",
        "23,990",
        "10",
        "0",
        "warehouse 3 · alerts 0",
        "warehouse 0 · alerts 1",
        "4.2",
        "5,100 vs 12.0",
    ]
    assert postgres[0] == "[PostgreSQL restarted](#postgresql-restarted)"
    assert postgres[1].startswith("**FAIL** (crashed; no chart")
    assert postgres[2:] == ["—"] * 8

    assert "### Broker SIGKILLed, down 15 s" in generated
    assert "- ✅ **acknowledged-is-durable**: 23990 got a 200" in generated
    assert "- ❌ **exactly-once-warehouse**: 3 | ids twice" in generated
    assert "![Broker SIGKILLed, down 15 s](reliability/broker-kill-15s.png)" in generated
    assert "### PostgreSQL restarted" in generated
    assert "RuntimeError: postgres did not come back" in generated
    assert "````text" in generated  # the error holds a fence: a longer one around it
    assert "reliability/postgres-restart.png" not in generated

    png = docs / "reliability" / "broker-kill-15s.png"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1000, 700)
    assert 10_000 < len(data) < 300_000
    assert not (docs / "reliability" / "postgres-restart.png").exists()


def test_second_run_replaces_only_the_generated_part(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    before = "# Reliability\n\nHand-written intro.\n\n"
    after = "\n\n## Notes\n\nWritten by hand, kept.\n"
    (docs / "reliability.md").write_text(
        f"{before}{START_MARKER}\nstale table\n{END_MARKER}{after}", encoding="utf-8"
    )
    write_report(_run(), docs)
    first = (docs / "reliability.md").read_text(encoding="utf-8")
    assert first.startswith(before + START_MARKER)
    assert first.endswith(END_MARKER + after)
    assert "stale table" not in first

    run = _run()
    run["git_commit"] = "def5678"
    run["quick"] = True
    run["scenarios"][0]["figures"]["lost"] = 7
    write_report(run, docs)
    second = (docs / "reliability.md").read_text(encoding="utf-8")
    assert second.startswith(before + START_MARKER)
    assert second.endswith(END_MARKER + after)
    assert "`def5678`" in second
    assert "abc1234" not in second
    assert "the quick subset" in second
    assert _table_rows(second)[0][5] == "7"
    assert second.count(START_MARKER) == second.count(END_MARKER) == 1

    write_report(run, docs)  # the same run again: the same document
    assert (docs / "reliability.md").read_text(encoding="utf-8") == second


def test_markers_are_appended_to_a_document_without_them() -> None:
    document = replace_between_markers("# Reliability\n\nOld text.\n", "generated\n")
    assert document == f"# Reliability\n\nOld text.\n\n{START_MARKER}\ngenerated\n{END_MARKER}\n"


@pytest.mark.parametrize(
    "document",
    [
        f"{START_MARKER}\nno end\n",
        f"{END_MARKER}\n{START_MARKER}\n",
        f"{START_MARKER}\n{END_MARKER}\n{START_MARKER}\n{END_MARKER}\n",
    ],
)
def test_broken_markers_are_refused_not_guessed(document: str) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        replace_between_markers(document, "generated")


def test_partial_series_still_draw(tmp_path: Path) -> None:
    """A scenario that crashed mid-load: short answer series, no lag, a window left open."""
    run = _run()
    crashed = run["scenarios"][1]
    crashed["timeline"] = {
        "seconds": [0, 1, 2, 3],
        "answers": {"200": [10, 10], "599": [None, 1, 2, 3, 4, 5]},
        "in_flight": [[0, 1], ["bad"], [3.5, 2]],
        "lag": {"warehouse": []},
        "fault_windows": [[2, None, "postgres down"], ["x"]],
    }
    write_report(run, tmp_path)
    png = tmp_path / "reliability" / "postgres-restart.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    document = (tmp_path / "reliability.md").read_text(encoding="utf-8")
    assert "![PostgreSQL restarted](reliability/postgres-restart.png)" in document
    assert _table_rows(document)[1][1] == "**FAIL** (crashed)"


def test_spool_depth_is_parsed_and_drawn_beside_the_lag(tmp_path: Path) -> None:
    timeline = Timeline.parse(
        {
            "seconds": [0, 1, 2],
            "answers": {"200": [5, 5, 5]},
            "lag": {"warehouse": [[0, 0], [1, 3], [2, 0]]},
            "spool": [[0, 0], [1, 40], [2, 12], ["bad"]],
        }
    )
    assert timeline.spool == ([0.0, 1.0, 2.0], [0.0, 40.0, 12.0])
    assert not Timeline.parse({"spool": [[0, 7]]}).empty  # a spool alone is worth a chart
    path = tmp_path / "spool.png"
    draw_timeline("Broker down", timeline, path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_without_matplotlib_the_markdown_is_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    write_report(_run(), tmp_path)
    document = (tmp_path / "reliability.md").read_text(encoding="utf-8")
    assert "no chart: matplotlib is not installed" in _table_rows(document)[0][1]
    assert "![" not in document
    assert not (tmp_path / "reliability").exists()
    assert "charts not drawn" in capsys.readouterr().err


def test_importing_the_module_does_not_import_matplotlib() -> None:
    code = "import sys, tests.fault.report; sys.exit('matplotlib' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_command_line_reads_the_json_next_to_the_docs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    (docs / "reliability").mkdir(parents=True)
    (docs / "reliability" / "last-run.json").write_text(json.dumps(_run()), encoding="utf-8")
    assert main(["--docs", str(docs)]) == 0
    assert "(2 scenarios)" in capsys.readouterr().out
    assert len(_table_rows((docs / "reliability.md").read_text(encoding="utf-8"))) == 2

    elsewhere = tmp_path / "run.json"
    elsewhere.write_text("[]", encoding="utf-8")
    with pytest.raises(SystemExit):
        main([str(elsewhere), "--docs", str(docs)])


def test_markdown_renders_without_any_chart() -> None:
    text = render_markdown({"scenarios": [{"name": "x", "ok": True}]}, {"x": Chart(None, "off")})
    assert "| [x](#x) | PASS (no chart: off) |" in text
    assert "0 of 1" not in text
    assert "1 of 1 scenarios passed" in text
