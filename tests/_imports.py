"""What a module imports, read from its source (nothing is imported to find out)."""

from __future__ import annotations

import ast
import sys
from types import ModuleType


def non_stdlib_imports(module: ModuleType) -> set[str]:
    """Top-level names of the packages ``module`` imports that are not in the standard library;
    a relative import counts as ``"."``."""
    with open(module.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add("." if node.level else node.module.split(".")[0])
    return roots - set(sys.stdlib_module_names)
