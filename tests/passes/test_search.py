"""The set search on a model (passes/search.py through stages.select): a set's score is the LD score of the student
pruned by that set; every plan records its joint score; a killed search resumes to the same plan; two gloo ranks
make the plan one process makes; the call cap ends with a valid plan that says so."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_sd_unet, rank_environment, run_ranks

from ldpruner import stages
from ldpruner.base.errors import ConfigError
from ldpruner.compiler.graph import build_operator_graph
from ldpruner.compiler.tracer import trace_unet
from ldpruner.passes.config import AnalysisConfig, SelectionConfig
from ldpruner.passes.deviation import LatentDeviation, latent_deviation_score
from ldpruner.passes.importance import analyze_importance, cache_key
from ldpruner.passes.inputs import resolve_conditioning, scheduler_record
from ldpruner.passes.plan import RemovalPlan
from ldpruner.passes.remove import prune
from ldpruner.passes.search import SEARCH, SetScores

FAST = AnalysisConfig(num_samples=4, steps=2, height=8, width=8)

pytestmark = pytest.mark.usefixtures("one_thread")


def graph_of(model):
    return build_operator_graph(trace_unet(model, granularity="block"))


@pytest.fixture(scope="module")
def scored():
    graph = graph_of(make_tiny_sd_unet())
    return graph, analyze_importance(graph, config=FAST, progress=False)


def select(graph, report, out=None, placement=None, **config):
    sampling = stages.Sampling(graph, FAST, None, None)
    return stages.select(report, graph, SelectionConfig(**config), out=out, overwrite=True, sampling=sampling,
                         placement=placement)


def test_a_sets_score_is_the_ld_score_of_the_student_pruned_by_it(scored):
    graph, report = scored
    plan = select(graph, report, budget=0.3)  # score order: the joint score is measured after the selection
    assert plan.joint["score"] == pytest.approx(plan.joint["mu_term"] + plan.joint["sigma_term"])
    assert plan.joint["sum_of_single_scores"] == pytest.approx(sum(r.score for r in plan.removals))
    # the student the rewrite makes from the plan, sampled exactly as the analysis sampled the dense model
    student = prune(graph.traced, plan)
    scheduler, info = scheduler_record(None)
    conditioning = resolve_conditioning(graph.traced, None, num_samples=4, seed=0, guidance_scale=FAST.guidance_scale,
                                        prompts=None, height=8, width=8, scheduler=scheduler)
    with LatentDeviation(graph, conditioning, FAST, scheduler, info) as dense:
        with LatentDeviation(build_operator_graph(student.traced), conditioning, FAST, scheduler, info) as pruned:
            mu, sigma = latent_deviation_score(dense.dense, pruned._moments())
    assert plan.joint["score"] == pytest.approx(mu + sigma, rel=1e-5)
    # a singleton's set score is its one-shot score
    with SetScores(graph, None, config=FAST, scheduler=None, key=report.cache_key, cap=10) as sets:
        first = next(iter(report))
        assert sets([[first.name]]) == [pytest.approx(first.score, rel=1e-9)]


def test_a_killed_search_resumes_to_the_same_plan(scored, tmp_path, monkeypatch):
    graph, report = scored
    whole = select(graph, report, budget=0.3, order="greedy", shortlist=8, search_cap=100)
    assert whole.budget["search"]["sets_scored"] > 20 and whole.joint is not None
    calls = []
    original = SetScores.__call__

    def killed_at_the_second_step(self, sets):
        calls.append(len({json.dumps(sorted(s)) for s in sets}))
        if len(calls) == 3:  # the one-shot orders' plans, the first step, then the kill
            raise KeyboardInterrupt
        return original(self, sets)

    monkeypatch.setattr(SetScores, "__call__", killed_at_the_second_step)
    with pytest.raises(KeyboardInterrupt):
        select(graph, report, out=tmp_path, budget=0.3, order="greedy", shortlist=8, search_cap=100)
    assert not (tmp_path / "plan.json").exists()
    saved = SEARCH.read(tmp_path)
    assert saved["cache_key"] == report.cache_key and len(saved["sets"]) == calls[0] + calls[1] == calls[0] + 8
    monkeypatch.setattr(SetScores, "__call__", original)
    resumed = select(graph, report, out=tmp_path, budget=0.3, order="greedy", shortlist=8, search_cap=100)
    assert resumed.names == whole.names and resumed.budget["search"]["resumed_sets"] == calls[0] + 8
    assert resumed.budget["search"]["unet_calls"] < whole.budget["search"]["unet_calls"]
    # the cap counts the resumed sets too: the search stops where the uninterrupted one stopped
    assert resumed.budget["search"]["counted_unet_calls"] == whole.budget["search"]["counted_unet_calls"]
    assert RemovalPlan.load(tmp_path / "plan.json") == resumed


def test_the_call_cap_ends_the_search_with_a_valid_plan_that_says_so(scored, capsys):
    graph, report = scored
    plan = select(graph, report, budget=0.3, order="greedy", search_cap=0.5)
    search = plan.budget["search"]
    # the one-shot orders' plans were scored whole, the search was cut short: the least damaged plan measured
    assert search["capped"] and search["finished_by"] is None and search["plan_of"] in ("score-per-cost", "knapsack")
    assert search["counted_unet_calls"] <= search["cap_unet_calls"]
    assert plan.budget["reached"] >= 0.3 and plan.joint["score"] > 0
    # a cap that leaves room for the dense generation and nothing else: the plan is score-per-cost's, and says so
    probe = SetScores(graph, None, config=FAST, scheduler=None, key="", cap=1.0)
    per_set, one_shot = probe.deviation.calls_per_generation, probe.cap_calls
    tight = select(graph, report, budget=0.3, order="greedy", search_cap=1.5 * per_set / one_shot)
    assert tight.budget["search"]["finished_by"] == "score-per-cost at the call cap"
    assert tight.budget["search"]["unet_calls"] == 2 * per_set  # the dense generation and the plan measured whole
    with pytest.raises(ConfigError, match=rf"search_cap=.* \(--search-cap\) allows {per_set // 2} UNet calls, fewer "
                                          rf"than the dense generation alone \({per_set}\): raise it"):
        select(graph, report, budget=0.3, order="greedy", search_cap=0.5 * per_set / one_shot)
    plan.check()
    # by default the short list is as long as lets the search finish within its cap
    roomy = select(graph, report, budget=0.3, order="greedy")
    assert not roomy.budget["search"]["capped"] and roomy.budget["search"]["finished_by"] is None
    steps, shortlist = roomy.budget["search"]["steps"], roomy.budget["shortlist"]
    assert steps <= shortlist <= len(report)
    assert roomy.budget["search"]["unet_calls"] <= roomy.budget["search"]["cap_unet_calls"]


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    rank_environment(rank, world, port)
    import torch.distributed as dist

    from ldpruner.base.placement import place

    try:
        with place("cpu", 1) as placement:
            graph = graph_of(make_tiny_sd_unet())
            report = analyze_importance(graph, config=FAST, progress=False, world=placement.world)
            plan = select(graph, report, out=Path(out_dir), placement=placement, budget=0.3, order="greedy",
                          shortlist=8, search_cap=100)
            capped = select(graph, report, placement=placement, budget=0.3, order="greedy", shortlist=20,
                            search_cap=2)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(plan.to_dict()))
        Path(out_dir, f"rank{rank}-capped.json").write_text(json.dumps(capped.to_dict()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_gloo_ranks_make_the_plan_one_process_makes(scored, tmp_path):
    graph, report = scored
    single = select(graph, report, budget=0.3, order="greedy", shortlist=8, search_cap=100)
    run_ranks(_rank_worker, 2, str(tmp_path), timeout=180)
    plans = [RemovalPlan.from_dict(json.loads((tmp_path / f"rank{r}.json").read_text())) for r in range(2)]
    assert plans[0] == plans[1] and plans[0].names == single.names
    # the cap counts what one process would: with it binding, two ranks still make the one-process plan
    capped = select(graph, report, budget=0.3, order="greedy", shortlist=20, search_cap=2)
    assert capped.budget["search"]["capped"]
    for r in range(2):
        shared = RemovalPlan.from_dict(json.loads((tmp_path / f"rank{r}-capped.json").read_text()))
        assert shared.names == capped.names
        assert shared.budget["search"]["counted_unet_calls"] == capped.budget["search"]["counted_unet_calls"]
    assert plans[0].joint["score"] == pytest.approx(single.joint["score"], rel=1e-6)
    assert RemovalPlan.load(tmp_path / "plan.json").names == single.names  # rank 0 wrote it
    assert dataclasses.asdict(SelectionConfig())["search_cap"] == 6.0 and cache_key  # the default cap


def test_a_set_key_cannot_collide_whatever_the_names_hold():
    from ldpruner.passes.search import _set_key

    assert _set_key(["a+b"]) != _set_key(["a", "b"]) and _set_key(["b", "a"]) == _set_key(["a", "b"])


def test_select_with_the_model_measures_the_joint_score_or_says_why_it_cannot(tmp_path, caplog):
    from safetensors.torch import save_file

    from ldpruner import api

    model = make_tiny_sd_unet()
    folder = tmp_path / "unet"
    model.save_pretrained(folder, safe_serialization=True)
    options = dict(num_samples=2, steps=2, height=8, width=8, guidance_scale=1.0, progress=False)
    api.analyze(str(folder), out=tmp_path / "a", **options)
    plan = api.select(tmp_path / "a" / "scores.json", model=str(folder), budget=0.3, progress=False)
    assert plan.joint is not None and plan.joint["unet_calls"] > 0
    # scores made on a calibration file the selection is not given: it cannot sample as the analysis did
    save_file({"encoder_hidden_states": torch.randn(2, 77, model.config.cross_attention_dim)},
              str(tmp_path / "calib.safetensors"))
    api.analyze(str(folder), out=tmp_path / "b", calibration=tmp_path / "calib.safetensors", **options)
    plan = api.select(tmp_path / "b" / "scores.json", model=str(folder), budget=0.3, progress=False)
    assert plan.joint is None and "the plan's joint score is not measured" in caplog.text
    with pytest.raises(ConfigError, match="order='greedy' samples as the analysis did, but this model with its "
                                          "conditioning does not make the scores' cache key again"):
        api.select(tmp_path / "b" / "scores.json", model=str(folder), budget=0.3, order="greedy", progress=False)
