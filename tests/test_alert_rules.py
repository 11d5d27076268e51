"""Alert rules as pure functions: parsing with clear errors, and matching."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from consumers.alert_rules import (
    MAX_MATCHED_CHARS,
    Rule,
    RulesError,
    burst_fires,
    burst_peak,
    call_matches,
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
    assert {r.name for r in rules.rules} == {
        "opt-out",
        "urgent",
        "card-number",
        "burst",
        "missed-call",
        "voicemail",
    }


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
        (one(kind="regex", pattern="(unclosed"), "rule 'r': 'pattern' is not a valid RE2 regular"),
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


# --- regex rules run on RE2: linear time, whatever the body -----------------------------------

SIXTY_KB = 60 * 1024


def regex_rule(pattern: str) -> Rule:
    return parse_rules(one(kind="regex", pattern=pattern), normalise).rules[0]


def test_regex_rules_compile_with_re2_not_python_re() -> None:
    """The engine is RE2 (linear in the text), not Python's backtracking ``re``."""
    rule = regex_rule(r"(\w+\s?)+$")
    assert type(rule.pattern).__module__ == "re2"


@pytest.mark.parametrize(
    ("pattern", "body", "full_text_matches", "cut_text_matches"),
    [
        # Catastrophic for a backtracking engine: 3.7 s on 25 characters with Python's re.
        (r"(\w+\s?)+$", "a" * SIXTY_KB + "!", False, True),  # the cut drops the "!"
        (r"(\w+\s?)+$", "word " * (SIXTY_KB // 5) + "!", False, True),
        # Quadratic for a backtracking engine: about 30 s on 60 KB of spaces.
        (r"\s+$", " " * SIXTY_KB + "x", False, True),  # the cut drops the "x"
        (r"\s+$", "x" + " " * SIXTY_KB, True, True),
    ],
)
def test_backtracking_patterns_on_60_kb_bodies_finish_with_the_right_answer(
    pattern: str, body: str, full_text_matches: bool, cut_text_matches: bool
) -> None:
    """Both on the whole 60 KB text (the engine alone) and through the rule matcher (which
    reads the first MAX_MATCHED_CHARS characters): the right answer, in far less than the
    seconds a backtracking engine needs. The bound is generous: speed targets are in bench/."""
    rule = regex_rule(pattern)
    assert type(rule.pattern).__module__ == "re2"
    assert rule.pattern is not None
    started = time.perf_counter()
    assert (rule.pattern.search(body) is not None) is full_text_matches
    assert bool(stateless_matches([rule], body, "RECEIVED", None)) is cut_text_matches
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("pattern", "construct"),
    [
        (r"(\w)\1", "backreference"),
        (r"(?P<d>\d)(?P=d)", "backreference"),
        (r"card(?=\d)", "lookahead"),
        (r"(?<!no )stop", "lookbehind"),
        (r"(?!x)y", "lookahead"),
        (r"end\Z", r"\Z"),
        (r"(?x) a b", "verbose"),
    ],
)
def test_patterns_re2_cannot_run_are_refused_at_load_naming_the_rule(
    pattern: str, construct: str
) -> None:
    """A Python-only construct is refused at start, not silently misread at match time."""
    with pytest.raises(RulesError, match=r"^rule 'r': 'pattern' is not a valid RE2") as caught:
        parse_rules(one(kind="regex", pattern=pattern), normalise)
    assert "docs/alert-rules.md" in str(caught.value)


def test_a_refused_pattern_is_not_quoted_in_the_error() -> None:
    """A rules file may hold numbers to watch for; the start-up error, which reaches the pod
    log, gives RE2's error code and never the pattern's text (RE2 appends the fragment)."""
    with pytest.raises(RulesError, match=r"\(missing \)\)") as caught:
        parse_rules(one(kind="regex", pattern="(0611223344|0699887766"), normalise)
    assert "0611223344" not in str(caught.value)


def test_regex_rules_are_case_insensitive_beyond_ascii_and_classes_are_ascii() -> None:
    """What docs/alert-rules.md says changed from Python's re: case folding is still Unicode,
    but \\w, \\d, \\s and \\b are ASCII; \\p{L} and \\p{N} are the Unicode classes."""
    rule = regex_rule(r"été|card")
    assert stateless_matches([rule], "Bon ÉTÉ !", "RECEIVED", None) == [rule]
    assert stateless_matches([rule], "CARD", "RECEIVED", None) == [rule]
    assert stateless_matches([regex_rule(r"^\w+$")], "Arrêt", "RECEIVED", None) == []
    assert stateless_matches([regex_rule(r"\bété\b")], "Bon été", "RECEIVED", None) == []
    letters = regex_rule(r"^\p{L}+$")
    assert stateless_matches([letters], "Arrêt", "RECEIVED", None) == [letters]
    digits = regex_rule(r"^\p{N}+$")
    assert stateless_matches([digits], "١٢٣", "RECEIVED", None) == [digits]  # Arabic-Indic


def test_rules_read_only_the_first_max_matched_chars_of_a_body() -> None:
    """Keywords and patterns see the first MAX_MATCHED_CHARS characters: the cost of one
    message is bounded whatever its size; opt-outs read the first word only, as before."""
    rules = parse_rules(
        {"rule": [
            {"name": "kw", "kind": "keyword", "words": ["urgent"]},
            {"name": "rx", "kind": "regex", "pattern": "card"},
        ]},
        normalise,
    ).rules  # fmt: skip
    filler = "x " * (MAX_MATCHED_CHARS // 2)
    assert len(filler) == MAX_MATCHED_CHARS
    inside = filler[: MAX_MATCHED_CHARS - 12] + "urgent card"
    assert {r.name for r in stateless_matches(rules, inside, "RECEIVED", None)} == {"kw", "rx"}
    assert stateless_matches(rules, filler + "urgent card", "RECEIVED", None) == []


def test_the_example_rules_compile_with_re2() -> None:
    rules = load_rules(EXAMPLE, normalise)
    assert all(type(r.pattern).__module__ == "re2" for r in rules.rules if r.kind == "regex")


# --- call rules ------------------------------------------------------------------------------


def test_call_rules_default_to_missed_incoming_calls_from_anyone() -> None:
    [missed, vm] = parse_rules(
        {"rule": [{"name": "m", "kind": "missed_call"}, {"name": "v", "kind": "voicemail"}]},
        normalise,
    ).rules
    assert (missed.statuses, missed.call_directions, missed.numbers) == (
        frozenset({"MISSED"}),
        frozenset({"INCOMING"}),
        frozenset(),
    )
    assert vm.numbers == frozenset()


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"kind": "missed_call", "directions": ["RECEIVED"]}, "call_directions"),
        ({"kind": "missed_call", "statuses": []}, "at least one callStatus"),
        ({"kind": "missed_call", "statuses": "MISSED"}, "'statuses' must be a list"),
        ({"kind": "missed_call", "call_directions": [3]}, "'call_directions' must be a list"),
        ({"kind": "voicemail", "numbers": ["not a number"]}, "number #1 in 'numbers'"),
        ({"kind": "voicemail", "words": ["x"]}, "unknown key"),
    ],
)
def test_bad_call_rules_are_refused_naming_the_rule(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(RulesError, match=message):
        parse_rules(one(**rule), normalise)


def test_call_rules_match_calls_and_sms_rules_do_not() -> None:
    rules = parse_rules(
        {
            "rule": [
                {"name": "m", "kind": "missed_call", "numbers": ["0612345678"]},
                {"name": "any", "kind": "missed_call", "statuses": ["missed", "NO_ANSWER"],
                 "call_directions": []},
                {"name": "v", "kind": "voicemail"},
                {"name": "k", "kind": "keyword", "words": ["missed"]},
            ]
        },
        normalise,
    ).rules  # fmt: skip
    key = "+33612345678"

    def names(*call: Any) -> set[str]:
        return {r.name for r in call_matches(rules, *call)}

    assert names("CDR", "MISSED", "INCOMING", key) == {"m", "any"}
    assert names("CDR", "no_answer", "outgoing", key) == {"any"}  # any direction, any case
    assert names("CDR", "MISSED", "INCOMING", "+33699887766") == {"any"}
    assert names("CDR", "ANSWERED", "INCOMING", key) == set()
    assert names("VM", None, None, None) == {"v"}
    assert names("VM", "MISSED", "INCOMING", key) == {"v"}  # one alert for one voicemail
    assert stateless_matches(rules, "missed", "RECEIVED", key) == [rules[3]]
