"""The soak's pure pieces (tests/fault/soak.py): no cluster, no vegeta."""

from __future__ import annotations

import base64
import csv
import io
import os

import orjson
import pytest

from tests.fault.soak import (
    END_MARKER,
    START_MARKER,
    Answer,
    Tally,
    fd_links,
    flatness,
    id_from_url,
    inbound_sockets,
    percentile,
    read_answers,
    replace_between_markers,
    rss_kb,
    socket_inode,
    target_line,
)

URL = "http://127.0.0.1:8080/v1/onoff/sms"


def test_flat_series_passes_and_growth_is_measured() -> None:
    points = [(0.0, 40.0), (10.0, 50.0), (20.0, 52.0), (30.0, 54.0), (40.0, 57.0)]
    f = flatness(points, warmup=20, end=40)
    assert f.ok
    assert f.baseline == 52.0
    assert f.peak == 57.0
    assert f.first == 40.0  # at rest: shown, not judged
    assert f.growth == pytest.approx(57 / 52 - 1)


def test_growth_over_ten_percent_after_warmup_fails() -> None:
    points = [(0.0, 100.0), (20.0, 100.0), (30.0, 105.0), (40.0, 110.5)]
    assert not flatness(points, warmup=20, end=40).ok
    assert flatness(points[:3], warmup=20, end=40).ok


def test_warmup_growth_and_later_dips_do_not_count() -> None:
    points = [(0.0, 10.0), (10.0, 80.0), (20.0, 100.0), (30.0, 90.0), (40.0, 109.0)]
    assert flatness(points, warmup=20, end=40).ok


def test_samples_after_the_load_are_not_judged() -> None:
    points = [(20.0, 100.0), (30.0, 100.0), (60.0, 500.0)]
    assert flatness(points, warmup=20, end=40).ok


def test_a_vanished_process_or_too_few_samples_fail() -> None:
    assert not flatness([(20.0, 100.0), (30.0, None)], warmup=20, end=40).ok
    assert not flatness([(20.0, 100.0)], warmup=20, end=40).ok
    assert not flatness([], warmup=20, end=40).ok


def test_target_line_is_a_vegeta_json_target_with_the_id_in_the_url() -> None:
    line = target_line(URL, "abc-1", b'{"id":"abc-1"}', "key")
    assert line.endswith(b"\n")
    target = orjson.loads(line)
    assert target["method"] == "POST"
    assert target["url"] == URL + "?id=abc-1"
    assert target["header"]["Authorization"] == ["x-api-key key"]
    assert base64.b64decode(target["body"]) == b'{"id":"abc-1"}'
    assert id_from_url(target["url"]) == "abc-1"
    assert id_from_url(URL) is None


def _row(ts: int, code: int, latency_ns: int, error: str, url: str) -> str:
    out = io.StringIO()
    csv.writer(out).writerow([ts, code, latency_ns, 400, 22, error, "e30=", "", 7, "POST", url, ""])
    return out.getvalue()


def test_results_are_tallied_per_window_with_ids() -> None:
    origin = 1_000_000_000_000
    rows = [
        _row(origin + 1_000_000, 200, 2_000_000, "", URL + "?id=a"),
        _row(origin + 9_000_000_000, 200, 4_000_000, "", URL + "?id=b"),
        _row(origin + 10_500_000_000, 503, 1_000_000, "", URL + "?id=c"),
        _row(origin + 11_000_000_000, 0, 11_000_000_000, "Post: timeout, awaiting", URL + "?id=d"),
        _row(origin + 12_000_000_000, 200, 3_000_000, "", URL),
    ]
    tally = Tally(origin, 10.0)
    read_answers(io.StringIO("".join(rows)), tally)
    assert tally.requests == 5
    assert tally.errors == 2
    assert tally.ids == ["a", "b", "c", "d"]
    assert tally.acknowledged == {"a", "b"}
    assert tally.unidentified == 1
    assert tally.outcomes == {"200": 3, "503": 1, "timeout": 1}
    windows = tally.window_summaries()
    assert [w["start"] for w in windows] == [0.0, 10.0]
    assert windows[0]["requests"] == 2
    assert windows[0]["max_ms"] == 4.0
    assert windows[1]["outcomes"] == {"503": 1, "timeout": 1, "200": 1}


def test_answer_outcomes() -> None:
    assert Answer(0, 0, 0, "dial tcp: connect: connection refused", URL).outcome == "refused"
    assert Answer(0, 0, 0, "context deadline exceeded", URL).outcome == "timeout"
    assert Answer(0, 0, 0, "EOF", URL).outcome == "error"
    assert Answer(0, 200, 0, "", URL).outcome == "200"


def test_percentile_is_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 0.5) == 51.0
    assert percentile(values, 0.99) == 100.0
    assert percentile([], 0.99) == 0.0


def test_inbound_sockets_reads_established_connections_on_the_port() -> None:
    table = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
        "timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 111\n"
        "   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000 0 0 222\n"
        "   2: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000 0 0 333\n"
        "   3: 0100007F:1F90 0100007F:D432 08 00000000:00000000 00:00000000 00000000 0 0 444\n"
    )
    # Port 0x1F90 = 8080: 111 listens, 222 is accepted, 333 is the client's end, 444 CLOSE_WAIT.
    assert inbound_sockets([table], 8080) == {222}
    assert socket_inode("socket:[222]") == 222
    assert socket_inode("/var/lib/x") is None


def test_proc_readers_on_this_process() -> None:
    assert (rss_kb(os.getpid()) or 0) > 1000
    links = fd_links(os.getpid())
    assert links is not None
    assert len(links) >= 3
    assert rss_kb(2**22 + 12345) is None


def test_markers_are_replaced_or_appended() -> None:
    doc = f"# Soak\n\nintro\n\n{START_MARKER}\nold\n{END_MARKER}\n\nafter\n"
    new = replace_between_markers(doc, "new figures")
    assert new == f"# Soak\n\nintro\n\n{START_MARKER}\nnew figures\n{END_MARKER}\n\nafter\n"
    assert replace_between_markers(new, "new figures") == new
    appended = replace_between_markers("# Soak\n", "x")
    assert appended.endswith(f"{START_MARKER}\nx\n{END_MARKER}\n")
    with pytest.raises(ValueError, match="exactly one"):
        replace_between_markers(doc + START_MARKER, "x")


def test_descriptors_may_move_by_the_slack_but_not_grow_past_it() -> None:
    """15 → 17 → 15 descriptors is a transient socket, not a leak; 15 → 21 is growth."""
    transient = [(20.0, 15.0), (30.0, 17.0), (40.0, 15.0)]
    assert not flatness(transient, warmup=20, end=40).ok  # 10 % alone: +13 % fails
    assert flatness(transient, warmup=20, end=40, slack=5).ok
    assert not flatness([(20.0, 15.0), (30.0, 21.0)], warmup=20, end=40, slack=5).ok
