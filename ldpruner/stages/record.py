"""The build record: which of a build's stages are current in its folder, which are made again, and which files it may
replace — for any table of :class:`Stage` entries, run in order on a build-like object (:class:`RecordedBuild`).

A stage's key hashes its inputs with the key of the first enabled stage it reads (a stage that reads none: its one
input is its key), so a changed option invalidates exactly the stages downstream of it. ``.ldpruner-build.json``
keeps each stage's key and the sha256 of every file it wrote. A stage whose key is the recorded one, and whose files
are all there unchanged, is reused; one whose artifact would change, or whose files were changed by someone else, is
replaced only with ``overwrite``; one whose files were deleted (or whose input files were made again) is made again.
A stage is marked pending while it runs, so a killed build's files are known as ldpruner's own. Under torchrun rank 0
decides and every rank follows: the stages marked ``all_ranks`` run on every rank, rank 0 alone runs the others. A
lock file keeps a second build out of a folder while one writes into it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from ldpruner.base.distributed import World, on_rank0, share_from_rank0
from ldpruner.base.errors import ArtifactError
from ldpruner.base.io import check_replaceable, json_digest, sha256_file, write_json_atomic

__all__ = ["FILES", "LOCK_FILE", "MADE_FROM", "PENDING", "STATE_FILE", "RecordedBuild", "Stage",
           "check_out_is_ours", "lock", "read_state", "run_stages"]

STATE_FILE = ".ldpruner-build.json"  # the key of each stage's artifact in the last build, for reuse
LOCK_FILE = ".ldpruner-build.lock"  # held while a build writes into its folder: the pid and host of the build
PENDING = "pending:"  # the state of a stage that started and has not finished (a killed build leaves it)
FILES = "files"  # the state's record of each finished stage's outputs: {stage: {path: sha256}}
MADE_FROM = "made_from"  # {stage: hash of the recorded files of the stage it read when it ran}
_LOG = "ldpruner.stages.build"  # the record's warnings are the build's


class RecordedBuild(Protocol):
    """What the record needs of a build: its folder and record, whether it may replace files, the keys so far, and
    where it notes what it reused and ran."""

    out: Path
    world: World
    state: dict[str, Any]  # the record as read from STATE_FILE, updated as stages run
    keys: dict[str, str]
    found: dict[str, dict[str, str]]  # sha256 of each stage's files now
    reused: list[str]
    timings: dict[str, float]
    ran_with: dict[str, int]  # the threads of each stage run in this build
    threads: int

    @property
    def overwrite(self) -> bool: ...


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a build: ``run(build)`` writes ``artifact``; the artifact is current while the stage's key —
    a hash of the key of the first enabled stage in ``reads`` and the parts ``inputs(build)`` (a stage that reads
    none: its one input itself) — is unchanged."""

    name: str
    artifact: str
    reads: tuple[str, ...]
    inputs: Callable[[Any], tuple[Any, ...]]
    run: Callable[[Any], Any]
    enabled: Callable[[Any], bool] = lambda build: True
    all_ranks: bool = False
    # the files and folders (paths in the build folder) the stage writes and later stages read: their sha256 is
    # recorded when the stage finishes and checked before the stage is reused; None: just the artifact
    outputs: tuple[str, ...] | None = None
    uses: tuple[str, ...] = ()  # stages whose files it also reads (made again with other bytes: so is this one)
    own_cache: bool = False  # the artifact carries its own cache key: a killed stage's file may still be reused
    # what differs between the artifact there and what this build would make, for a refusal to say (None: unknown)
    explain: Callable[[Any], str | None] | None = None

    def written(self) -> tuple[str, ...]:
        return self.outputs if self.outputs is not None else (self.artifact,)


