"""The build record (ldpruner.stages.record): a second build is locked out of a folder, a killed build's stages are made
again, reuse verifies what it reuses byte for byte (issue 15's class 2), files no build recorded and a damaged record
are refused — through `ldpruner build`, with the exact messages — and the engine on a table of stages of its own."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import CLI_FAST, run_cli

from ldpruner.base.distributed import World
from ldpruner.base.errors import ArtifactError
from ldpruner.base.io import sha256_file
from ldpruner.stages.record import FILES, STATE_FILE, Stage, read_state, run_stages

FAST = CLI_FAST
BUILD_FAST = [*FAST, "--distill-steps", "3"]
run = run_cli


def _weights(path: Path) -> str:
    from ldpruner.sources import load

    return load(path).weights_id


# --- reuse: what a rebuild keeps and what it makes again -------------------------------------------------------

def test_build_reuses_unchanged_artifacts_and_guards_changed_ones(unet_dir, capsys, tmp_path):
    out_dir = tmp_path / "b"
    code, err = run(capsys, "build", unet_dir, "--out", out_dir, "--budget", "0.2", *BUILD_FAST)
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["export"]["export"]["validation"]["passed"] is True
    assert report["params"]["pruned"] < report["params"]["dense"]
    assert report["reused_stages"] == []
    assert (out_dir / "report.md").read_text().startswith("# ldpruner build report")

    code, err = run(capsys, "build", unet_dir, "--out", out_dir, "--budget", "0.2", *BUILD_FAST)
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["reused_stages"] == ["analyze", "select", "prune", "distill", "export"]
    assert report["distill"]["steps"] == 3 and (out_dir / "distill" / "student" / "plan.json").is_file()
    assert "## Distillation (3 steps, teacher-trajectories" in (out_dir / "report.md").read_text()

    # a new distillation length re-runs distill and export only; 0 exports the undistilled student
    code, err = run(capsys, "build", unet_dir, "--out", out_dir, "--budget", "0.2", *FAST,
                         "--distill-steps", "4", "--overwrite")
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["reused_stages"] == ["analyze", "select", "prune"] and report["distill"]["steps"] == 4
    code, err = run(capsys, "build", unet_dir, "--out", out_dir, "--budget", "0.2", *FAST,
                         "--distill-steps", "0", "--overwrite")
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["distill"] is None and "distill/student" not in report["artifacts"]

    code, err = run(capsys, "build", unet_dir, "--out", out_dir, "--budget", "0.4", *BUILD_FAST)
    assert code == 1 and "ArtifactError" in err and "plan.json" in err

    code, err = run(capsys, "build", unet_dir, "--out", out_dir, "--budget", "0.4", "--overwrite", *BUILD_FAST)
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["reused_stages"] == ["analyze"]
    assert report["params"]["removed_fraction"] >= 0.4


def test_a_rebuild_that_reuses_the_scores_reports_where_its_own_scheduler_came_from(unet_dir, capsys, tmp_path):
    """The default DDIMScheduler() and --scheduler DDIMScheduler give the same scores (reused): the report says how
    this build got its scheduler, not how the build that made the scores did."""
    options = ["--out", tmp_path, *FAST, "--distill-steps", "0", "--no-samples", "--threads", "1"]
    assert run(capsys, "build", unet_dir, *options)[0] == 0
    code, err = run(capsys, "build", unet_dir, *options, "--scheduler", "DDIMScheduler")
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0 and "analyze" in report["reused_stages"]
    assert report["analysis"]["scheduler"]["source"] == "asked"
    assert "- scheduler: DDIMScheduler (asked for with --scheduler)\n" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "scores.json").read_text())["scheduler"]["source"] == "default"  # as made


# --- the lock: one build at a time writes into a folder ---------------------------------------------------------

def test_a_second_build_into_a_folder_another_build_is_writing_is_refused(unet_dir, tmp_path, capsys):
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "ldpruner", "build", str(unet_dir), "--out", str(out), *FAST,
                              "--distill-steps", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / ".ldpruner-build.lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.exists(), first.communicate()
    code, err = run(capsys, "build", unet_dir, "--out", out, *FAST)
    assert code == 1
    assert err.startswith(f"error: ArtifactError: another build (pid {first.pid} on ")
    assert err.endswith(f"is writing into --out {str(out)!r}; wait for it to finish or choose another folder (if no "
                        f"build runs, delete {str(lock)!r})")
    assert first.wait(timeout=300) == 0, first.communicate()
    assert not lock.exists() and (out / "report.json").is_file()
    # a lock left by a killed build is taken over
    lock.write_text("999999999 " + __import__("socket").gethostname() + "\n")
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "2")[0] == 0
    assert not lock.exists()


def test_a_lock_naming_this_very_process_is_stale(unet_dir, tmp_path, capsys):
    import os
    import socket

    out = tmp_path / "run"
    out.mkdir()
    (out / ".ldpruner-build.lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # pids reused after a restart
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0", "--overwrite")[0] == 0
    assert not (out / ".ldpruner-build.lock").exists()


def test_a_lock_whose_pid_now_names_another_process_is_stale(unet_dir, tmp_path, capsys):
    import os
    import socket

    out = tmp_path / "run"
    out.mkdir()
    # pid 1 is alive, but it started long before the build that wrote this lock (the pid was reused)
    (out / ".ldpruner-build.lock").write_text(f"1 {socket.gethostname()} 1\n")
    if not os.path.exists("/proc/1/stat"):
        pytest.skip("process start times come from /proc")
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0", "--overwrite")[0] == 0
    # a live build's lock (this process, with its own start time, seen from another build) is still honoured
    from ldpruner.stages.record import _started

    (out / ".ldpruner-build.lock").write_text(f"{os.getppid()} {socket.gethostname()} {_started(os.getppid())}\n")
    code, err = run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0")
    assert code == 1 and err.startswith(f"error: ArtifactError: another build (pid {os.getppid()} on ")
    (out / ".ldpruner-build.lock").unlink()


# --- pending stages: what a killed build had started is made again ----------------------------------------------

@pytest.mark.parametrize("stage_artifact", ["scores.json", "student"])
def test_a_build_killed_in_a_stage_reruns_to_a_valid_result(stage_artifact, unet_dir, tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    build = subprocess.Popen([sys.executable, "-m", "ldpruner", "build", str(unet_dir), "--out", str(out), *FAST,
                              "--distill-steps", "40"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not (out / stage_artifact).exists() and build.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    build.send_signal(signal.SIGKILL)
    build.wait(timeout=60)
    assert build.returncode == -signal.SIGKILL, "the build ended before it could be killed"
    assert (out / ".ldpruner-build.lock").exists()  # a killed build leaves its lock: the re-run takes it over
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "40")[0] == 0
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["export"]["validation"]["passed"] and report["removed"]
    assert not (out / ".ldpruner-build.lock").exists()


def test_an_artifact_no_build_stage_started_needs_overwrite_and_a_killed_stage_is_made_again(unet_dir, tmp_path,
                                                                                               capsys):
    out = tmp_path / "run"
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0")[0] == 0
    (out / "distill").mkdir()
    (out / "distill" / "distill.json").write_text("{}")  # made by hand, not by a build
    code, err = run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "2")
    assert (code, err) == (1, f"error: ArtifactError: {str(out / 'distill' / 'distill.json')!r} exists; pass "
                              "--overwrite (overwrite=True) to replace it")
    # a stage a killed build had started (pending in the state file) is made again without --overwrite
    state = json.loads((out / ".ldpruner-build.json").read_text())
    state["analyze"] = "pending:" + state["analyze"]
    (out / ".ldpruner-build.json").write_text(json.dumps(state))
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0")[0] == 0
    assert not json.loads((out / ".ldpruner-build.json").read_text())["analyze"].startswith("pending:")


def test_scores_written_just_before_a_kill_are_reused(unet_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0")[0] == 0
    state = json.loads((out / ".ldpruner-build.json").read_text())
    state["analyze"] = "pending:" + state["analyze"]  # killed after scores.json was written, before the state was
    (out / ".ldpruner-build.json").write_text(json.dumps(state))
    scores = (out / "scores.json").read_bytes()
    mtime = (out / "scores.json").stat().st_mtime_ns
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0")[0] == 0
    assert (out / "scores.json").read_bytes() == scores and (out / "scores.json").stat().st_mtime_ns == mtime


# --- class 2: reuse verifies what it reuses ----------------------------------------------------------------------

def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_damaged_artifact_is_never_reused_and_the_report_names_the_files_on_disk(unet_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0")[0] == 0
    onnx = out / "onnx" / "unet.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])  # truncated, as by a full disk
    code, err = run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0")
    assert (code, err) == (1, f"error: ArtifactError: {str(onnx)!r} changed since the build that wrote onnx (export "
                              "stage); ldpruner reuses only what it wrote, byte for byte: restore it, or pass "
                              "--overwrite to make the stage again")
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0", "--overwrite")[0] == 0
    report = json.loads((out / "report.json").read_text())
    assert "export" not in report["reused_stages"] and report["export"]["export"]["validation"]["passed"]
    files = report["files"]["sha256"]
    assert files["onnx/unet.onnx"] == _digest(onnx) and files["plan.json"] == _digest(out / "plan.json")
    assert files["student/diffusion_pytorch_model.safetensors"] == _digest(
        out / "student" / "diffusion_pytorch_model.safetensors")
    # a file added into a folder a stage wrote is not the build's either
    (out / "student" / "notes.txt").write_text("mine")
    code, err = run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0")
    assert code == 1 and err.startswith(f"error: ArtifactError: {str(out / 'student' / 'notes.txt')!r} was added "
                                        "since the build that wrote student (prune stage)")
    assert (out / "student" / "notes.txt").read_text() == "mine"


def test_a_deleted_file_is_made_again_and_an_intact_build_is_reused_whole(unet_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "2")[0] == 0
    weights = out / "student" / "diffusion_pytorch_model.safetensors"
    before = _digest(weights)
    weights.unlink()
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "2")[0] == 0
    report = json.loads((out / "report.json").read_text())
    assert "prune" not in report["reused_stages"] and _digest(weights) == before  # the same student, made again
    # … byte for byte, so what was made from it is still current
    assert {"analyze", "select", "distill", "export"} <= set(report["reused_stages"])
    assert report["model_weights"] == _weights(unet_dir) and report["other_weights"] == []
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "2")[0] == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["reused_stages"]) == {"analyze", "select", "prune", "distill", "export"}


def test_files_nobody_recorded_are_refused_before_any_work_and_a_damaged_record_too(unet_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0")[0] == 0
    record = out / ".ldpruner-build.json"
    state = json.loads(record.read_text())
    del state["files"], state["made_from"]  # as an earlier ldpruner wrote it
    record.write_text(json.dumps(state))
    (out / "student" / "notes.txt").write_text("mine")
    (out / "onnx" / "notes.txt").write_text("mine too")
    scores = (out / "scores.json").read_bytes()
    code, err = run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0")
    assert (code, err) == (1, f"error: ArtifactError: {str(out / 'scores.json')!r} was written by a build that did not "
                              "record its files (an earlier ldpruner, or an edited .ldpruner-build.json); ldpruner "
                              "cannot tell them from yours: pass --overwrite to make the analyze stage again")
    # refused before any stage ran: nothing was removed or rewritten
    assert (out / "student" / "notes.txt").read_text() == "mine" and (out / "scores.json").read_bytes() == scores
    for damaged, problem in ((dict(state, files=[]), "'files' and 'made_from' must be objects"),
                             (dict(state, files={"analyze": {"../x": "0" * 64}}),
                              f"files.analyze lists '../x': '{'0' * 64}', not a file of the stage with its sha256"),
                             ([1, 2], "a list, not an object")):
        record.write_text(json.dumps(damaged))
        code, err = run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0")
        assert (code, err) == (1, f"error: ArtifactError: the build record {str(record)!r} is damaged ({problem}); "
                                  "ldpruner cannot tell which files a build wrote: pass --overwrite to make every "
                                  "stage again")
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0", "--overwrite")[0] == 0
    assert not (out / "student" / "notes.txt").exists()  # --overwrite: the stages start from an empty place
    # a record that is not a file is refused even with --overwrite, before anything is touched
    record.unlink()
    record.mkdir()
    code, err = run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0", "--overwrite")
    assert (code, err) == (1, f"error: ArtifactError: {str(record)!r} is not a file; a build keeps its record there: "
                              "remove it (or choose another folder)")
    assert (out / "scores.json").is_file()


def test_other_options_with_overwrite_leave_no_file_of_the_earlier_build(unet_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0", "--optimize")[0] == 0
    assert (out / "onnx" / "unet.opt.onnx").is_file()
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0", "--overwrite")[0] == 0
    assert not (out / "onnx" / "unet.opt.onnx").exists()
    files = json.loads((out / "report.json").read_text())["files"]["sha256"]
    assert not any(p.startswith("onnx/unet.opt") for p in files)
    on_disk = {p.relative_to(out).as_posix() for p in (out / "onnx").rglob("*") if p.is_file()}
    assert on_disk == {p for p in files if p.startswith("onnx/")}


# --- the engine on a table of its own: no model, no build stage ---------------------------------------------------

@dataclasses.dataclass
class _Toy:
    """The least a build is to the record: a folder, its record, an option the first stage's key depends on."""

    out: Path
    option: str = "one"
    overwrite: bool = False
    second: bool = True  # whether the second stage is on
    world: World = World()
    state: dict = dataclasses.field(default_factory=dict)
    keys: dict = dataclasses.field(default_factory=dict)
    found: dict = dataclasses.field(default_factory=dict)
    reused: list = dataclasses.field(default_factory=list)
    timings: dict = dataclasses.field(default_factory=dict)
    ran_with: dict = dataclasses.field(default_factory=dict)
    threads: int = 1


