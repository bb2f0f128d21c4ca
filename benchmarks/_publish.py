"""How a study leaves its result: ``report.json`` and ``report.md`` under ``--out``, the markdown also printed,
both carrying the command that reproduces them."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldpruner.base.io import write_json_atomic, write_text_atomic


def command(study: str, argv: Sequence[str] | None) -> str:
    """The command line that reran this study (``argv`` as passed to ``main``, else the process's own)."""
    return f"python -m benchmarks.{study} " + " ".join(argv if argv is not None else sys.argv[1:])


def publish(out: Path, report: dict[str, Any], text: str) -> int:
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", text)
    print(text)
    return 0
