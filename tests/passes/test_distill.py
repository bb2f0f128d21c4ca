"""Distillation: feature taps through the fx graphs, the loss terms, the schedule, a run that learns, bit-identical
resume after an interruption, DDP with two gloo processes, and the typed errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_tiny_sd_unet, make_tiny_unet2d
from test_remove import plan_for

from ldpruner.base.errors import ArtifactError, ConfigError, DistillError, TapError
from ldpruner.compiler.graph import build_operator_graph
from ldpruner.compiler.taps import group_outputs, match_taps, tapped
from ldpruner.compiler.tracer import trace_unet
from ldpruner.passes.conditioning import random_conditioning
from ldpruner.passes.distill import DistillConfig, distill, feature_loss, latest_checkpoint, lr_factor
from ldpruner.passes.distill.data import LatentData, TeacherTrajectories
from ldpruner.passes.remove import prune
from ldpruner.passes.student import load_student

SD_PLAN = ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "up_blocks.1.attentions.1"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _setup(seed: int = 3):
    from diffusers import DDIMScheduler

    model = make_tiny_sd_unet(seed=seed)
    traced = trace_unet(model, granularity="block")
    og = build_operator_graph(traced)
    pruned = prune(traced, plan_for(og, SD_PLAN), operator_graph=og, config=model.config)
    teacher = trace_unet(model, granularity="block")
    cond = random_conditioning(num_rows=4, seed=0, cross_attention_dim=32, seq_len=8)
    data = TeacherTrajectories(teacher.gm, teacher.input_names, DDIMScheduler(), conditioning=cond,
                               latent_shape=(4, 16, 16), trajectories=6, steps=4, guidance_scale=5.0, seed=0,
                               renoise=0.5)
    return pruned, teacher, data


FAST = dict(batch_size=4, warmup_steps=2, lr=1e-3)


def _cut_and_resume(config: DistillConfig, out, kill_at: int):
    """A run interrupted at step ``kill_at`` (as a kill would: its last checkpoint is the last thing written), then
    resumed by a fresh process in which nothing survives but the files; returns the resumed result."""
    pruned, teacher, data = _setup()

    def kill(row):
        if row["step"] == kill_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(pruned, teacher, data, config=config, out=out, progress=False, callback=kill)
    assert not (out / "student").exists()
    pruned, teacher, data = _setup()
    return distill(pruned, teacher, data, config=config, out=out, resume=True, progress=False)


# --- taps --------------------------------------------------------------------------------------------------------

def test_taps_expose_each_block_output_without_changing_the_graph():
    traced = trace_unet(make_tiny_sd_unet(), granularity="sublayer")
    before = traced.gm.code
    outputs = group_outputs(traced.gm)
    assert list(outputs) == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert outputs["down_blocks.0"].target == "down_blocks.0.downsamplers.0"
    tap = tapped(traced.gm, list(outputs))
    inputs = [traced.example_inputs[n] for n in traced.input_names]
    with torch.no_grad():
        out, feats = tap(*inputs)
        assert torch.equal(out, traced.gm(*inputs))
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 8, 8), (64, 8, 8), (64, 8, 8), (64, 16, 16), (32, 16, 16)]
    assert traced.gm.code == before  # the tap is a new module over the same submodules
    assert tap.get_submodule("conv_in") is traced.gm.get_submodule("conv_in")
    with pytest.raises(TapError, match=r"no operator group \['down_blocks.7'\]"):
        tapped(traced.gm, ["down_blocks.7"])


def test_student_taps_follow_removed_operators_and_lost_groups_are_listed():
    pruned, teacher, _ = _setup()
    outputs = group_outputs(pruned.gm)
    # down_blocks.1's only resnet was removed but its 1x1 shortcut stays: the tap is the shortcut
    assert outputs["down_blocks.1"].target == "down_blocks.1.resnets.0.conv_shortcut"
    assert match_taps(teacher.gm, pruned.gm).groups == tuple(group_outputs(teacher.gm))
    model = make_tiny_unet2d()
    traced = trace_unet(model, granularity="block")
    og = build_operator_graph(traced)
    lost = prune(traced, plan_for(og, ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]),
                 operator_graph=og, config=model.config)
    taps = match_taps(traced.gm, lost.gm)
    assert taps.teacher_only == ("mid_block",) and "mid_block" not in taps.groups


# --- loss and schedule -------------------------------------------------------------------------------------------

def test_normalized_feature_loss_is_scale_free_and_mse_is_not():
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(2, 8, 4, 4, generator=gen), torch.randn(2, 16, 2, 2, generator=gen))
    s = tuple(x + 0.1 * torch.randn(x.shape, generator=gen) for x in t)
    assert float(feature_loss(t, t, "normalized")) == 0.0
    base_n, base_m = feature_loss(s, t, "normalized"), feature_loss(s, t, "mse")
    big_s, big_t = (s[0] * 100, s[1]), (t[0] * 100, t[1])
    assert float(feature_loss(big_s, big_t, "normalized")) == pytest.approx(float(base_n), rel=1e-5)
    # plain MSE: the scaled block now dominates the sum (BK-SDM's failure mode)
    assert float(feature_loss(big_s, big_t, "mse")) > 1000 * float(base_m)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    config = DistillConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, config) == pytest.approx(0.1) and lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(10, config) == pytest.approx(1.0) and lr_factor(100, config) == pytest.approx(0.1)
    assert lr_factor(55, config) == pytest.approx(0.55)
    assert lr_factor(50, DistillConfig(steps=100, warmup_steps=0, lr_schedule="constant")) == 1.0


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(steps=-1), "steps=-1 must be >= 0"),
    (dict(feature_loss="l1"), r"feature_loss='l1' is not one of \['normalized', 'mse'\]"),
    (dict(ema_decay=1.5), r"ema_decay=1.5 must be in \(0, 1\)"),
    (dict(precision="fp8"), "precision='fp8' is not one of"),
    (dict(w_out=0, w_feat=0), "every loss weight is 0"),
    (dict(optimizer="sgd"), r"optimizer='sgd' is not one of \['adamw', 'adafactor'\]"),
    (dict(teacher_dtype="int8"), r"teacher_dtype='int8' is not one of"),
    (dict(lr=0), r"lr=0"),
])
def test_bad_config_is_a_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DistillConfig(**kwargs)


# --- a run -------------------------------------------------------------------------------------------------------

def test_distillation_learns_and_writes_its_artifacts(tmp_path):
    pruned, teacher, data = _setup()
    teacher_before = {k: v.clone() for k, v in teacher.gm.state_dict().items()}
    student_before = {k: v.clone() for k, v in pruned.gm.state_dict().items()}
    config = DistillConfig(steps=24, checkpoint_every=5, keep_checkpoints=2, **FAST)
    result = distill(pruned, teacher, data, config=config, out=tmp_path, progress=False)

    losses = [r["loss"] for r in result.log]
    assert len(losses) == 24 and sum(losses[-4:]) < 0.7 * sum(losses[:4])
    assert all(r["task"] == 0 for r in result.log) and all(r["feat"] > 0 and r["out"] > 0 for r in result.log)
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.gm.state_dict().items())
    assert any(not torch.equal(student_before[k], v) for k, v in pruned.gm.state_dict().items())
    # artifacts: the distilled student reloads with identical outputs; old checkpoints are pruned
    for name in ("student/plan.json", "loss.csv", "loss.json", "loss.png", "distill.json"):
        assert (tmp_path / name).is_file(), name
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000020", "step-00000024"]
    reloaded = load_student(tmp_path / "student")
    inputs = [pruned.traced.example_inputs[n] for n in pruned.traced.input_names]
    with torch.no_grad():
        assert torch.equal(reloaded.gm(*inputs), pruned.gm(*inputs))
    summary = json.loads((tmp_path / "distill.json").read_text())
    assert summary["steps"] == 24 and summary["data"]["kind"] == "teacher-trajectories"
    assert summary["feature_taps"]["groups"][0] == "down_blocks.0"
    assert (tmp_path / "loss.csv").read_text().splitlines()[0] == "step,lr,loss,task,out,feat,grad_norm,time_s"


def test_resume_after_an_interruption_is_bit_identical(tmp_path):
    config = DistillConfig(steps=7, checkpoint_every=3, ema_decay=0.9, **FAST)
    pruned, teacher, data = _setup()
    whole = distill(pruned, teacher, data, config=config, out=tmp_path / "whole", progress=False)

    resumed = _cut_and_resume(config, tmp_path / "cut", kill_at=5)
    assert resumed.summary["resumed_from_step"] == 3 and latest_checkpoint(tmp_path / "cut").name == "step-00000007"
    a, b = whole.student.gm.state_dict(), resumed.student.gm.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in whole.log]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in resumed.log]


def test_gradient_checkpointing_trains_exactly_as_without_it(tmp_path):
    config = DistillConfig(steps=3, **FAST)
    pruned, teacher, data = _setup()
    plain = distill(pruned, teacher, data, config=config, out=tmp_path / "plain", progress=False)
    pruned, teacher, data = _setup()
    saved = distill(pruned, teacher, data, config=dataclasses.replace(config, gradient_checkpointing=True),
                    out=tmp_path / "checkpointed", progress=False)
    a, b = plain.student.gm.state_dict(), saved.student.gm.state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)  # recomputed, not approximated
    summary = saved.summary
    assert summary["gradient_checkpointing"]["on"] and summary["gradient_checkpointing"]["operators_wrapped"] >= 5
    assert plain.summary["gradient_checkpointing"] == {"on": False, "operators_wrapped": 0}
    assert summary["peak_memory"]["host_peak_rss_mib"] > 0 and summary["device"] == "cpu"
    # the saved student is the plain graph (the wrapping lives in the training graph only)
    assert "_checkpointed" not in saved.student.gm.code and "checkpoint" not in load_student(
        tmp_path / "checkpointed" / "student").gm.code


def test_gradient_accumulation_resumes_bit_identically_and_splits_the_batch(tmp_path):
    config = DistillConfig(steps=4, checkpoint_every=2, gradient_accumulation=2, gradient_checkpointing=True, **FAST)
    pruned, teacher, data = _setup()
    whole = distill(pruned, teacher, data, config=config, out=tmp_path / "whole", progress=False)
    assert whole.summary["micro_batch_per_process"] == 2

    resumed = _cut_and_resume(config, tmp_path / "cut", kill_at=3)
    a, b = whole.student.gm.state_dict(), resumed.student.gm.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    pruned, teacher, data = _setup()
    with pytest.raises(ConfigError, match=r"batch_size=4 must split evenly over 1 process\(es\) x "
                                          r"gradient_accumulation=3 micro-batches"):
        distill(pruned, teacher, data, config=dataclasses.replace(config, gradient_accumulation=3),
                out=tmp_path / "bad", progress=False)


def test_resume_and_overwrite_rules(tmp_path):
    pruned, teacher, data = _setup()
    distill(pruned, teacher, data, config=DistillConfig(steps=2, **FAST), out=tmp_path, progress=False)
    with pytest.raises(ArtifactError, match="already holds a distillation.*--resume.*--overwrite"):
        distill(pruned, teacher, data, config=DistillConfig(steps=2, **FAST), out=tmp_path, progress=False)
    with pytest.raises(DistillError, match=r"the config changed \(lr: checkpoint 0.001, now 0.002\)"):
        distill(pruned, teacher, data, config=DistillConfig(steps=4, **dict(FAST, lr=2e-3)), out=tmp_path,
                resume=True, progress=False)
    # only steps may grow on resume
    longer = distill(pruned, teacher, data, config=DistillConfig(steps=3, **FAST), out=tmp_path, resume=True,
                     progress=False)
    assert longer.summary["resumed_from_step"] == 2 and len(longer.log) == 3


def test_task_loss_needs_known_noise_and_latent_data_gives_it(tmp_path):
    from diffusers import DDIMScheduler

    pruned, teacher, data = _setup()
    with pytest.raises(DistillError, match="w_task=1.0 needs data with known noise"):
        distill(pruned, teacher, data, config=DistillConfig(steps=1, w_task=1.0, **FAST), out=tmp_path,
                progress=False)
    cond = random_conditioning(num_rows=3, seed=1, cross_attention_dim=32, seq_len=8)
    latents = torch.randn(12, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    real = LatentData(latents, DDIMScheduler(), teacher.input_names, conditioning=cond,
                      cond_ids=torch.arange(12) % 3)
    batch = real.batch(torch.Generator().manual_seed(0), 5)
    assert batch.target.shape == (5, 4, 16, 16) and batch.inputs["encoder_hidden_states"].shape == (5, 8, 32)
    result = distill(pruned, teacher, real, config=DistillConfig(steps=2, precision="bf16", **FAST),
                     out=tmp_path / "real", progress=False)
    assert all(r["task"] > 0 for r in result.log) and result.summary["data"]["kind"] == "latents"


def test_mismatched_teacher_is_refused(tmp_path):
    pruned, _, data = _setup()
    other = trace_unet(make_tiny_sd_unet(), granularity="sublayer")
    with pytest.raises(DistillError, match="teacher traced at sublayer granularity, student at block"):
        distill(pruned, other, data, config=DistillConfig(steps=1, **FAST), out=tmp_path, progress=False)


_DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    sys.path[:0] = [{tests!r}, {tests_passes!r}]
    from test_distill import _setup, FAST
    from ldpruner.base import distributed
    from ldpruner.passes.distill import DistillConfig, distill
    joined = distributed.join()
    rank, world = joined.rank, joined.size
    pruned, teacher, _ = _setup()
    from diffusers import DDIMScheduler
    from ldpruner.passes.distill.data import TeacherTrajectories
    from ldpruner.passes.conditioning import random_conditioning
    cond = random_conditioning(num_rows=4, seed=0, cross_attention_dim=32, seq_len=8)
    data = TeacherTrajectories(teacher.gm, teacher.input_names, DDIMScheduler(), conditioning=cond,
                               latent_shape=(4, 16, 16), trajectories=6, steps=4, guidance_scale=5.0, seed=0,
                               renoise=0.5, rank=rank, world=world)
    result = distill(pruned, teacher, data, config=DistillConfig(steps=3, **FAST), out={out!r}, progress=False,
                     world=joined)
    torch.save({{k: v for k, v in result.student.gm.state_dict().items()}}, {out!r} + f"/rank{{rank}}.pt")
    print(json.dumps({{"rank": rank, "rows": data.describe()["recorded_rows"]}}))
""")


