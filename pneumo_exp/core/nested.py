"""Dotted-key look-ups in nested dicts (a run's config as YAML or as W&B stored it)."""

from __future__ import annotations

from typing import Any


def nested_value(mapping: dict, dotted_key: str, default: Any = None) -> Any:
    node: Any = mapping
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node
