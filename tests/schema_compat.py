"""Is a topic's new schema compatible with the last released one? A pure function of the two.

Records stay on a topic for days (7 on sms-events, 30 on the DLQs), and during a rollout
consumers of both versions run side by side. A change is compatible when every record the
released schema allows is still allowed, read the same way:

- no new required field, and no required field dropped (readers rely on it);
- no narrowed type, no removed enum value or changed const;
- no tighter bound (maxLength, minLength, minimum, maximum), no changed pattern or format;
- additional properties still allowed;
- a new property may be added if it is optional (Onoff adds fields; ours name them);
- the same rules for every property and array item, recursively.

The keywords our schemas use are the ones checked; any other keyword that changes is reported
as a break rather than guessed at.
"""

from __future__ import annotations

import operator
from typing import Any

_ANNOTATIONS = frozenset({"$schema", "$id", "title", "description", "examples", "$comment"})
_CHECKED = frozenset(
    {
        "type",
        "enum",
        "const",
        "required",
        "properties",
        "additionalProperties",
        "items",
        "maxLength",
        "minLength",
        "maximum",
        "minimum",
        "pattern",
        "format",
    }
)


def breaking_changes(released: Any, new: Any, path: str = "") -> list[str]:
    """What ``new`` breaks of ``released``, one line per break (empty: compatible)."""
    where = path or "/"
    if released is True or released == {}:
        return [] if new is True or new == {} else [f"{where}: was unconstrained, now constrained"]
    if not isinstance(released, dict) or not isinstance(new, dict):
        return [] if released == new else [f"{where}: changed"]
    breaks: list[str] = []
    breaks += _types(released, new, where)
    breaks += _values(released, new, where)
    breaks += _bounds(released, new, where)
    breaks += _objects(released, new, path)
    if "items" in released or "items" in new:
        breaks += breaking_changes(
            released.get("items", True), new.get("items", True), f"{path}/items"
        )
    for keyword in sorted((set(released) | set(new)) - _CHECKED - _ANNOTATIONS):
        if released.get(keyword) != new.get(keyword):
            breaks.append(f"{where}: '{keyword}' changed (not a keyword this check knows)")
    return breaks


def _type_set(schema: dict[str, Any]) -> set[str] | None:
    kind = schema.get("type")
    if kind is None:
        return None
    kinds = {kind} if isinstance(kind, str) else set(kind)
    if "number" in kinds:
        kinds.add("integer")
    return kinds


def _types(released: dict[str, Any], new: dict[str, Any], where: str) -> list[str]:
    old_types, new_types = _type_set(released), _type_set(new)
    if new_types is None or (old_types is not None and old_types <= new_types):
        return []
    if old_types is None:
        return [f"{where}: now restricted to type {sorted(new_types)}"]
    return [f"{where}: type {sorted(old_types - new_types)} no longer allowed"]


def _values(released: dict[str, Any], new: dict[str, Any], where: str) -> list[str]:
    breaks = []
    old_values = released.get("enum")
    if "const" in released:
        old_values = [released["const"]]
    new_values = new.get("enum")
    if "const" in new:
        new_values = [new["const"]]
    if new_values is not None:
        if old_values is None:
            breaks.append(f"{where}: now limited to {new_values}")
        else:
            removed = [v for v in old_values if v not in new_values]
            if removed:
                breaks.append(f"{where}: value(s) {removed} removed")
    return breaks


def _bounds(released: dict[str, Any], new: dict[str, Any], where: str) -> list[str]:
    breaks = []
    for keyword, tighter in (
        ("maxLength", operator.gt),  # released > new: tighter
        ("maximum", operator.gt),
        ("minLength", operator.lt),
        ("minimum", operator.lt),
    ):
        if keyword not in new:
            continue
        if keyword not in released:
            breaks.append(f"{where}: new bound {keyword} {new[keyword]}")
        elif tighter(released[keyword], new[keyword]):
            breaks.append(f"{where}: {keyword} {released[keyword]} -> {new[keyword]}")
    for keyword in ("pattern", "format"):
        if keyword in new and new.get(keyword) != released.get(keyword):
            breaks.append(f"{where}: {keyword} {released.get(keyword)!r} -> {new[keyword]!r}")
    return breaks


def _objects(released: dict[str, Any], new: dict[str, Any], path: str) -> list[str]:
    where = path or "/"
    breaks = []
    old_required, new_required = set(released.get("required", ())), set(new.get("required", ()))
    if new_required - old_required:
        breaks.append(f"{where}: new required field(s) {sorted(new_required - old_required)}")
    if old_required - new_required:
        breaks.append(f"{where}: field(s) {sorted(old_required - new_required)} no longer required")
    if (
        released.get("additionalProperties", True) is not False
        and new.get("additionalProperties", True) is not True
    ):
        breaks.append(f"{where}: additional properties no longer allowed")
    old_properties = released.get("properties", {})
    for name, schema in new.get("properties", {}).items():
        if name in old_properties:
            breaks += breaking_changes(old_properties[name], schema, f"{path}/{name}")
    for name in old_properties:
        if (
            name not in new.get("properties", {})
            and new.get("additionalProperties", True) is not True
        ):
            breaks.append(f"{where}: property {name!r} removed")
    return breaks