def test_ddp_with_two_gloo_processes_keeps_ranks_in_step(tmp_path):
    here = os.path.dirname(__file__)
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(tests=os.path.dirname(here), tests_passes=here, out=str(tmp_path / "run")))
    (tmp_path / "run").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = sorted(json.loads(line)["rows"] for line in done.stdout.splitlines() if line.startswith("{"))
    assert len(rows) == 2  # rank 0 records trajectories 0, 2, 4 and rank 1 1, 3, 5: three each
    a = torch.load(tmp_path / "run" / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "rank1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # DDP averaged the gradients: one model on both ranks
    summary = json.loads((tmp_path / "run" / "distill.json").read_text())
    assert summary["world_size"] == 2 and summary["data"]["trajectories_on_this_rank"] == 3


def test_adafactor_keeps_a_fraction_of_adamw_state_learns_and_resumes_bit_identically(tmp_path):
    config = DistillConfig(steps=6, checkpoint_every=3, batch_size=4, warmup_steps=2, optimizer="adafactor")
    assert config.lr == 1e-2 and DistillConfig().lr == 5e-4  # each optimizer's own default, recorded resolved
    pruned, teacher, data = _setup()
    whole = distill(pruned, teacher, data, config=config, out=tmp_path / "whole", progress=False)
    assert whole.summary["config"]["optimizer"] == "adafactor" and whole.summary["config"]["lr"] == 1e-2
    losses = [r["loss"] for r in whole.log]
    assert sum(losses[-2:]) < sum(losses[:2])
    step = tmp_path / "whole" / "checkpoints" / "step-00000006"
    state, weights = (step / "optimizer.safetensors").stat().st_size, (step / "student.safetensors").stat().st_size
    # AdamW's two moments would be twice the weights; Adafactor factors each weight's last two dims (3×3 conv
    # kernels keep 2/3 of their size: this model is mostly convolutions; SDXL, mostly linear layers, keeps 10 %)
    assert state < 0.7 * weights

    resumed = _cut_and_resume(config, tmp_path / "cut", kill_at=5)
    a, b = whole.student.gm.state_dict(), resumed.student.gm.state_dict()
    assert resumed.summary["resumed_from_step"] == 3 and all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_gets_its_inputs_in_its_dtype_but_the_timestep_as_it_is():
    from ldpruner.passes.distill.trainer import _cast

    sample, timestep, ids = torch.randn(2, 4, 8, 8), torch.tensor([958.0, 925.0]), torch.tensor([1, 2])
    cast = _cast([sample, timestep, ids], ["sample", "timestep", "class_labels"], torch.bfloat16)
    assert cast[0].dtype == torch.bfloat16
    # bfloat16 would make these 960 and 924: another timestep for the teacher than for the student
    assert cast[1] is timestep and cast[2] is ids
