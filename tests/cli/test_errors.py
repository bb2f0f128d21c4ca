"""Bad input and faults on the command line (issue 15's classes): every one a single typed `error:` line with the
exact message, a non-zero exit, and nothing written or left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_sd_unet

from ldpruner.cli import main

FAST = ["--num-samples", "2", "--steps", "1", "--height", "8", "--width", "8"]


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "unet"
    make_tiny_sd_unet().save_pretrained(path, safe_serialization=True)
    return path


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 1 or not err[-1].startswith("error:") or len([e for e in err if e.startswith("error:")]) == 1
    return code, (err[-1] if err else "")


@pytest.mark.parametrize("command", ["analyze", "costs", "prune", "export"])
def test_an_out_that_is_a_file_is_refused_before_any_work(command, unet_dir, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("mine")
    args = {"analyze": ["analyze", unet_dir, *FAST], "costs": ["costs", unet_dir, "--runtime", "torch"],
            "prune": ["prune", unet_dir, "--plan", tmp_path / "missing.json"], "export": ["export", unet_dir]}[command]
    code, err = run(capsys, *args, "--out", target)
    assert code == 1
    assert err == (f"error: ArtifactError: --out {str(target)!r} is a file, not a folder; name a folder (it is "
                   "created when missing)")
    assert target.read_text() == "mine"


def test_an_empty_out_is_refused_and_nothing_lands_in_the_current_folder(unet_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, "build", unet_dir, "--out", "", *FAST)
    assert (code, err) == (1, "error: ArtifactError: --out is empty; name the output folder (it is created when "
                              "missing)")
    assert list(tmp_path.iterdir()) == []


def test_a_refused_build_leaves_no_empty_folder(unet_dir, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    code, err = run(capsys, "build", unet_dir, "--out", out, "--budget", "0.99", *FAST)
    assert code == 1 and err.startswith("error: BudgetError: budget params=0.99 removes more than")
    assert not out.exists()
    # a folder that existed before stays, whatever happens
    out.mkdir(parents=True)
    assert run(capsys, "build", unet_dir, "--out", out, "--budget", "0.99", *FAST)[0] == 1
    assert out.is_dir()


def test_a_prompt_file_that_is_not_utf8_is_a_config_error(unet_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xff\xfe a cat\n")
    code, err = run(capsys, "analyze", unet_dir, "--out", tmp_path / "run", "--prompts", prompts, *FAST)
    assert (code, err) == (1, f"error: ConfigError: prompt file {str(prompts)!r} is not UTF-8 text (invalid start "
                              "byte at byte 0); save it as UTF-8")


@pytest.mark.parametrize("value, kind", [(float("inf"), "inf"), (float("nan"), "nan")])
def test_non_finite_weights_are_refused_before_the_analysis(value, kind, tmp_path, capsys):
    model = make_tiny_sd_unet()
    with torch.no_grad():
        model.conv_in.weight[0, 0, 0, 0] = value
    folder = tmp_path / "unet"
    model.save_pretrained(folder, safe_serialization=True)
    code, err = run(capsys, "build", folder, "--out", tmp_path / "run", *FAST)
    assert (code, err) == (1, f"error: ModelLoadError: {str(folder)!r} has non-finite weights: conv_in.weight (1 "
                              f"{kind}); its outputs cannot be finite, so ldpruner does not analyse or prune it")
    assert not (tmp_path / "run").exists()


def test_a_nan_score_is_never_ranked(unet_dir, tmp_path, capsys):
    assert run(capsys, "analyze", unet_dir, "--out", tmp_path / "run", *FAST)[0] == 0
    scores = tmp_path / "run" / "scores.json"
    data = json.loads(scores.read_text())
    data["candidates"][0]["score"] = float("nan")
    scores.write_text(json.dumps(data))
    name = data["candidates"][0]["name"]
    code, err = run(capsys, "select", scores, "--budget", "0.1", "--out", tmp_path / "run", "--overwrite")
    assert code == 1
    assert err == (f"error: ArtifactError: scores.json hold non-finite or non-numeric scores for ['{name} (nan)']; a "
                   "NaN would rank first and be removed: re-run the analysis (a model whose outputs are not finite is "
                   "refused there)")
    data["candidates"][0]["score"] = "high"  # a text where a number belongs
    scores.write_text(json.dumps(data))
    code, err = run(capsys, "select", scores, "--budget", "0.1", "--out", tmp_path / "run", "--overwrite")
    assert code == 1 and "non-finite or non-numeric scores for [\"" + name + " ('high')\"]" in err
    assert not (tmp_path / "run" / "plan.json").exists()


def test_a_long_prompt_file_encodes_only_the_prompts_the_samples_use(tmp_path):
    from ldpruner import api

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt number {i}" for i in range(10_000)) + "\n")
    scores = api.analyze("zoo:mnist-t2i", prompts=prompts, num_samples=3, steps=1, progress=False)
    assert scores.prompts == ("prompt number 0", "prompt number 1", "prompt number 2")


def test_repeated_bench_budgets_are_refused_before_anything_runs(capsys, tmp_path):
    code, err = run(capsys, "bench", "random:sd-tiny", "--out", tmp_path / "b", "--budgets", "0.3", "0.3", "0.3")
    assert code == 1 and err.endswith("budgets repeat a value: [0.3, 0.3, 0.3]")
    assert not (tmp_path / "b").exists()


def test_user_files_in_out_are_never_replaced_without_overwrite(unet_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "operators.txt").write_text("my notes")
    code, err = run(capsys, "build", unet_dir, "--out", out, *FAST)
    assert (code, err) == (1, f"error: ArtifactError: --out {str(out)!r} holds ['operators.txt'], which no ldpruner "
                              "build wrote (there is no .ldpruner-build.json); they may be your files: choose another "
                              "folder, or pass --overwrite to replace them")
    assert (out / "operators.txt").read_text() == "my notes" and sorted(p.name for p in out.iterdir()) == [
        "operators.txt"]
    # an --out that is a link into another folder is not written through
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    code, err = run(capsys, "build", unet_dir, "--out", link, *FAST)
    assert (code, err) == (1, f"error: ArtifactError: --out {str(link)!r} is a symbolic link (to {str(out)!r}); "
                              "ldpruner does not write through a link into another folder: pass the folder itself, "
                              "or --overwrite")
    # inspect --json onto an existing file, the same promise
    target = tmp_path / "ops.json"
    target.write_text("keep")
    code, err = run(capsys, "inspect", unet_dir, "--json", target)
    assert (code, err) == (1, f"error: ArtifactError: {str(target)!r} exists; pass --overwrite (overwrite=True) to "
                              "replace it")
    assert target.read_text() == "keep"
    assert run(capsys, "inspect", unet_dir, "--json", target, "--overwrite")[0] == 0 and target.read_text() != "keep"


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


def test_a_candidate_whose_removal_diverges_scores_inf_and_is_never_selected(unet_dir, tmp_path, capsys):
    assert run(capsys, "analyze", unet_dir, "--out", tmp_path, *FAST)[0] == 0
    data = json.loads((tmp_path / "scores.json").read_text())
    lowest = min(data["candidates"], key=lambda c: c["score"])
    lowest.update(score=float("inf"), mu_term=float("inf"), sigma_term=float("inf"))
    (tmp_path / "scores.json").write_text(json.dumps(data))
    assert run(capsys, "select", tmp_path / "scores.json", "--budget", "0.1", "--out", tmp_path)[0] == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["removals"] and lowest["name"] not in {r["name"] for r in plan["removals"]}


def test_a_lock_naming_this_very_process_is_stale(unet_dir, tmp_path, capsys):
    import os
    import socket

    out = tmp_path / "run"
    out.mkdir()
    (out / ".ldpruner-build.lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # pids reused after a restart
    assert run(capsys, "build", unet_dir, "--out", out, *FAST, "--distill-steps", "0", "--overwrite")[0] == 0
    assert not (out / ".ldpruner-build.lock").exists()
