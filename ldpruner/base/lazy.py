"""A package's public surface, named without being imported: ``__getattr__ = lazy_exports(__name__, WHERE)`` makes
``package.Name`` import the module ``WHERE[Name]`` on first use, so importing the package loads no torch. Part of the
base layer: standard library only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``: name → the attribute of the submodule ``where[name]`` names."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
