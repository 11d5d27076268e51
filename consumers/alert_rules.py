"""Alert rules: parsed from a TOML file and evaluated as pure functions.

The rules file is documented in docs/alert-rules.md. A bad file stops the alerts service at
start with a message naming the rule and the problem (RulesError).

Bodies are written by anyone who can text a company line, so matching must cost little and
never depend on what the body holds: regex rules run on RE2 (linear in the text, no
backtracking) and every rule reads at most the first ``MAX_MATCHED_CHARS`` characters.
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import re2

CALL_RULE_KINDS = frozenset({"missed_call", "voicemail"})
"""Rules on calls (the alerts service of call-events); the others are rules on SMS."""
RULE_KINDS = frozenset({"keyword", "regex", "opt_out", "burst", "blocklist"}) | CALL_RULE_KINDS
TARGETS = frozenset({"log", "alertmanager", "slack", "pagerduty"})
SEVERITIES = frozenset({"critical", "error", "warning", "info"})
DIRECTIONS = frozenset({"SENT", "RECEIVED"})
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DEFAULT_OPT_OUT_WORDS = ("STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "ARRET")
MAX_EXCERPT = 160
MAX_MATCHED_CHARS = 4096
"""Rules read this many characters of a body, no more. Far above a real SMS (networks
concatenate at most ~10 parts: ~1,530 GSM-7 or ~670 UCS-2 characters), so no genuine
message is cut, while a forged 8 MiB body costs as much as a 4 KiB one. RE2 is already
linear; this bounds the constant too (RE2's fallback engine costs text x pattern size, and
keyword folding copies the text). docs/alert-rules.md says so for rule authors."""


class CompiledPattern(Protocol):
    """The part of a compiled RE2 pattern the rules use (google-re2 ships no types)."""

    @property
    def pattern(self) -> str: ...

    def search(self, text: str) -> object | None: ...


class RulesError(ValueError):
    """The rules file is unusable; the message names the rule and the problem."""


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    kind: str
    targets: tuple[str, ...]
    severity: str = "warning"
    include_body: bool = False
    directions: frozenset[str] = DIRECTIONS
    summary: str = ""
    resolve_after_minutes: float = 60.0
    # keyword / opt_out
    words: tuple[str, ...] = ()
    # regex
    pattern: CompiledPattern | None = None
    # burst
    max_messages: int = 0
    window_minutes: float = 0.0
    # blocklist (E.164 numbers); missed_call and voicemail: only these numbers (empty: any)
    numbers: frozenset[str] = field(default_factory=frozenset)
    # missed_call: Onoff's callStatus values that mean missed, and the call directions
    # (upper case; empty: any direction)
    statuses: frozenset[str] = field(default_factory=frozenset)
    call_directions: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...]

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(t for r in self.rules for t in r.targets)

    @property
    def burst_rules(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.kind == "burst")


def load_rules(path: Path, normalise: Any = None) -> RuleSet:
    """Read and check a rules file. ``normalise`` turns a blocklist number into E.164."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RulesError(f"{path}: cannot read the rules file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{path}: not valid TOML: {exc}") from None
    return parse_rules(document, normalise)


def parse_rules(document: Mapping[str, Any], normalise: Any = None) -> RuleSet:
    unknown = set(document) - {"rule"}
    if unknown:
        raise RulesError(f"unknown top-level key(s) {sorted(unknown)}; rules are [[rule]] tables")
    entries = document.get("rule", [])
    if not isinstance(entries, list) or not entries:
        raise RulesError("no rules: add at least one [[rule]] table")
    rules: list[Rule] = []
    for position, entry in enumerate(entries, 1):
        rule = _parse_rule(position, entry, normalise)
        if any(r.name == rule.name for r in rules):
            raise RulesError(f"rule {rule.name!r}: the name is used twice")
        rules.append(rule)
    return RuleSet(tuple(rules))


_COMMON = {"name", "kind", "targets", "severity", "include_body", "directions", "summary",
           "resolve_after_minutes"}  # fmt: skip