def run_stages(build: RecordedBuild, table: Sequence[Stage]) -> None:
    """Every enabled stage of ``table`` in order; a rank other than 0 runs the ``all_ranks`` ones only, after rank 0
    has run the others since the last one (their artifacts are what it reads), or raises what stopped rank 0 there."""
    world = build.world
    enabled = [s for s in table if s.enabled(build)]
    last_all_ranks = max((i for i, s in enumerate(enabled) if s.all_ranks), default=-1)
    for stage in enabled:  # a key depends on options and the keys before it, never on a stage's result
        inputs = stage.inputs(build)
        if stage.reads:
            build.keys[stage.name] = json_digest(next(build.keys[r] for r in stage.reads if r in build.keys), *inputs,
                                                 length=16)
        else:
            (build.keys[stage.name],) = inputs
    # every refusal (a file changed or added, an artifact of other inputs, files nobody recorded) before any work
    on_rank0(world, world.size > 1, lambda: ([_decide(build, s, build.keys[s.name], quiet=True) for s in enabled],
                                             _retire(build, [s for s in table if s not in enabled])))
    main_only_since_sync = False
    for i, stage in enumerate(enabled):
        key = build.keys[stage.name]
        if stage.all_ranks and main_only_since_sync and world.size > 1:
            share_from_rank0(world, None, None)
            main_only_since_sync = False
        if not stage.all_ranks:
            main_only_since_sync = True
            if not world.is_main:
                continue
        try:
            _run_stage(build, stage, key)
        except Exception as exc:
            if not stage.all_ranks and world.size > 1 and i < last_all_ranks:
                # the other ranks wait at the next all-ranks stage: they raise it there
                share_from_rank0(world, None, exc)
            raise
        if not world.is_main and i >= last_all_ranks:
            return


def _run_stage(build: RecordedBuild, stage: Stage, key: str) -> None:
    together = stage.all_ranks and build.world.size > 1  # every rank reuses or runs it, or fails, as rank 0 decided
    reuse, clear = on_rank0(build.world, together, lambda: _decide(build, stage, key))
    if reuse:
        build.reused.append(stage.name)
        return
    # the other ranks start once rank 0 has cleared the way (or raise what stopped it)
    on_rank0(build.world, together, lambda: _mark_started(build, stage, key, clear))
    start = time.perf_counter()
    stage.run(build)
    build.timings[stage.name] = round(time.perf_counter() - start, 3)
    build.ran_with[stage.name] = build.threads
    build.state[stage.name] = key
    if build.world.is_main:
        build.found.pop(stage.name, None)
        build.state.setdefault(FILES, {})[stage.name] = _digests(build.out, stage.written())
        build.state.setdefault(MADE_FROM, {})[stage.name] = _upstream(build, stage)
        write_json_atomic(build.out / STATE_FILE, build.state)


def _decide(build: RecordedBuild, stage: Stage, key: str, *, quiet: bool = False) -> tuple[bool, bool]:
    """(reuse the stage's files, remove them before it runs again), or what running ``stage`` is refused for; touches
    nothing."""
    reuse, ours, clear = _reuse(build, stage, key, quiet=quiet)
    if not reuse:  # an artifact that is not ours (other inputs, a file no build wrote) needs --overwrite
        try:
            check_replaceable(build.out / stage.artifact, build.overwrite or ours)
        except ArtifactError as exc:
            why = stage.explain(build) if stage.explain is not None else None
            if why is None:
                raise
            raise ArtifactError(f"{exc} ({why})") from None
    return reuse, clear


def _reuse(build: RecordedBuild, stage: Stage, key: str, *, quiet: bool = False) -> tuple[bool, bool, bool]:
    """(reuse the stage's files, they are ldpruner's own and may be replaced without --overwrite, they may be removed
    before the stage runs again). Files are reused only when the stage's key is the one recorded and every file it
    wrote is there byte for byte. A file missing is made again; a file changed or added since it was recorded (by
    someone, or a disk fault) needs --overwrite, whatever the key, and so do files nobody recorded (a folder from
    before files were recorded, an edited record). A stage a killed build had started is ldpruner's own."""
    recorded, state_key = _recorded(build, stage.name), build.state.get(stage.name)
    overwrite, pending = build.overwrite, str(state_key or "").startswith(PENDING)
    if pending:
        # started by a build that was killed before it finished: its files are ours, made again from an empty place
        # — but a scores.json or costs.json written before the kill is reused when its own cache key matches
        return False, True, overwrite or not stage.own_cache
    if recorded is None:  # a first build; or files nobody recorded, which may be yours
        there = _listing(build.out, stage.written())
        if there and state_key is None:  # no build ran the stage here: whoever made these files, they are not ours
            check_replaceable(build.out / there[0], overwrite)
        if there and not overwrite:
            raise ArtifactError(f"{str(build.out / there[0])!r} was written by a build that did not record its files "
                                f"(an earlier ldpruner, or an edited {STATE_FILE}); ldpruner cannot tell them from "
                                f"yours: pass --overwrite to make the {stage.name} stage again")
        return False, state_key == key, overwrite
    found = _found(build, stage)
    made_from = build.state.get(MADE_FROM, {})
    upstream_same = stage.name not in made_from or made_from[stage.name] == _upstream(build, stage)
    if state_key == key and found == recorded and upstream_same:
        return True, True, False
    foreign = sorted(p for p in found if recorded.get(p) != found[p])
    if foreign and not overwrite:
        what = "was added" if foreign[0] not in recorded else "changed"
        raise ArtifactError(f"{str(build.out / foreign[0])!r} {what} since the build that wrote "
                            f"{', '.join(stage.written())} ({stage.name} stage); ldpruner reuses only what it wrote, "
                            "byte for byte: restore it, or pass --overwrite to make the stage again")
    if state_key != key:  # other inputs: the files it wrote are replaced only with --overwrite
        if found and not (build.out / stage.artifact).exists():
            check_replaceable(build.out / next(iter(found)), overwrite)
        return False, False, True
    if not quiet:
        import logging

        missing = sorted(set(recorded) - set(found))
        why = (f"{len(missing)} file(s) missing ({missing[0]})" if missing else f"{len(foreign)} file(s) changed"
               if foreign else "the files of the stage it reads were made again")
        logging.getLogger(_LOG).warning("%s: %s since the last build; making it again", stage.name, why)
    return False, True, True


