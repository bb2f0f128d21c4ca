"""Find the data and weights that zoo models take from installed packages, without importing those packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ldpruner.base.errors import ModelLoadError

__all__ = ["MissingPackageError", "package_dir"]


class MissingPackageError(ModelLoadError, ImportError):
    """A package that ships a zoo model's data or text encoder is not installed."""


def package_dir(module: str, *, distribution: str, needed_for: str) -> Path:
    """The folder of an installed package, found with ``find_spec`` so that its own imports never run.

    ``distribution`` is the PyPI name to install, ``needed_for`` says what the caller wanted it for; both go into
    the error, which is a ``MissingPackageError`` (a ``ModelLoadError`` and an ``ImportError``).
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise MissingPackageError(
            f"{needed_for} needs the PyPI package {distribution!r} (module {module!r}), which is not installed; "
            f"install it with: pip install {distribution}",
            name=module,
        )
    return Path(spec.origin).resolve().parent
