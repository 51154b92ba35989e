"""Every job config class in the package: each dataclass whose fields are declared with ``opt()``.

Found from the source (no import of every module), so a config added anywhere is covered by the
range, fuzz and round-trip tests without being listed by hand.
"""

from __future__ import annotations

import ast
import importlib
import types
import typing
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "synthtune"


def config_classes() -> list[type]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(s, ast.AnnAssign) and isinstance(s.value, ast.Call)
                    and getattr(s.value.func, "id", None) == "opt" for s in node.body):
                module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
                found.append(getattr(importlib.import_module(module), node.name))
    return found


def base_type(tp):
    """``int`` for ``int | None``, ``list`` for ``list[str]``: the type the value has when set."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return base_type(args[0])
    return typing.get_origin(tp) or tp
