"""Bad input and faults on the command line (issue 15's classes): every one a single typed `error:` line with the
exact message, a non-zero exit, and nothing written or left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CLI_FAST, make_tiny_sd_unet, run_cli

from ldpruner.cli import main

FAST = CLI_FAST
run = run_cli


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
    assert (code, err) == (1, "error: ConfigError: invalid BenchConfig: budgets repeat 0.3 (3 times); give each "
                              "budget once")
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


def test_a_candidate_whose_removal_diverges_scores_inf_and_is_never_selected(unet_dir, tmp_path, capsys):
    assert run(capsys, "analyze", unet_dir, "--out", tmp_path, *FAST)[0] == 0
    data = json.loads((tmp_path / "scores.json").read_text())
    lowest = min(data["candidates"], key=lambda c: c["score"])
    lowest.update(score=float("inf"), mu_term=float("inf"), sigma_term=float("inf"))
    (tmp_path / "scores.json").write_text(json.dumps(data))
    assert run(capsys, "select", tmp_path / "scores.json", "--budget", "0.1", "--out", tmp_path)[0] == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["removals"] and lowest["name"] not in {r["name"] for r in plan["removals"]}


# --- class 4: every artifact knows the weights it was made for ---------------------------------------------------

@pytest.fixture(scope="module")
def other_dir(tmp_path_factory) -> Path:
    """The same architecture as unet_dir, other weights (a fine-tune, as far as ldpruner can tell)."""
    path = tmp_path_factory.mktemp("other") / "unet"
    make_tiny_sd_unet(seed=1).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def scored(unet_dir, tmp_path_factory) -> Path:
    """scores.json and plan.json made for unet_dir."""
    out = tmp_path_factory.mktemp("scored")
    assert main([str(a) for a in ("analyze", unet_dir, "--out", out, *FAST)]) == 0
    assert main([str(a) for a in ("select", out / "scores.json", "--model", unet_dir, "--budget", "0.2",
                                  "--out", out)]) == 0
    return out


def _weights(path: Path) -> str:
    from ldpruner.sources import load

    return load(path).weights_id


def test_a_plan_for_other_weights_is_refused_unless_allowed_and_then_recorded(unet_dir, other_dir, scored, tmp_path,
                                                                              capsys):
    from ldpruner.passes.plan import short_id

    plan = json.loads((scored / "plan.json").read_text())
    mine, theirs = _weights(unet_dir), _weights(other_dir)
    assert plan["model_weights"] == mine != theirs
    assert json.loads((scored / "scores.json").read_text())["model_weights"] == mine
    code, err = run(capsys, "prune", other_dir, "--plan", scored / "plan.json", "--out", tmp_path / "p")
    assert (code, err) == (1, f"error: WeightsMismatchError: the plan was made for the weights {short_id(mine)}, but "
                              f"the model given has {short_id(theirs)}: pass the model with those weights, or "
                              "--allow-other-weights (allow_other_weights=True) to use it anyway (the outputs record "
                              "that you did)")
    assert not (tmp_path / "p").exists()
    code, err = run(capsys, "select", scored / "scores.json", "--model", other_dir, "--budget", "0.2", "--out",
                    tmp_path / "s")
    assert code == 1 and err.startswith(f"error: WeightsMismatchError: the scores were made for the weights "
                                        f"{short_id(mine)}, but the model given has {short_id(theirs)}")
    assert run(capsys, "select", scored / "scores.json", "--model", other_dir, "--budget", "0.2", "--out",
               tmp_path / "s", "--allow-other-weights")[0] == 0
    assert json.loads((tmp_path / "s" / "plan.json").read_text())["other_weights"] == [
        {"stage": "select", "made_for": mine, "used_with": theirs}]
    code, err = run(capsys, "select", scored / "scores.json", "--budget", "0.2", "--out", tmp_path / "s2",
                    "--allow-other-weights")
    assert (code, err) == (1, "error: ConfigError: --allow-other-weights (allow_other_weights=True) compares the "
                              "scores with --model (model=...); without a model there is nothing to allow: drop it, "
                              "or pass the model")
    assert run(capsys, "prune", other_dir, "--plan", scored / "plan.json", "--out", tmp_path / "p",
               "--allow-other-weights")[0] == 0
    student_plan = json.loads((tmp_path / "p" / "student" / "plan.json").read_text())
    assert student_plan["model_weights"] == theirs
    assert student_plan["other_weights"] == [{"stage": "prune", "made_for": mine, "used_with": theirs}]
    # the student was pruned from other_dir: distilling it against unet_dir is the mismatch now
    code, err = run(capsys, "distill", unet_dir, tmp_path / "p" / "student", "--out", tmp_path / "d", "--steps", "1",
                    "--batch-size", "2", "--trajectories", "2", "--trajectory-steps", "1")
    assert code == 1 and err.startswith(f"error: WeightsMismatchError: the student was pruned from the weights "
                                        f"{short_id(theirs)}, but the model given has {short_id(mine)}")
    # an export records the weights the student was pruned from, and the mismatch
    assert run(capsys, "export", tmp_path / "p" / "student", "--out", tmp_path / "e")[0] == 0
    exported = json.loads((tmp_path / "e" / "onnx" / "export.json").read_text())
    assert exported["model_weights"] == theirs and exported["other_weights"] == student_plan["other_weights"]


def test_distill_resume_with_another_teacher_is_refused(unet_dir, other_dir, scored, tmp_path, capsys):
    from ldpruner.passes.plan import short_id

    assert run(capsys, "prune", unet_dir, "--plan", scored / "plan.json", "--out", tmp_path / "p")[0] == 0
    student = tmp_path / "p" / "student"
    common = ["--out", tmp_path / "d", "--batch-size", "2", "--trajectories", "2", "--trajectory-steps", "1",
              "--checkpoint-every", "1"]
    assert run(capsys, "distill", unet_dir, student, "--steps", "1", *common)[0] == 0
    checkpoint = json.loads(next((tmp_path / "d" / "checkpoints").glob("step-*/state.json")).read_text())
    assert checkpoint["teacher_weights"] == _weights(unet_dir)
    # the student is the same; the teacher the checkpoint trained against is not
    code, err = run(capsys, "distill", other_dir, student, "--steps", "2", "--resume", "--allow-other-weights",
                    *common)
    assert code == 0
    summary = json.loads((tmp_path / "d" / "distill.json").read_text())
    assert summary["teacher_weights"] == _weights(other_dir)
    assert [o["stage"] for o in summary["other_weights"]] == ["distill", "distill --resume"]
    # resumed again with the same (other) teacher: the first switch is still on record
    assert run(capsys, "distill", other_dir, student, "--steps", "3", "--resume", "--allow-other-weights",
               *common)[0] == 0
    summary = json.loads((tmp_path / "d" / "distill.json").read_text())
    assert [o["stage"] for o in summary["other_weights"]] == ["distill", "distill --resume"]
    assert json.loads((tmp_path / "d" / "student" / "plan.json").read_text())["other_weights"] == summary[
        "other_weights"]
    code, err = run(capsys, "distill", unet_dir, student, "--steps", "4", "--resume", *common)
    step = next((tmp_path / "d" / "checkpoints").glob("step-00000003"))
    assert (code, err) == (1, f"error: WeightsMismatchError: cannot resume from {str(step)!r}: it was trained against "
                              f"the teacher weights {short_id(_weights(other_dir))}, MODEL has "
                              f"{short_id(_weights(unet_dir))}; pass the teacher it was trained against, "
                              "--allow-other-weights (allow_other_weights=True) to go on with this one (distill.json "
                              "records it), or --overwrite to start over")


def test_edited_plan_totals_and_text_for_numbers_are_refused(unet_dir, scored, tmp_path, capsys):
    plan = json.loads((scored / "plan.json").read_text())
    edited = dict(plan, totals=dict(plan["totals"], params_after=plan["totals"]["params_after"] - 1000))
    (tmp_path / "totals.json").write_text(json.dumps(edited))
    code, err = run(capsys, "prune", unet_dir, "--plan", tmp_path / "totals.json", "--out", tmp_path / "p")
    assert (code, err) == (1, f"error: PlanError: plan file {str(tmp_path / 'totals.json')!r} is malformed: "
                              f"ValueError: totals.params_after is "
                              f"{plan['totals']['params_after'] - 1000}, but the totals before minus the removals give "
                              f"{plan['totals']['params_after']:,}: the plan was edited; fix the totals or select "
                              "again")
    text = dict(plan, removals=[dict(plan["removals"][0], params="many"), *plan["removals"][1:]])
    (tmp_path / "text.json").write_text(json.dumps(text))
    code, err = run(capsys, "prune", unet_dir, "--plan", tmp_path / "text.json", "--out", tmp_path / "p")
    assert (code, err) == (1, f"error: PlanError: plan file {str(tmp_path / 'text.json')!r} is malformed: TypeError: "
                              f"{plan['removals'][0]['name']}: params "
                              "must be a non-negative integer, got 'many'")
    before = dict(plan, totals=dict(plan["totals"], params_before=str(plan["totals"]["params_before"])))
    (tmp_path / "before.json").write_text(json.dumps(before))
    code, err = run(capsys, "prune", unet_dir, "--plan", tmp_path / "before.json", "--out", tmp_path / "p")
    assert (code, err) == (1, f"error: PlanError: plan file {str(tmp_path / 'before.json')!r} is malformed: TypeError: "
                              "totals.params_before must be a "
                              f"non-negative integer, got '{plan['totals']['params_before']}'")
    assert not (tmp_path / "p").exists()


def test_damaged_identity_records_are_refused(unet_dir, scored, tmp_path, capsys):
    plan = json.loads((scored / "plan.json").read_text())
    for field, value, message in (
            ("model_weights", "sha256:zz", "model_weights must be 'sha256:' and 64 hex digits, or null; got "
                                           "'sha256:zz'"),
            ("other_weights", "hello", "other_weights must be a list of {stage, made_for, used_with} records, got "
                                       "'hello'")):
        (tmp_path / "plan.json").write_text(json.dumps(dict(plan, **{field: value})))
        code, err = run(capsys, "prune", unet_dir, "--plan", tmp_path / "plan.json", "--out", tmp_path / "p")
        assert (code, err) == (1, f"error: PlanError: plan file {str(tmp_path / 'plan.json')!r} is malformed: "
                                  f"TypeError: {message}")
    common, state_path = _distilled_one_step(unet_dir, scored, tmp_path, capsys)
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps(dict(state, teacher_weights=5)))
    code, err = run(capsys, "distill", *common, "--steps", "2", "--resume")
    assert (code, err) == (1, f"error: DistillError: checkpoint {str(state_path)!r} has a damaged teacher record "
                              "(teacher_weights 5, resumed_with_other_teachers []); delete "
                              f"{str(state_path.parent)!r} to resume from an earlier checkpoint, or start over with "
                              "--overwrite")
    # without its checkpoints a finished distillation cannot be continued, and is not silently replaced
    import shutil

    shutil.rmtree(tmp_path / "d" / "checkpoints")
    distilled = (tmp_path / "d" / "distill.json").read_bytes()
    code, err = run(capsys, "distill", *common, "--steps", "2", "--resume")
    assert (code, err) == (1, f"error: ArtifactError: resume=True (--resume) found no checkpoint in "
                              f"{str(tmp_path / 'd' / 'checkpoints')!r}, but {str(tmp_path / 'd')!r} holds ['student', "
                              "'distill.json'] of an earlier distillation, which cannot be continued without its "
                              "checkpoints; pass overwrite=True (--overwrite) to start over")
    assert (tmp_path / "d" / "distill.json").read_bytes() == distilled


# --- classes 5 and 7: the rest of the one-line errors ------------------------------------------------------------

def test_a_truncated_onnx_model_is_a_typed_error(unet_dir, tmp_path, capsys):
    from ldpruner.base.errors import ArtifactError
    from ldpruner.runtime.unet import ORTUNet

    assert run(capsys, "export", unet_dir, "--out", tmp_path)[0] == 0
    onnx = tmp_path / "onnx" / "unet.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=r"^onnxruntime cannot load '.*unet\.onnx' \(.*\); the file \(or its "
                                            r"\.data file beside it\) is damaged or incomplete: export it again$"):
        ORTUNet.from_pretrained(tmp_path / "onnx")


def test_an_edited_student_trace_is_a_typed_error(unet_dir, scored, tmp_path, capsys):
    assert run(capsys, "prune", unet_dir, "--plan", scored / "plan.json", "--out", tmp_path)[0] == 0
    trace_path = tmp_path / "student" / "trace.json"
    trace = json.loads(trace_path.read_text())
    trace["input_names"].append("mask")
    trace_path.write_text(json.dumps(trace))
    code, err = run(capsys, "export", tmp_path / "student", "--out", tmp_path / "e")
    assert (code, err) == (1, f"error: ArtifactError: {str(trace_path)!r} is malformed: KeyError: \"input_names "
                              "['mask'] have no example_inputs entry\"")
    trace["input_names"].pop()
    trace["example_inputs"]["sample"]["shape"] = [2, 4, -8, 8]
    trace_path.write_text(json.dumps(trace))
    code, err = run(capsys, "export", tmp_path / "student", "--out", tmp_path / "e")
    assert (code, err) == (1, f"error: ArtifactError: {str(trace_path)!r} is malformed: ValueError: example input "
                              "'sample' has shape [2, 4, -8, 8]; a shape is a list of positive sizes")


def _distilled_one_step(unet_dir: Path, scored: Path, tmp_path: Path, capsys) -> tuple[list, Path]:
    """A student pruned by scored's plan and distilled one step into tmp_path/d: (the distill arguments, its
    checkpoint's state.json)."""
    assert run(capsys, "prune", unet_dir, "--plan", scored / "plan.json", "--out", tmp_path / "p")[0] == 0
    common = [unet_dir, tmp_path / "p" / "student", "--out", tmp_path / "d", "--batch-size", "2", "--trajectories",
              "2", "--trajectory-steps", "1"]
    assert run(capsys, "distill", *common, "--steps", "1")[0] == 0
    return common, next((tmp_path / "d" / "checkpoints").glob("step-*/state.json"))


