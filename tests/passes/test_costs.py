"""The latency cost model (per-operator costs on torch and onnxruntime), selection under a latency budget (greedy
and the exact knapsack), the predicted-vs-measured check, and a latency build end to end."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
from conftest import make_tiny_sd_unet
from test_remove import plan_for
from test_select import CANDS, Cand

from ldpruner.base.errors import ArtifactError, BudgetError, ConfigError
from ldpruner.compiler.graph import build_operator_graph
from ldpruner.compiler.tracer import trace_unet
from ldpruner.passes.cost_report import CostReport, OperatorCost
from ldpruner.passes.costs import CostConfig, measure_costs
from ldpruner.passes.latency_check import check_latency
from ldpruner.passes.remove import prune
from ldpruner.passes.select import SelectionConfig, select_removals


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def sd_graph():
    return build_operator_graph(trace_unet(make_tiny_sd_unet()))


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_costs_are_positive_keyed_by_candidate_and_reload(sd_graph, runtime, tmp_path):
    config = CostConfig(runtime=runtime, latency_repeats=3, latency_warmup=1)
    report = measure_costs(sd_graph, config, save_to=tmp_path / "costs.json")
    assert set(report.operators) == {op.name for op in sd_graph.candidates}
    assert all(c.ms > 0 and c.saves_ms > 0 and c.kept_basis == "measured" for c in report.operators.values())
    # a removal that keeps its 1×1 shortcut keeps part of the time; the candidates share the dense latency
    shortcuts = [op.name for op in sd_graph.candidates if op.action.value == "shortcut"]
    assert shortcuts and all(0 < report.operators[n].kept_ms < report.operators[n].ms for n in shortcuts)
    assert 0 < report.attributed_ms <= report.dense_ms * 1.0001
    assert report.placement["runtime"] == runtime and report.placement["batch"] == 2  # text-conditioned: 2
    assert report.placement["sample_shape"] == [2, 4, 16, 16]
    assert report.placement["provider"] == ("CPUExecutionProvider" if runtime == "onnxruntime" else None)
    assert CostReport.load(tmp_path / "costs.json") == report
    again = measure_costs(sd_graph, config)
    assert again.cache_key == report.cache_key and set(again.operators) == set(report.operators)


def test_torch_costs_in_bfloat16_and_their_errors(tmp_path):
    from ldpruner import api

    report = api.costs(make_tiny_sd_unet(), runtime="torch", latency_dtype="bfloat16", latency_batch=1,
                       latency_repeats=2, latency_warmup=0, device="cpu", out=tmp_path, progress=False)
    assert report.placement["dtype"] == "bfloat16" and report.placement["batch"] == 1
    assert (tmp_path / "costs.json").is_file()
    # the same options find the file again instead of measuring
    assert api.costs(make_tiny_sd_unet(), runtime="torch", latency_dtype="bfloat16", latency_batch=1,
                     latency_repeats=2, latency_warmup=0, device="cpu", out=tmp_path, progress=False) == report
    with pytest.raises(ConfigError, match=r"latency_dtype='bfloat16' with runtime='onnxruntime': onnxruntime is "
                                          r"timed on the float32 export"):
        CostConfig(runtime="onnxruntime", latency_dtype="bfloat16")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something/1"}))
    with pytest.raises(ArtifactError, match=r"not an ldpruner costs file: expected format 'ldpruner.costs/1'"):
        CostReport.load(tmp_path / "bad.json")


# --- selection under a latency budget --------------------------------------------------------------------------

def synthetic_costs(saves: dict[str, float], dense_ms: float = 100.0) -> CostReport:
    return CostReport(operators={n: OperatorCost(n, ms=v, iqr_ms=0.0, kept_ms=0.0, kept_basis="measured")
                                 for n, v in saves.items()},
                      dense_ms=dense_ms, dense_iqr_ms=0.0, attributed_ms=sum(saves.values()),
                      profiled_ms=dense_ms, config=CostConfig(), placement={"runtime": "onnxruntime", "batch": 2},
                      model_class="M", granularity="block", cache_key="k")


LATENCY = synthetic_costs({"a": 30.0, "b": 5.0, "c": 40.0, "d": 10.0})


def latency_plan(**cfg):
    return select_removals(CANDS, total_params=1000, total_macs=10000, model_class="M", granularity="block",
                           config=SelectionConfig(metric="latency", **cfg), costs=LATENCY)


def test_latency_budget_predicts_the_sum_of_the_costs_and_reaches_the_budget():
    plan = latency_plan(budget=0.4)
    # lowest score first: b (5 ms), c (40 ms) reach 45 % of 100 ms
    assert plan.names == ["b", "c"] and plan.budget["reached"] == pytest.approx(0.45)
    assert plan.latency["predicted_ms"] == pytest.approx(100 - 5 - 40)
    assert plan.latency["predicted_removed_fraction"] == pytest.approx(0.45)
    assert [r.latency_ms for r in plan.removals] == [5.0, 40.0]
    assert plan.latency["basis"]["runtime"] == "onnxruntime" and plan.latency["basis"]["costs_key"] == "k"
    saved = RemovalPlanRoundTrip.of(plan)
    assert saved.latency == plan.latency and saved.removals == plan.removals
    with pytest.raises(BudgetError, match=r"budget latency=0.9 removes more than the 85.0% of latency that are "
                                          r"removable \(4 candidates\); the largest reachable is 0.85"):
        latency_plan(budget=0.9)
    with pytest.raises(BudgetError, match=r"metric='latency' needs the latency costs"):
        select_removals(CANDS, total_params=1000, total_macs=10000, model_class="M", granularity="block",
                        config=SelectionConfig(metric="latency"))


class RemovalPlanRoundTrip:
    @staticmethod
    def of(plan):
        from ldpruner.passes.plan import RemovalPlan

        return RemovalPlan.from_dict(json.loads(json.dumps(plan.to_dict())))


def test_a_params_plan_with_costs_records_its_predicted_latency_and_plain_plans_read_as_before():
    plan = select_removals(CANDS, total_params=1000, total_macs=10000, model_class="M", granularity="block",
                           config=SelectionConfig(budget=0.3), costs=LATENCY)
    assert plan.names == ["b"] and plan.latency["predicted_ms"] == pytest.approx(95.0)
    plain = select_removals(CANDS, total_params=1000, total_macs=10000, model_class="M", granularity="block",
                            config=SelectionConfig(budget=0.3))
    assert plain.latency is None and "latency" not in plain.to_dict()
    assert "latency_ms" not in plain.to_dict()["removals"][0]


def _best_by_brute_force(cands, cost, target):
    best = None
    for n in range(len(cands) + 1):
        for subset in itertools.combinations(cands, n):
            if sum(cost(c) for c in subset) >= target:
                score = sum(c.score for c in subset)
                best = score if best is None else min(best, score)
    return best


@pytest.mark.parametrize("budget", [0.2, 0.35, 0.5, 0.7])
def test_knapsack_finds_the_least_damage_that_reaches_the_budget(budget):
    # costs on the knapsack's grid (multiples of 1/2000 of the total), so its answer is the exact optimum
    saves = {"a": 12.0, "b": 7.5, "c": 20.0, "d": 3.0, "e": 9.0, "f": 15.5, "g": 4.0, "h": 11.0}
    scores = {"a": 0.30, "b": 0.10, "c": 0.90, "d": 0.02, "e": 0.20, "f": 0.35, "g": 0.05, "h": 0.25}
    cands = [Cand(n, score=scores[n], params=1, macs=1) for n in saves]
    costs = synthetic_costs(saves)

    def plan(order):
        return select_removals(cands, total_params=8, total_macs=8, model_class="M", granularity="block",
                               config=SelectionConfig(metric="latency", budget=budget, order=order), costs=costs)

    plans = {order: plan(order) for order in ("knapsack", "score", "score-per-cost")}
    total = {order: sum(r.score for r in p.removals) for order, p in plans.items()}
    assert plans["knapsack"].budget["reached"] >= budget
    assert total["knapsack"] == pytest.approx(_best_by_brute_force(cands, lambda c: saves[c.name], budget * 100))
    assert total["knapsack"] <= min(total["score"], total["score-per-cost"]) + 1e-12
    assert all(r.reason.startswith("chosen by the knapsack") for r in plans["knapsack"].removals)


def test_knapsack_skips_what_would_remove_shared_modules():
    cands = [Cand(n, score=s, params=1, macs=1) for n, s in (("a", 0.1), ("b", 0.1), ("c", 0.5), ("d", 0.6))]
    costs = synthetic_costs({"a": 30.0, "b": 30.0, "c": 30.0, "d": 30.0})

    def jointly(names):  # a and b together would take a shared module with them
        return {"time_embedding": 100} if {"a", "b"} <= set(names) else {}

    plan = select_removals(cands, total_params=4, total_macs=4, model_class="M", granularity="block",
                           config=SelectionConfig(metric="latency", budget=0.55, order="knapsack"), costs=costs,
                           jointly_removed=jointly)
    assert not {"a", "b"} <= set(plan.names) and plan.budget["reached"] >= 0.55
    assert [s["name"] for s in plan.budget["skipped"]] and "time_embedding" in plan.budget["skipped"][0]["reason"]


# --- predicted vs measured ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_check_latency_measures_the_pruned_model_beside_the_dense_one(sd_graph, runtime):
    costs = measure_costs(sd_graph, CostConfig(runtime=runtime, latency_repeats=3, latency_warmup=1))
    names = ["down_blocks.0.attentions.0", "up_blocks.1.attentions.1", "mid_block.resnets.0"]
    pruned = prune(sd_graph.traced, plan_for(sd_graph, names), operator_graph=sd_graph)
    result = check_latency(sd_graph.traced, pruned.traced, costs, names, repeats=5, warmup=1, tolerance=0.0,
                           precision=0.5)
    assert result["predicted_cut"] == pytest.approx(1 - costs.predicted_ms(names) / costs.dense_ms)
    assert result["measured_ratio"] == pytest.approx(result["pruned_ms"] / result["dense_ms"])
    # at least the rounds asked for, more until the ratio's 95 % interval is within ±50 % of it (or a minute passed)
    assert result["repeats"] >= 5 and result["precision"] == 0.5 and isinstance(result["converged"], bool)
    low, high = result["measured_cut_interval"]
    assert low <= result["measured_cut"] <= high
    assert result["measured"].startswith(f"{result['measured_ratio']:.3f} (95% interval")
    # a ratio, not a speed claim: on a loaded machine the pruned model can time slower (speed lives in benchmarks)
    assert 0 < result["measured_ratio"] < float("inf")
    # with no tolerance, any shortfall is flagged, and the message says by how much
    assert result["flagged"] == (result["shortfall"] > 0)
    if result["flagged"]:
        assert "falls short of the predicted" in result["message"]
    # a tolerance no measurement can exceed (a pruned model timed slower than the dense one on a busy machine has a
    # shortfall above 100 %): never flagged, whatever the timings
    lax = check_latency(sd_graph.traced, pruned.traced, costs, names, repeats=2, warmup=0, tolerance=1e9,
                        precision=0.9)
    assert lax["flagged"] is False and lax["message"] is None


# --- a latency build end to end ----------------------------------------------------------------------------------

def test_latency_build_measures_costs_predicts_and_checks(tmp_path):
    from ldpruner import api

    options = dict(metric="latency", budget=0.3, num_samples=2, steps=2, distill_steps=0, latency_repeats=3,
                   latency_warmup=1, latency_precision=0.5, progress=False)
    report = api.build("random:sd-tiny", out=tmp_path, height=8, width=8, **options)
    plan = json.loads((tmp_path / "plan.json").read_text())
    latency = json.loads((tmp_path / "latency.json").read_text())
    assert latency.pop("format") == "ldpruner.latency/1"  # the report quotes the content, without the tag
    costs = CostReport.load(tmp_path / "costs.json")
    assert plan["budget"]["metric"] == "latency" and plan["latency"]["predicted_removed_fraction"] >= 0.3
    assert plan["latency"]["predicted_ms"] == pytest.approx(
        costs.dense_ms - sum(r["latency_ms"] for r in plan["removals"]))
    assert latency["predicted_cut"] == pytest.approx(plan["latency"]["predicted_removed_fraction"])
    assert latency["runtime"] == "onnxruntime" and isinstance(latency["flagged"], bool)
    assert report["latency"]["measured"] == latency and "latency predicted" in (tmp_path / "report.md").read_text()
    assert "latency -" in report["summary"]
    # the budget is judged on the measured cut: a latency plan that removes far more than asked is flagged too
    assert report["target"]["achieved"] == latency["measured_cut"] and report["target"]["metric"] == "latency"
    assert report["target"]["met"] == (0.255 <= latency["measured_cut"] <= 0.345)
    # an unchanged rebuild reuses the costs; a tighter tolerance only re-judges the measurement
    again = api.build("random:sd-tiny", out=tmp_path, height=8, width=8, **options)
    assert {"costs", "analyze", "select", "prune", "latency"} <= set(again["reused_stages"])
    stricter = api.build("random:sd-tiny", out=tmp_path, height=8, width=8, latency_tolerance=0.05, overwrite=True,
                         **options)
    assert "costs" in stricter["reused_stages"] and "latency" not in stricter["reused_stages"]
    # costs timed at other threads are other costs: refused, saying how they were measured
    with pytest.raises(ArtifactError) as info:
        api.build("random:sd-tiny", out=tmp_path, height=8, width=8, latency_tolerance=0.05, threads=2, **options)
    assert str(info.value) == (f"{str(tmp_path / 'costs.json')!r} exists; pass --overwrite (overwrite=True) to replace "
                               "it (the costs there were measured with other settings: threads 1 here, 2 now; pass "
                               "--threads 1 to reuse them)")
    # costs measured again (other timings, other bytes): what was made from them is made again too
    (tmp_path / "costs.json").unlink()
    remeasured = api.build("random:sd-tiny", out=tmp_path, height=8, width=8, latency_tolerance=0.05, **options)
    assert "costs" not in remeasured["reused_stages"] and "analyze" in remeasured["reused_stages"]
    assert not {"select", "latency"} & set(remeasured["reused_stages"])


def test_costs_of_another_model_are_refused_by_select(tmp_path, sd_graph):
    from ldpruner import api

    scores = api.analyze(make_tiny_sd_unet(), num_samples=2, steps=1, progress=False)
    other = dataclasses.replace(synthetic_costs({"x": 1.0}), model_class="UNet2DModel")
    with pytest.raises(ConfigError, match=r"the costs were measured on a UNet2DModel at block granularity, the "
                                          r"scores on a UNet2DConditionModel at block"):
        api.select(scores, costs=other, metric="latency")


def test_cli_costs_then_select_by_latency(tmp_path, capsys):
    from ldpruner.cli import main

    model = tmp_path / "unet"
    make_tiny_sd_unet().save_pretrained(model)
    assert main(["costs", str(model), "--out", str(tmp_path / "c"), "--latency-repeats", "2",
                 "--latency-warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "the candidates account for" in out and "wrote" in out
    assert main(["analyze", str(model), "--out", str(tmp_path / "a"), "--num-samples", "2", "--steps", "1"]) == 0
    assert main(["select", str(tmp_path / "a" / "scores.json"), "--costs", str(tmp_path / "c" / "costs.json"),
                 "--metric", "latency", "--budget", "0.3", "--order", "knapsack", "--out", str(tmp_path / "s")]) == 0
    assert "ms predicted" in capsys.readouterr().out
    assert torch.tensor(json.loads((tmp_path / "s" / "plan.json").read_text())["latency"]["predicted_ms"]) > 0