def _upstream(build: RecordedBuild, stage: Stage) -> str | None:
    """A hash of the recorded files of every stage ``stage`` reads (None for a stage that reads none): a stage made
    from files since made again (with other bytes) is made again too, though its key is the same."""
    used = [r for r in (*stage.reads, *stage.uses) if r in build.keys]
    return json_digest({r: _recorded(build, r) for r in used}, length=16) if used else None


def _mark_started(build: RecordedBuild, stage: Stage, key: str, clear: bool) -> None:
    """Before ``stage`` runs: its old files removed when ``clear`` (nothing it reads back, or leaves beside its new
    files, is an old or damaged file), and the stage marked pending in the record (a kill leaves it so)."""
    if clear:
        _remove(build.out, stage.written())
    build.state[stage.name] = PENDING + key
    build.state.setdefault(FILES, {}).pop(stage.name, None)
    write_json_atomic(build.out / STATE_FILE, build.state)


def _retire(build: RecordedBuild, off: list[Stage]) -> None:
    """The files an earlier build wrote for stages this build does not run (``--no-samples``, no distillation, a
    budget that is not latency) describe that earlier build, not this one: removed when they are as it wrote them,
    with their record. A stage whose artifact carries its own cache key (costs.json) keeps it for a later build;
    files changed since are not ldpruner's any more, and stay."""
    import logging

    for stage in off:
        recorded = _recorded(build, stage.name)
        if stage.own_cache or recorded is None or _digests(build.out, stage.written()) != recorded:
            continue
        _remove(build.out, stage.written())
        for table in (build.state, build.state.get(FILES, {}), build.state.get(MADE_FROM, {})):
            table.pop(stage.name, None)
        write_json_atomic(build.out / STATE_FILE, build.state)
        logging.getLogger(_LOG).warning("removed %s: the %s stage is off in this build, and they described an earlier "
                                        "one", ", ".join(stage.written()), stage.name)


def _remove(out: Path, paths: tuple[str, ...]) -> None:
    import shutil

    for rel in paths:
        path = out / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _found(build: RecordedBuild, stage: Stage) -> dict[str, str]:
    """sha256 of the files ``stage`` wrote, as they are now (computed once per build until the stage runs)."""
    if stage.name not in build.found:
        build.found[stage.name] = _digests(build.out, stage.written())
    return build.found[stage.name]


def _recorded(build: RecordedBuild, stage: str) -> dict[str, str] | None:
    """The sha256 of the files ``stage`` wrote, as the state recorded them when it last finished (None: unknown)."""
    files = build.state.get(FILES)
    record = files.get(stage) if isinstance(files, dict) else None
    return record if isinstance(record, dict) else None


def _listing(out: Path, paths: tuple[str, ...]) -> list[str]:
    """Every file under ``paths`` (files or folders in ``out``), as paths relative to ``out``."""
    found: list[str] = []
    for rel in paths:
        path = out / rel
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        found += [f.relative_to(out).as_posix() for f in files]
    return found


