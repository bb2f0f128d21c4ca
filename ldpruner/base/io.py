"""Artifact I/O every layer shares: atomic writes (a file or folder is complete or absent, never half-written),
one JSON reader whose errors name the file and the problem, conversion of values to plain JSON, and the sha256
digests of a file and of JSON values (cache keys).

Part of the base layer: it imports nothing of ldpruner but :mod:`ldpruner.base.errors`, and no third-party package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ldpruner.base.errors import ArtifactError, LdprunerError

__all__ = [
    "check_replaceable",
    "atomic_dir",
    "atomic_path",
    "default_permissions",
    "json_digest",
    "json_safe",
    "read_json",
    "sha256_file",
    "write_json_atomic",
    "write_text_atomic",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_permissions(path: str | os.PathLike) -> None:
    """Give a file or folder made private by mkstemp/mkdtemp the permissions a plain open()/mkdir() would give."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    ``suffix`` is the temporary file's ending, for writers that choose the format by it (``.png``, ``.wav``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            default_permissions(tmp_path)  # mkstemp makes the file private (0600)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        default_permissions(tmp)  # mkdtemp makes the folder private (0700)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def output_dir(out: str | os.PathLike, *, flag: str = "--out") -> Path:
    """``out`` as the folder a stage writes into, checked before anything is computed or written: not empty, not a
    file, and (it or the folder it will be made in) writable. ArtifactError otherwise."""
    text = os.fspath(out)
    if not text.strip():
        raise ArtifactError(f"{flag} is empty; name the output folder (it is created when missing)")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{flag} {text!r} is a file, not a folder; name a folder (it is created when missing)")
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (it would be created in {str(existing)!r})"
        raise ArtifactError(f"{flag} {text!r} is not writable{where}; choose a folder you can write to")
    return path


def check_replaceable(path: str | os.PathLike, overwrite: bool) -> None:
    """An existing output may be replaced only when the caller asked for it: ArtifactError otherwise."""
    if Path(path).exists() and not overwrite:
        raise ArtifactError(f"{str(path)!r} exists; pass --overwrite (overwrite=True) to replace it")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> None:
    """``data`` as JSON (values JSON cannot hold are written as ``str``), a final newline, atomically."""
    write_text_atomic(path, json.dumps(data, indent=indent, default=str) + "\n")


def read_json(path: str | os.PathLike, *, what: str = "file", error: type[LdprunerError] = ArtifactError,
              expect: type = dict) -> Any:
    """The JSON value in ``path``, which must be an ``expect`` (a JSON object by default).

    Every failure (missing file, unreadable bytes, invalid JSON, another kind of value) raises ``error`` with a
    message that starts ``"<what> '<path>'"``, so a caller says what the file is and which error type it means."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{what} {str(path)!r} cannot be read: {type(exc).__name__}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, expect):
        kind = "a JSON object" if expect is dict else f"a JSON {expect.__name__}"
        raise error(f"{what} {str(path)!r} holds a {type(data).__name__}, expected {kind}")
    return data


def json_safe(value: Any, *, drop_private_keys: bool = False) -> Any:
    """``value`` as plain JSON types: mappings → dicts with str keys, tuples/lists → lists, paths → POSIX strings,
    numpy/torch scalars and arrays → ``tolist()``, anything else JSON cannot hold → ``repr``.

    ``drop_private_keys`` leaves out mapping keys that start with ``_`` (diffusers' bookkeeping in configs:
    ``_class_name``, ``_diffusers_version``, ``_use_default_values``)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, drop_private_keys=drop_private_keys) for k, v in value.items()
                if not (drop_private_keys and str(k).startswith("_"))}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, drop_private_keys=drop_private_keys) for v in value]
    if isinstance(value, Path):
        return value.as_posix()
    if hasattr(value, "tolist"):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of the file ``path``'s bytes, as hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def json_digest(*parts: Any, length: int | None = None) -> str:
    """The sha256 (hex, its first ``length`` digits when given) of ``parts`` as one JSON list, keys sorted and values
    JSON cannot hold written as ``str``: a cache key whose bytes do not change between releases (keys recorded in
    artifacts are compared with it, so the serialization here is part of their format)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:length] if length is not None else digest
