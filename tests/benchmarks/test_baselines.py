"""Selection baselines (benchmarks/baselines.py) on tiny random UNets: scores, plans, the BK-SDM order, Spearman."""

from __future__ import annotations

import pytest
import torch

from benchmarks import baselines
from ldpruner import api
from ldpruner.compiler.graph import Action
from ldpruner.passes.inputs import resolve_conditioning
from tests.conftest import make_tiny_sd_unet


def _sd_unet_two_pairs():
    """SD-shaped: two pairs per down stage, three per up stage, attention only in the outer level."""
    return make_tiny_sd_unet(layers_per_block=2)


@pytest.fixture(scope="module")
def graph(one_thread):
    return api.inspect(_sd_unet_two_pairs())


def _conditioning(graph, n=2):
    return resolve_conditioning(graph.traced, None, num_samples=n, seed=0, guidance_scale=1.0)


def test_magnitude_is_mean_abs_weight_of_what_the_removal_drops(graph):
    unet = _sd_unet_two_pairs()
    scores = baselines.magnitude_scores(graph)
    assert set(scores) == {op.name for op in graph.candidates}
    block = unet.down_blocks[0].resnets[0]
    expected = torch.cat([p.detach().abs().flatten() for p in block.parameters()]).double().mean().item()
    assert scores["down_blocks.0.resnets.0"] == pytest.approx(expected, rel=1e-9)
    # a shortcut removal keeps conv_shortcut, so its weights are not part of the score
    name = next(op.name for op in graph.candidates if op.action is Action.SHORTCUT)
    module = unet.get_submodule(name)
    kept = {id(p) for p in module.conv_shortcut.parameters()}
    dropped = torch.cat([p.detach().abs().flatten() for p in module.parameters() if id(p) not in kept])
    assert scores[name] == pytest.approx(dropped.double().mean().item(), rel=1e-9)


def test_output_mse_is_zero_exactly_when_the_branch_is_zero(one_thread):
    unet = make_tiny_sd_unet()
    resnet = unet.down_blocks[0].resnets[0]
    with torch.no_grad():
        resnet.conv2.weight.zero_()
        resnet.conv2.bias.zero_()
    graph = api.inspect(unet)
    before = {k: v.clone() for k, v in graph.traced.gm.state_dict().items()}
    scores = baselines.output_mse_scores(graph, _conditioning(graph), num_samples=2, timesteps=(999, 100))
    assert set(scores) == {op.name for op in graph.candidates}
    assert scores["down_blocks.0.resnets.0"] == 0.0
    assert all(s > 0 for name, s in scores.items() if name != "down_blocks.0.resnets.0")
    after = graph.traced.gm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(graph.traced.gm.get_submodule(op.name)).__name__ == op.module_class for op in graph.candidates)


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.5])
def test_every_criterion_plan_meets_the_budget_on_candidates_only(graph, budget):
    criteria = {
        "magnitude": baselines.magnitude_scores(graph),
        "random": baselines.random_scores(graph, 0),
        "bk_sdm": baselines.bk_sdm_scores(graph),
        "output_mse": {op.name: float(i % 5) for i, op in enumerate(graph.candidates)},  # stand-in scores
    }
    candidates = {op.name for op in graph.candidates}
    for name, scores in criteria.items():
        plan = baselines.plan_for(graph, scores, budget=budget, criterion=name)
        assert plan.removed_params >= budget * graph.total_params, name
        assert set(plan.names) <= candidates, name
        assert graph.jointly_removed(plan.names) == {}, name
        assert plan.budget["criterion"] == name
        # lowest score first: the plan is a prefix of the score order, less skipped conflicts
        skipped = {s["name"] for s in plan.budget["skipped"]}
        ranked = [n for n in sorted(scores, key=lambda n: (scores[n], n)) if n not in skipped]
        assert plan.names == ranked[:len(plan.names)], name


