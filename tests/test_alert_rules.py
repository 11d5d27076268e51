"""Alert rules as pure functions: parsing with clear errors, and matching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from consumers.alert_rules import (
    RulesError,
    burst_fires,
    burst_peak,
    load_rules,
    parse_rules,
    stateless_matches,
)
from consumers.phones import to_e164

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "alert-rules.example.toml"


def normalise(number: str) -> str | None:
    return to_e164(number, "FR")


def one(**rule: Any) -> dict[str, Any]:
    return {"rule": [{"name": "r", **rule}]}


def test_the_example_rules_file_loads() -> None:
    rules = load_rules(EXAMPLE, normalise)
    assert {r.name for r in rules.rules} == {"opt-out", "urgent", "card-number", "burst"}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "no rules"),
        ({"rules": []}, "unknown top-level key"),
        ({"rule": [{"kind": "keyword", "words": ["a"]}]}, "rule #1: 'name'"),
        (one(kind="telepathy"), "rule 'r': 'kind' must be one of"),
        (one(kind="keyword"), "rule 'r': 'words' must be a non-empty list"),
        (one(kind="keyword", words=["a"], targets=["email"]), "rule 'r': 'targets'"),
        (one(kind="keyword", words=["a"], severity="meh"), "rule 'r': 'severity'"),
        (one(kind="keyword", words=["a"], pattern="x"), "rule 'r': unknown key(s) ['pattern']"),
        (one(kind="regex", pattern="(unclosed"), "rule 'r': 'pattern' is not a valid regular"),
        (one(kind="burst", max_messages=0, window_minutes=5), "rule 'r': 'max_messages'"),
        (one(kind="burst", max_messages=5), "rule 'r': 'window_minutes'"),
        (one(kind="blocklist", numbers=["not a number"]), "rule 'r': number #1 in 'numbers'"),
        (one(kind="keyword", words=["a"], directions=["UP"]), "rule 'r': 'directions'"),
        (one(kind="keyword", words=["a"], include_body="yes"), "rule 'r': 'include_body'"),
        (
            {"rule": [{"name": "r", "kind": "opt_out"}, {"name": "r", "kind": "opt_out"}]},
            "rule 'r': the name is used twice",
        ),
    ],
)
def test_bad_rules_are_refused_naming_the_rule_and_the_problem(
    document: dict[str, Any], message: str
) -> None:
    with pytest.raises(
        RulesError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]"),
    ):
        parse_rules(document, normalise)


def test_a_file_that_is_not_toml_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "rules.toml"
    bad.write_text("[[rule]\nname = ")
    with pytest.raises(RulesError, match="not valid TOML"):
        load_rules(bad)
    with pytest.raises(RulesError, match="cannot read"):
        load_rules(tmp_path / "missing.toml")


def test_matching_by_kind_and_direction() -> None:
    rules = parse_rules({"rule": [
        {"name": "urgent", "kind": "keyword", "words": ["urgent", "call me"]},
        {"name": "stop", "kind": "opt_out"},
        {"name": "card", "kind": "regex", "pattern": r"\b\d{16}\b"},
        {"name": "blocked", "kind": "blocklist", "numbers": ["06 11 22 33 44"]},
        {"name": "in-only", "kind": "keyword", "words": ["hello"], "directions": ["RECEIVED"]},
    ]}, normalise).rules  # fmt: skip

    def names(body: str, direction: str = "RECEIVED", sender: str | None = None) -> set[str]:
        return {r.name for r in stateless_matches(rules, body, direction, sender)}

    assert names("This is URGENT!") == {"urgent"}
    assert names("please urgently") == set()  # whole words only
    assert names("Stop.") == {"stop"}
    assert names("STOP", direction="SENT") == set()  # our own opt-out is no signal
    assert names("don't stop me now") == set()  # the first word decides
    assert names("card 4111111111111111 thanks") == {"card"}
    assert names("hi", sender="+33611223344") == {"blocked"}
    assert names("hello", direction="SENT") == set()
    assert names("hello") == {"in-only"}


def test_phrases_match_as_phrases() -> None:
    rules = parse_rules(one(kind="keyword", words=["call me"]), normalise).rules
    assert stateless_matches(rules, "Please CALL  me back", "RECEIVED", None) != []
    assert stateless_matches(rules, "call them, not me", "RECEIVED", None) == []


def test_burst_fires_when_the_count_passes_the_limit() -> None:
    rule = parse_rules(one(kind="burst", max_messages=3, window_minutes=1), None).rules[0]
    assert [burst_fires(n, rule) for n in (1, 3, 4, 5)] == [False, False, True, True]


def test_burst_peak_finds_the_busiest_window_containing_the_message_in_any_order() -> None:
    # Four messages a minute apart, processed newest first (as partitions may deliver them).
    times = [180.0, 0.0, 60.0, 120.0]
    assert burst_peak(times[:1], 180, 600) == (1, 180)
    assert burst_peak(times, 0, 600) == (4, 180)  # the last one processed completes it
    assert burst_peak([0.0, 700.0], 0, 600) == (1, 0)  # 700 is outside any window with 0
    assert burst_peak([0.0, 599.0, 1100.0], 599, 600) == (2, 599)


def test_accents_and_case_are_folded() -> None:
    rules = parse_rules({"rule": [{"name": "stop", "kind": "opt_out", "words": ["ARRET"]},
                                  {"name": "mail", "kind": "keyword", "words": ["e-mail"]}]},
                        normalise).rules  # fmt: skip
    assert [r.name for r in stateless_matches(rules, "Arrêt svp", "RECEIVED", None)] == ["stop"]
    assert [r.name for r in stateless_matches(rules, "send an E-MAIL", "SENT", None)] == ["mail"]