_BY_KIND = {
    "keyword": {"words"},
    "opt_out": {"words"},
    "regex": {"pattern"},
    "burst": {"max_messages", "window_minutes"},
    "blocklist": {"numbers"},
    "missed_call": {"statuses", "call_directions", "numbers"},
    "voicemail": {"numbers"},
}
# Onoff does not document callStatus and callDirection values: these are our guess, and a
# rule names its own (docs/alert-rules.md).
DEFAULT_MISSED_STATUSES = ("MISSED",)
DEFAULT_MISSED_DIRECTIONS = ("INCOMING",)


def _parse_rule(position: int, entry: Any, normalise: Any) -> Rule:
    if not isinstance(entry, dict):
        raise RulesError(f"rule #{position}: must be a [[rule]] table")
    name = entry.get("name")
    label = f"rule {name!r}" if isinstance(name, str) else f"rule #{position}"
    if not isinstance(name, str) or not _NAME.match(name):
        raise RulesError(f"{label}: 'name' must be 1-63 lower-case letters, digits, '-' or '_'")
    kind = entry.get("kind")
    if kind not in RULE_KINDS:
        raise RulesError(f"{label}: 'kind' must be one of {sorted(RULE_KINDS)}, got {kind!r}")
    extra = set(entry) - _COMMON - _BY_KIND[kind]
    if extra:
        raise RulesError(f"{label}: unknown key(s) {sorted(extra)} for kind {kind!r}")

    targets = entry.get("targets", ["log"])
    if not isinstance(targets, list) or not targets or not set(targets) <= TARGETS:
        raise RulesError(f"{label}: 'targets' must be a non-empty list of {sorted(TARGETS)}")
    severity = entry.get("severity", "warning")
    if severity not in SEVERITIES:
        raise RulesError(f"{label}: 'severity' must be one of {sorted(SEVERITIES)}")
    include_body = entry.get("include_body", False)
    if not isinstance(include_body, bool):
        raise RulesError(f"{label}: 'include_body' must be true or false")
    if kind in CALL_RULE_KINDS and "directions" in entry:
        raise RulesError(
            f"{label}: 'directions' is for SMS rules; a call rule has 'call_directions'"
        )
    directions = entry.get("directions", sorted(DIRECTIONS))
    if not isinstance(directions, list) or not directions or not set(directions) <= DIRECTIONS:
        raise RulesError(f"{label}: 'directions' must be a non-empty list of SENT/RECEIVED")
    summary = entry.get("summary", "")
    if not isinstance(summary, str) or len(summary) > 200:
        raise RulesError(f"{label}: 'summary' must be text of at most 200 characters")
    resolve_after = entry.get("resolve_after_minutes", 60)
    if not isinstance(resolve_after, int | float) or not 1 <= resolve_after <= 7 * 24 * 60:
        raise RulesError(f"{label}: 'resolve_after_minutes' must be a number from 1 to 10080")
    rule = Rule(
        name=name,
        kind=kind,
        targets=tuple(dict.fromkeys(targets)),
        severity=severity,
        include_body=include_body,
        directions=frozenset(directions),
        summary=summary,
        resolve_after_minutes=float(resolve_after),
    )
    return _with_kind_fields(label, rule, entry, normalise)