def _first(b: _Toy) -> None:
    (b.out / "a.txt").write_text(b.option)


def _second(b: _Toy) -> None:
    (b.out / "b").mkdir(exist_ok=True)
    (b.out / "b" / "x.txt").write_text((b.out / "a.txt").read_text() * 2)


TABLE = (Stage("a", "a.txt", reads=(), inputs=lambda b: (b.option,), run=_first),
         Stage("b", "b/x.txt", reads=("a",), inputs=lambda b: (), run=_second, outputs=("b",),
               enabled=lambda b: b.second))


def _build(out: Path, **options) -> _Toy:
    """One build of TABLE into ``out``, as a build reads its record first."""
    toy = _Toy(out, **options)
    toy.state = read_state(out, toy.overwrite, TABLE)
    run_stages(toy, TABLE)
    return toy


def test_the_record_reuses_what_is_current_and_refuses_what_it_did_not_write(tmp_path):
    first = _build(tmp_path)
    assert first.reused == [] and first.keys == {"a": "one", "b": "79b2a602ceb42ef0"}  # the key's bytes are its format
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state[FILES] == {"a": {"a.txt": sha256_file(tmp_path / "a.txt")},
                            "b": {"b/x.txt": sha256_file(tmp_path / "b" / "x.txt")}}
    assert _build(tmp_path).reused == ["a", "b"]
    (tmp_path / "b" / "x.txt").unlink()  # a file missing is made again; what it was made from is reused
    assert _build(tmp_path).reused == ["a"] and (tmp_path / "b" / "x.txt").read_text() == "oneone"
    with pytest.raises(ArtifactError, match=r"/a\.txt' exists; pass --overwrite"):  # other inputs
        _build(tmp_path, option="two")
    (tmp_path / "b" / "y.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=r"y\.txt' was added since the build that wrote b \(b stage\)"):
        _build(tmp_path)
    assert _build(tmp_path, option="two", overwrite=True).reused == []
    assert not (tmp_path / "b" / "y.txt").exists() and (tmp_path / "b" / "x.txt").read_text() == "twotwo"


def test_a_pending_stage_is_made_again_and_a_stage_turned_off_is_retired(tmp_path):
    _build(tmp_path)
    state = json.loads((tmp_path / STATE_FILE).read_text())
    (tmp_path / STATE_FILE).write_text(json.dumps(dict(state, a="pending:one")))
    assert _build(tmp_path).reused == ["b"]  # a made again byte for byte: what was made from it is current
    assert _build(tmp_path, second=False).reused == ["a"]
    assert not (tmp_path / "b").exists() and "b" not in json.loads((tmp_path / STATE_FILE).read_text())[FILES]
    (tmp_path / STATE_FILE).write_text(json.dumps({FILES: {"a": {"../a.txt": "0" * 64}}}))
    with pytest.raises(ArtifactError, match=r"is damaged \(files\.a lists '\.\./a\.txt'"):
        _build(tmp_path)
