"""One protocol for the JSON artifacts one stage writes and another reads (scores, costs, plans, the latency check,
the export and distillation summaries): each is declared once as an :class:`ArtifactFile` — its file name, its
format tag, what messages call it and the error a bad file raises — and read and written only through it.

- **format**: every file written holds ``"format": "ldpruner.<kind>/<version>"``; a file of another format is
  refused (``reads`` names the earlier formats still read; ``None`` there: a file written before it had one).
- **atomic**: written to a temporary file beside the target and renamed, so a killed run leaves the old file or
  the new one, never half of one.
- **malformed**: a file that is not JSON, not an object, of another format, or whose fields do not parse raises
  the artifact's error type with one message: ``<what> '<path>' …``.
- **cache policy** (:meth:`JsonArtifact.load_cached`): an absent file, or one made under another cache key, is a
  miss; a file that is there but is not that artifact raises — it is never treated as a miss and overwritten, unless
  the caller was told to overwrite.

:class:`JsonArtifact` is the mixin a typed artifact (a dataclass with ``to_dict`` and ``_from_dict``) gets ``save``,
``load``, ``from_dict`` and ``load_cached`` from.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ldpruner.base.errors import ArtifactError, ConfigError, LdprunerError
from ldpruner.base.io import read_json, write_json_atomic

__all__ = ["ArtifactFile", "JsonArtifact"]

T = TypeVar("T")

# what a field that does not parse raises while an artifact is read back
_PARSE_ERRORS = (KeyError, TypeError, ValueError, ConfigError)


@dataclasses.dataclass(frozen=True)
class ArtifactFile:
    """One JSON artifact: its file ``name`` (in a stage's output folder), its ``format`` tag, what messages call it
    (``what``), the error a bad file raises, and the earlier formats still read (``reads``; None: no format)."""

    name: str
    format: str
    what: str
    error: type[LdprunerError] = ArtifactError
    reads: tuple[str | None, ...] = ()

    def locate(self, path: str | os.PathLike) -> Path:
        """``path`` itself, or ``path / name`` when ``path`` is a folder."""
        path = Path(path)
        return path / self.name if path.is_dir() else path

    def write(self, path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
        """``data`` under this artifact's format tag, written atomically to ``path`` (a file, or a folder that
        receives ``name``); returns the file written."""
        if data.get("format", self.format) != self.format:
            raise ValueError(f"a {self.what} is written as {self.format!r}, not {data['format']!r}")
        path = self.locate(path)
        write_json_atomic(path, {"format": self.format, **data})
        return path

    def read(self, path: str | os.PathLike) -> dict[str, Any]:
        """The JSON object in ``path`` (a file, or a folder holding ``name``), checked to be of this format."""
        path = self.locate(path)
        data = read_json(path, what=self.what, error=self.error)
        self.check_format(data, path)
        return data

    def fields(self, path: str | os.PathLike) -> dict[str, Any]:
        """:meth:`read` without the format tag: the content, as a report quotes it."""
        return {k: v for k, v in self.read(path).items() if k != "format"}

    def check_format(self, data: Any, path: str | os.PathLike | None = None) -> None:
        if not isinstance(data, Mapping):
            raise self.error(f"{self._named(path)} holds a {type(data).__name__}, expected a JSON object")
        found = data.get("format")
        if found != self.format and found not in self.reads:
            raise self.error(f"{self._named(path)} is not an ldpruner {self.what}: expected format "
                             f"{self.format!r}, got {found!r}")

    def parse(self, data: Any, make: Callable[[Mapping[str, Any]], T], path: str | os.PathLike | None = None) -> T:
        """``make(data)`` after the format check; a field that does not parse raises this artifact's error."""
        self.check_format(data, path)
        try:
            return make(data)
        except self.error:
            raise
        except _PARSE_ERRORS as exc:
            raise self.error(f"{self._named(path)} is malformed: {type(exc).__name__}: {exc}") from exc

    def load(self, path: str | os.PathLike, make: Callable[[Mapping[str, Any]], T]) -> T:
        path = self.locate(path)
        return self.parse(self.read(path), make, path)

    def _named(self, path: str | os.PathLike | None) -> str:
        return f"{self.what} {str(path)!r}" if path is not None else f"the {self.what}"


class JsonArtifact:
    """``save``/``load``/``from_dict``/``load_cached`` for a typed artifact declared by its ``FILE``; the class
    gives ``to_dict()`` (the fields; the format tag is added on save) and ``_from_dict(data)`` (may raise
    KeyError/TypeError/ValueError on a bad field: reported as a malformed file)."""

    FILE: ClassVar[ArtifactFile]

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[T], data: Any) -> T:
        return cls.FILE.parse(data, cls._from_dict)  # type: ignore[attr-defined]

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically; ``path`` is a file, or a folder that receives ``FILE.name``."""
        return self.FILE.write(path, self.to_dict())

    @classmethod
    def load(cls: type[T], path: str | os.PathLike) -> T:
        return cls.FILE.load(path, cls._from_dict)  # type: ignore[attr-defined]

    @classmethod
    def load_cached(cls: type[T], path: str | os.PathLike, key: str, *, overwrite: bool = False) -> T | None:
        """The artifact at ``path`` when it was made under cache key ``key``; None when absent or made under another
        key. A file there that is not this artifact raises, unless ``overwrite`` (the caller will replace it: a miss).
        """
        artifact = cls.FILE  # type: ignore[attr-defined]
        path = artifact.locate(path)
        if not path.is_file():
            return None
        try:
            found = cls.load(path)  # type: ignore[attr-defined]
        except artifact.error as exc:
            if overwrite:
                return None
            raise artifact.error(f"{exc}; it is not reused: pass --overwrite (overwrite=True) to replace it") from None
        return found if getattr(found, "cache_key", None) == key else None
