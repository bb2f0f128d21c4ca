"""Publishing an ONNX model (``<name>`` + optional ``<name>.data`` + optional ``config.json``) all or nothing.

Files are produced in a staging folder beside the destination (same filesystem, so moves are renames) and moved
into place only after every check passed: weights and config first, the ``.onnx`` last, so an ``.onnx`` that
exists is always complete. The staging folder is removed whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ldpruner.base.errors import ArtifactError
from ldpruner.base.io import check_replaceable, default_permissions

__all__ = ["staging_dir", "publish_model", "data_file", "check_destination"]


def data_file(path: Path) -> Path:
    """Where the external weights of ``path`` live (the name both torch exporters and onnxruntime use)."""
    return path.with_name(path.name + ".data")


def check_destination(out_path: Path, *, overwrite: bool) -> None:
    if out_path.is_dir():
        raise ArtifactError(f"out_path {out_path} is a folder; give the .onnx file path, e.g. {out_path / 'unet.onnx'}")
    check_replaceable(out_path, overwrite)


@contextlib.contextmanager
def staging_dir(out_path: Path) -> Iterator[Path]:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish_model(staged: Path, out_path: Path, *, extra_files: tuple[str, ...] = ()) -> Path | None:
    """Move ``staged`` (and its ``.data`` file, and ``extra_files`` beside it) onto ``out_path``.

    Returns the published data file or None. A ``.data`` file left at the destination by an earlier model that
    had external weights is removed when the new model has none (it would be orphaned)."""
    if staged.name != out_path.name:  # external data is referenced by file name, so the names must agree
        raise ArtifactError(f"staged model {staged.name!r} must have the destination's name {out_path.name!r}")
    staged_data = data_file(staged)
    for path in (staged, staged_data, *(staged.with_name(n) for n in extra_files)):
        if path.exists():
            default_permissions(path)
    published_data = None
    if staged_data.exists():
        published_data = data_file(out_path)
        os.replace(staged_data, published_data)
    for name in extra_files:
        os.replace(staged.with_name(name), out_path.with_name(name))
    os.replace(staged, out_path)
    if published_data is None and data_file(out_path).exists():
        data_file(out_path).unlink()
    return published_data