def _with_kind_fields(label: str, rule: Rule, entry: dict[str, Any], normalise: Any) -> Rule:
    from dataclasses import replace  # noqa: PLC0415

    if rule.kind in ("keyword", "opt_out"):
        default = list(DEFAULT_OPT_OUT_WORDS) if rule.kind == "opt_out" else None
        words = entry.get("words", default)
        if (
            not isinstance(words, list)
            or not words
            or not all(isinstance(w, str) and w.strip() for w in words)
        ):
            raise RulesError(f"{label}: 'words' must be a non-empty list of words")
        directions = rule.directions
        if rule.kind == "opt_out":
            # Opt-outs are what the other party sends us; an opt-out we send is no signal.
            directions = frozenset({"RECEIVED"})
        return replace(
            rule,
            words=tuple(" ".join(_WORD.findall(_fold(w))) for w in words),
            directions=directions,
        )
    if rule.kind == "regex":
        pattern = entry.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise RulesError(f"{label}: 'pattern' must be a regular expression")
        return replace(rule, pattern=_compile_re2(label, pattern))
    if rule.kind == "burst":
        limit, window = entry.get("max_messages"), entry.get("window_minutes")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 100_000:
            raise RulesError(f"{label}: 'max_messages' must be a whole number from 1 to 100000")
        if (
            not isinstance(window, int | float)
            or isinstance(window, bool)
            or not 0 < window <= 1440
        ):
            raise RulesError(f"{label}: 'window_minutes' must be a number above 0 and at most 1440")
        return replace(rule, max_messages=limit, window_minutes=float(window))
    if rule.kind in CALL_RULE_KINDS:
        return _call_rule(label, rule, entry, normalise)
    return replace(rule, numbers=_numbers(label, entry.get("numbers"), normalise))


def _call_rule(label: str, rule: Rule, entry: dict[str, Any], normalise: Any) -> Rule:
    from dataclasses import replace  # noqa: PLC0415

    numbers = _numbers(label, entry["numbers"], normalise) if "numbers" in entry else frozenset()
    if rule.kind == "voicemail":
        return replace(rule, numbers=numbers)
    values = {}
    for key, default in (
        ("statuses", DEFAULT_MISSED_STATUSES),
        ("call_directions", DEFAULT_MISSED_DIRECTIONS),
    ):
        given = entry.get(key, list(default))
        if not isinstance(given, list) or not all(isinstance(v, str) and v.strip() for v in given):
            raise RulesError(f"{label}: '{key}' must be a list of Onoff's values (text)")
        values[key] = frozenset(v.strip().upper() for v in given)
    if not values["statuses"]:
        raise RulesError(f"{label}: 'statuses' must name at least one callStatus value")
    return replace(
        rule,
        numbers=numbers,
        statuses=values["statuses"],
        call_directions=values["call_directions"],
    )


def _numbers(label: str, numbers: Any, normalise: Any) -> frozenset[str]:
    if not isinstance(numbers, list) or not numbers or not all(isinstance(n, str) for n in numbers):
        raise RulesError(f"{label}: 'numbers' must be a non-empty list of phone numbers")
    normalised = set()
    for index, number in enumerate(numbers, 1):
        e164 = normalise(number) if normalise is not None else number
        if e164 is None:
            # The position, not the number: the rules file may be shown in logs.
            raise RulesError(f"{label}: number #{index} in 'numbers' is not a phone number")
        normalised.add(e164)
    return frozenset(normalised)


def _re2_options() -> Any:
    options = re2.Options()
    # RE2 folds case by Unicode simple case folding: ÉTÉ matches été, as Python's re did.
    options.case_sensitive = False
    # A refused pattern is reported once, in RulesError; RE2 would also print it to stderr.
    options.log_errors = False
    return options


_RE2_OPTIONS = _re2_options()


def _compile_re2(label: str, pattern: str) -> CompiledPattern:
    """The pattern on RE2, or RulesError naming the rule. RE2 refuses what needs
    backtracking (backreferences, lookahead/lookbehind), and Python-only syntax such as
    \\Z (write \\z) or (?x); the message says what RE2 found, never any body."""
    try:
        compiled: CompiledPattern = re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else ""
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        # RE2 appends the offending fragment ("missing ): (0611…"): keep its error code only,
        # as the blocklist's errors name a position, never a number from the rules file.
        reason = str(reason).split(":", 1)[0]
        raise RulesError(
            f"{label}: 'pattern' is not a valid RE2 regular expression ({reason}); RE2 has no "
            "backreferences or lookarounds, see docs/alert-rules.md#regex"
        ) from None
    return compiled