def _digests(out: Path, paths: tuple[str, ...]) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders in ``out``), by path relative to ``out``."""
    return {rel: sha256_file(out / rel) for rel in _listing(out, paths)}


def read_state(out: Path, overwrite: bool, table: Sequence[Stage]) -> dict[str, Any]:
    """The keys of the last build's stages and the files they wrote ({} when there was no build). A record that
    cannot be read or does not hold what a build of ``table`` writes is refused — ldpruner could not tell its files
    from yours — unless ``overwrite`` (then every stage is made again)."""
    path = out / STATE_FILE
    if not path.exists():  # no build yet (under torchrun, rank 0 may not have written it yet)
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        problem = _state_problem(state, table)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        state, problem = None, f"{type(exc).__name__}: {exc}"
    if problem is None:
        return state
    if overwrite:
        return {}
    raise ArtifactError(f"the build record {str(path)!r} is damaged ({problem}); ldpruner cannot tell which files a "
                        "build wrote: pass --overwrite to make every stage again")


def _state_problem(state: Any, table: Sequence[Stage]) -> str | None:
    """What is wrong with a build record, or None."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not an object"
    outputs = {s.name: s.written() for s in table}
    for name in outputs:
        if name in state and not isinstance(state[name], str):
            return f"stage {name!r} has {state[name]!r}, not a key"
    files, made_from = state.get(FILES, {}), state.get(MADE_FROM, {})
    if not isinstance(files, dict) or not isinstance(made_from, dict):
        return f"{FILES!r} and {MADE_FROM!r} must be objects"
    for name, record in files.items():
        if name not in outputs or not isinstance(record, dict):
            return f"{FILES}.{name} is not a record of a stage's files"
        for rel, digest in record.items():
            inside = isinstance(rel, str) and not rel.startswith("/") and ".." not in rel.split("/") and any(
                rel == w or rel.startswith(w + "/") for w in outputs[name])
            if not inside or not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
                return f"{FILES}.{name} lists {rel!r}: {digest!r}, not a file of the stage with its sha256"
    if any(not (v is None or isinstance(v, str)) for v in made_from.values()):
        return f"{MADE_FROM!r} holds a value that is not a hash"
    return None


def check_out_is_ours(out: Path, overwrite: bool, names: Iterable[str]) -> None:
    """Before anything is written: ``--out`` must not lead into another folder through a link, and the files a build
    writes (``names`` in ``out``) may be replaced only when an earlier build wrote them (its state file is there) or
    with --overwrite."""
    if overwrite:
        return
    if out.is_symlink():
        raise ArtifactError(f"--out {str(out)!r} is a symbolic link (to {str(out.resolve())!r}); ldpruner does not "
                            "write through a link into another folder: pass the folder itself, or --overwrite")
    if out.is_dir() and not (out / STATE_FILE).exists():
        found = sorted(n for n in set(names) if (out / n).exists())
        if found:
            raise ArtifactError(f"--out {str(out)!r} holds {found}, which no ldpruner build wrote (there is no "
                                f"{STATE_FILE}); they may be your files: choose another folder, or pass --overwrite "
                                "to replace them")


@contextlib.contextmanager
def lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s build lock: a second build into the same folder is refused while the first one runs (a lock
    whose process is gone, after a kill, is taken over)."""
    path = out / LOCK_FILE
    me = f"{os.getpid()} {socket.gethostname()} {_started(os.getpid()) or '?'}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = path.read_text(errors="replace").strip() if path.exists() else ""
            pid, host, started = (holder.split() + ["", "", ""])[:3]
            # stale: its build is gone, the pid is this very process's (a container restarted with the same pids), or
            # the pid now names another process (one that started at another time than the build that wrote it)
            if pid.isdigit() and host == socket.gethostname() and (
                    int(pid) == os.getpid() or not _alive(int(pid))
                    or started not in ("", "?") and _started(int(pid)) not in (None, started)):
                path.unlink(missing_ok=True)  # stale: its build was killed
                continue
            raise ArtifactError(f"another build (pid {pid or '?'} on {host or '?'}) is writing into --out "
                                f"{str(out)!r}; wait for it to finish or choose another folder (if no build runs, "
                                f"delete {str(path)!r})") from None
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None where that cannot be read: with the
    pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name, in parentheses, may hold spaces
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