def test_a_checkpoint_state_missing_a_key_is_a_typed_error(unet_dir, scored, tmp_path, capsys):
    common, state_path = _distilled_one_step(unet_dir, scored, tmp_path, capsys)
    state = json.loads(state_path.read_text())
    del state["world_size"]
    state_path.write_text(json.dumps(state))
    code, err = run(capsys, "distill", *common, "--steps", "2", "--resume")
    assert (code, err) == (1, f"error: DistillError: checkpoint {str(state_path)!r} lacks ['world_size']: it is "
                              f"damaged; delete {str(state_path.parent)!r} to resume from an earlier checkpoint, or "
                              "start over with --overwrite")


@pytest.mark.parametrize("edit", ["wider", "deeper"])
def test_weights_that_config_json_does_not_describe_are_one_short_line(edit, tmp_path, capsys):
    folder = tmp_path / "unet"
    make_tiny_sd_unet().save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    if edit == "wider":
        config["cross_attention_dim"] = 64
    else:
        config["layers_per_block"] = [3, 1]
    (folder / "config.json").write_text(json.dumps(config))
    code, err = run(capsys, "inspect", folder)
    expected = {
        "wider": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight is [32, 32] in the weights but "
                 "config.json makes it [32, 64]",
        "deeper": "config.json asks for weights the files lack (148, e.g. down_blocks.0.attentions.1.norm.bias)"}[edit]
    assert (code, err) == (1, f"error: ModelLoadError: cannot load UNet2DConditionModel weights from {str(folder)!r}: "
                              f"{expected}; config.json does not describe these weights (edited, or from another "
                              "model): restore the config.json saved with them")