# Python's re on purpose: keywords are whole Unicode words (ARRÊT, Größe), and \w+ alone
# cannot backtrack (findall is linear); the text is cut to MAX_MATCHED_CHARS first anyway.
_WORD = re.compile(r"\w+", re.UNICODE)


def _fold(text: str) -> str:
    """Case and accents folded: ARRÊT, Arrêt and arret are one word."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def stateless_matches(
    rules: Iterable[Rule], body: str, direction: str, sender: str | None
) -> list[Rule]:
    """Rules other than burst that this message matches. ``sender`` is the external number
    in E.164 (None when it cannot be read). Only the first ``MAX_MATCHED_CHARS`` characters
    are read: a pattern's ``$`` is the end of that part."""
    body = body[:MAX_MATCHED_CHARS]
    folded = _WORD.findall(_fold(body))
    # Folded once per message, not once per rule: " a b c " finds phrases, the set words.
    flat, words = f" {' '.join(folded)} ", set(folded)
    return [
        r for r in rules if direction in r.directions and _matches(r, body, words, flat, sender)
    ]


def _matches(rule: Rule, body: str, words: set[str], flat: str, sender: str | None) -> bool:
    if rule.kind == "keyword":
        # A word matches whole words; a phrase matches its words in a row, spacing ignored.
        return any((w in words) if " " not in w else (f" {w} " in flat) for w in rule.words)
    if rule.kind == "opt_out":
        return _is_opt_out(body, rule.words)
    if rule.kind == "regex":
        return rule.pattern is not None and rule.pattern.search(body) is not None
    if rule.kind == "blocklist":
        return sender is not None and sender in rule.numbers
    return False  # burst rules need state: see burst_fires


def _is_opt_out(body: str, words: Sequence[str]) -> bool:
    # "STOP", "Stop.", "stop please": the first word decides, as carriers treat opt-outs.
    first = _WORD.findall(_fold(body[:64]))
    return bool(first) and first[0] in words


def call_matches(
    rules: Iterable[Rule],
    event_name: str,
    status: str | None,
    direction: str | None,
    other_party: str | None,
) -> list[Rule]:
    """Call rules this call matches. ``other_party`` is the external number in E.164 (None
    when it cannot be read); status and direction are compared in upper case."""
    status_up, direction_up = (status or "").upper(), (direction or "").upper()

    def fits(rule: Rule) -> bool:
        if rule.numbers and other_party not in rule.numbers:
            return False
        if rule.kind == "voicemail":
            return event_name == "VM"
        # A voicemail is reported by the voicemail rule alone, whatever status it carries.
        return (
            rule.kind == "missed_call"
            and event_name != "VM"
            and status_up in rule.statuses
            and (not rule.call_directions or direction_up in rule.call_directions)
        )

    return [rule for rule in rules if fits(rule)]


def burst_peak(times: Sequence[float], at: float, window: float) -> tuple[int, float]:
    """The busiest window of length ``window`` that contains the message at ``at``: how many
    messages it holds, and when it ends (at one of the messages).

    Messages reach the consumer in partition order, not time order (partitions are keyed by
    event id), so the window that a late-processed message completes may end after it.
    """
    ordered = sorted(times)
    best, best_end, start = 0, at, 0
    for end_index, end in enumerate(ordered):
        while ordered[start] <= end - window:
            start += 1
        if at <= end < at + window and end_index - start + 1 > best:
            best, best_end = end_index - start + 1, end
    return best, best_end


def burst_fires(count_in_window: int, rule: Rule) -> bool:
    """The burst rule fires when a window holds more than ``max_messages``."""
    return count_in_window > rule.max_messages


def excerpt(body: str) -> str:
    """A body excerpt for rules that allow one: short, single line."""
    # Only the part rules read is flattened: splitting a forged 8 MiB body costs for nothing.
    flat = " ".join(body[:MAX_MATCHED_CHARS].split())
    return flat if len(flat) <= MAX_EXCERPT else flat[: MAX_EXCERPT - 1] + "…"