def test_plan_skips_joint_removals():
    """Removing every resnet would also remove the time embedding: selection must skip the last one."""
    graph = api.inspect(make_tiny_sd_unet())
    resnets = [op.name for op in graph.candidates if ".resnets." in op.name]
    scores = {op.name: (0.0 if op.name in resnets else 1.0) for op in graph.candidates}
    assert graph.jointly_removed(resnets)  # the premise
    budget = sum(graph[n].params for n in resnets) / graph.total_params
    plan = baselines.plan_for(graph, scores, budget=min(0.99, budget + 0.05), criterion="hand")
    assert not set(resnets) <= set(plan.names)
    assert plan.budget["skipped"]
    assert graph.jointly_removed(plan.names) == {}


def test_bk_sdm_order_on_sd_shaped_unet(graph):
    order = baselines.bk_sdm_order(graph)
    expected = [
        # round 1: the second pair of each stage, down stages then up stages (resnet, then attention)
        "down_blocks.0.resnets.1", "down_blocks.0.attentions.1",
        "down_blocks.1.resnets.1",  # no attention in the inner level
        "up_blocks.0.resnets.1",
        "up_blocks.1.resnets.1", "up_blocks.1.attentions.1",
        # round 2: the mid block
        "mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1",
        # round 3: the remaining pairs, index 0 then 2
        "down_blocks.0.resnets.0", "down_blocks.0.attentions.0",
        "down_blocks.1.resnets.0",
        "up_blocks.0.resnets.0",
        "up_blocks.1.resnets.0", "up_blocks.1.attentions.0",
        "up_blocks.0.resnets.2",
        "up_blocks.1.resnets.2", "up_blocks.1.attentions.2",
    ]
    candidates = {op.name for op in graph.candidates}
    assert order == [n for n in expected if n in candidates]
    assert set(order) == {n for n in candidates if n.startswith(("down_blocks", "up_blocks", "mid_block"))}
    plan = baselines.plan_for(graph, baselines.bk_sdm_scores(graph), budget=0.1, criterion="bk_sdm")
    assert plan.names == order[:len(plan.names)]


def test_random_plans_differ_by_seed_and_reproduce(graph):
    a = baselines.plan_for(graph, baselines.random_scores(graph, 0), budget=0.3, criterion="random")
    b = baselines.plan_for(graph, baselines.random_scores(graph, 0), budget=0.3, criterion="random")
    plans = {tuple(baselines.plan_for(graph, baselines.random_scores(graph, s), budget=0.3,
                                      criterion="random").names) for s in range(4)}
    assert a.names == b.names
    assert len(plans) > 1


def test_plan_for_rejects_non_candidates(graph):
    from ldpruner.base.errors import ConfigError

    with pytest.raises(ConfigError, match="not candidates"):
        baselines.plan_for(graph, {"down_blocks.0.downsamplers.0": 0.0}, budget=0.1, criterion="x")


def test_spearman_on_known_rankings():
    assert baselines.spearman([1, 2, 3, 4, 5], [10, 20, 30, 40, 50])["rho"] == pytest.approx(1.0)
    r = baselines.spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert r["rho"] == pytest.approx(-1.0) and r["n"] == 5 and r["p"] < 0.05
    assert baselines.spearman([1, 1, 1], [1, 2, 3])["rho"] is None


def test_selection_summary_names_the_lowest_fd_and_the_criteria_nobody_beats_on_both_counts():
    from benchmarks.selection_quality import summarise

    def row(criterion, removed, before, after=None):
        return {"budget": 0.3, "criterion": criterion, "params_removed_fraction": removed,
                "before": {"fd": before}, "after": None if after is None else {"fd": after}}

    rows = [row("ld", 0.40, 12.0, 10.0), row("magnitude", 0.31, 11.0, 10.5), row("bk_sdm", 0.30, 15.0, 9.0),
            row("random", 0.35, 20.0), row("random", 0.33, 30.0)]
    s = summarise(rows, [0.3])["0.3"]
    assert s["criteria"]["random"]["before"] == {"fd": 25.0, "std": 5.0, "n": 2}
    assert s["criteria"]["random"]["after"] is None
    assert s["best"] == {"before": "magnitude", "after": "bk_sdm"}
    # ld removed most, magnitude has the lowest FD: neither beats the other; bk_sdm and random are beaten by both
    assert s["pareto"]["before"] == ["ld", "magnitude"]
    # after distillation: bk_sdm has the lowest FD, ld removed the most; magnitude is beaten by ld on both counts
    assert s["pareto"]["after"] == ["ld", "bk_sdm"]