@pytest.mark.parametrize("args, message", [
    (["--height", "0"], "ConfigError: invalid BuildConfig: height=0 must be >= 1"),
    (["--width", "-8"], "ConfigError: invalid BuildConfig: width=-8 must be >= 1"),
    (["--opset", "5"], "ConfigError: invalid BuildConfig: opset 5 is outside what the legacy exporter writes "
                       "(14..20); use opset=None for its default"),
    (["--fp16"], "ConfigError: invalid BuildConfig: fp16=True needs optimize=True: the fp16 variant is made from the "
                 "optimized model"),
    (["--config", "{folder}"], "ConfigError: config file '{folder}' cannot be read: [Errno 21] Is a directory: "
                               "'{folder}'"),
    (["--config", "{latin1}"], "ConfigError: config file '{latin1}' cannot be read: 'utf-8' codec can't decode byte "
                               "0xe9 in position 14: invalid continuation byte"),
])
def test_nonsense_options_are_refused_before_anything_is_loaded_or_written(args, message, unet_dir, tmp_path,
                                                                             capsys):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('prompts = "caf\u00e9 au lait"\n'.encode("latin-1"))
    fill = {"folder": str(tmp_path), "latin1": str(latin1)}
    out = tmp_path / "run"
    code, err = run(capsys, "build", unet_dir, "--out", out, *[a.format(**fill) for a in args])
    assert (code, err) == (1, "error: " + message.format(**fill))
    assert not out.exists()
