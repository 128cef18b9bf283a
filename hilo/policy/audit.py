"""The audit of policy changes: each new version stored with what changed (flattened paths,
before and after) and a one-line summary.
"""

from __future__ import annotations

from typing import Any


def flatten(document: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf values by dotted path; an empty mapping has no leaves."""
    if isinstance(document, dict):
        flat: dict[str, Any] = {}
        for key, value in document.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: document}


def diff(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """What changed, path by path (lists compare whole)."""
    old, new = flatten(before), flatten(after)
    changes = []
    for path in sorted(old.keys() | new.keys()):
        if old.get(path) != new.get(path):
            changes.append({"path": path, "before": old.get(path), "after": new.get(path)})
    return changes


def summary(changes: list[dict[str, Any]]) -> str:
    if not changes:
        return "no change"
    return "; ".join(f"{c['path']}: {c['before']!r} -> {c['after']!r}" for c in changes)
