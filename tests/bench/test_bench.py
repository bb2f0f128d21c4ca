"""The bench stage: the interleaved latency helper (on a fake clock, no timing assertions) and a smoke run of
``ldpruner bench`` / ``api.bench`` on a tiny seeded UNet."""

from __future__ import annotations

import json
import random

import pytest

from ldpruner.base.errors import ArtifactError, ConfigError
from ldpruner.bench.latency import measure_interleaved


class FakeClock:
    """Time advances only when a variant runs, by that variant's fixed cost (seconds)."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def variant(self, name: str, cost: float):
        def run():
            self.calls.append(name)
            self.now += cost
        return run


def test_measure_interleaved_rotates_order_and_takes_medians():
    clock = FakeClock()
    run = measure_interleaved({"dense": clock.variant("dense", 2.0), "pruned": clock.variant("pruned", 1.5)},
                              warmup=2, repeats=5, clock=clock)
    assert clock.calls[:4] == ["dense", "pruned", "dense", "pruned"]  # warm-up, untimed
    assert len(clock.calls) == 2 * 2 + 2 * 5
    assert run.order == ("dense", "pruned", "pruned", "dense", "dense", "pruned", "pruned", "dense", "dense", "pruned")
    assert clock.calls[4:] == list(run.order)
    assert run.stats["dense"].times_s == (2.0,) * 5 and run.stats["pruned"].median_s == 1.5
    assert run.stats["dense"].iqr_s == 0.0
    assert run.ratio("pruned", "dense") == pytest.approx(0.75)
    d = run.to_dict(ratio=("pruned", "dense"))
    assert d["ratio"] == pytest.approx(0.75) and d["dense"]["repeats"] == 5 and d["warmup"] == 2


def test_measure_interleaved_three_variants_and_spread():
    clock = FakeClock()
    costs = iter([1.0, 3.0, 2.0, 5.0])  # sorted 1 2 3 5: median 2.5; inclusive quartiles 1.75, 3.5
    variants = {"a": lambda: setattr(clock, "now", clock.now + next(costs)), "b": clock.variant("b", 1.0),
                "c": clock.variant("c", 1.0)}
    run = measure_interleaved(variants, warmup=0, repeats=4, clock=clock)
    assert run.order[:6] == ("a", "b", "c", "b", "c", "a")
    assert run.stats["a"].median_s == pytest.approx(2.5)
    assert run.stats["a"].iqr_s == pytest.approx(3.5 - 1.75)


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}, {"repeats": True}])
def test_measure_interleaved_rejects_bad_counts(kwargs):
    with pytest.raises(ConfigError):
        measure_interleaved({"a": lambda: None}, **kwargs)
    with pytest.raises(ConfigError, match="variants is empty"):
        measure_interleaved({})


def test_measure_ratio_stops_once_the_ratio_is_known_to_the_precision_asked():
    from ldpruner.runtime.timing import measure_ratio

    clock = FakeClock()
    steady = measure_ratio({"dense": clock.variant("dense", 2.0), "pruned": clock.variant("pruned", 1.0)},
                           "pruned", "dense", warmup=0, repeats=6, clock=clock)
    assert steady.converged and steady.run.repeats == 6  # no spread: the first rounds settle it
    assert (steady.ratio, steady.low, steady.high) == (0.5, 0.5, 0.5)
    assert steady.describe() == "0.500 (95% interval 0.500–0.500, 6 rounds)"

    clock = FakeClock()
    rng = random.Random(0)
    variants = {"dense": lambda: setattr(clock, "now", clock.now + 2.0 * rng.uniform(0.5, 1.5)),
                "pruned": lambda: setattr(clock, "now", clock.now + rng.uniform(0.5, 1.5))}
    noisy = measure_ratio(variants, "pruned", "dense", warmup=0, repeats=6, precision=0.001, max_repeats=60,
                          max_seconds=1e9, clock=clock)
    assert not noisy.converged and noisy.run.repeats == 60  # ±50 % noise never settles to ±0.1 %
    assert noisy.low < noisy.ratio < noisy.high and noisy.describe().endswith("wider than ±0%: a noisy machine)")
    assert len(noisy.run.stats["dense"].times_s) == 60

    clock = FakeClock()  # 10 s calls (a full-size UNet on a CPU): rounds past the first stop at the time allowed
    slow = measure_ratio({"dense": clock.variant("dense", 10.0), "pruned": lambda: setattr(
        clock, "now", clock.now + 10.0 * rng.uniform(0.5, 1.5))}, "pruned", "dense", warmup=1, repeats=2,
        precision=0.001, max_seconds=60.0, clock=clock)
    assert not slow.converged and slow.run.repeats == 3 and clock.now <= 60.0 + 2 * 15.0  # one round past 60 s

    clock = FakeClock()
    loose = measure_ratio(variants, "pruned", "dense", warmup=0, repeats=6, precision=0.5, clock=clock)
    assert loose.converged and 6 <= loose.run.repeats <= 24  # a loose precision stops after a few rounds
    with pytest.raises(ConfigError, match=r"measure_ratio: precision must be in \(0, 1\); got 0; the ratio 'x' / "
                                          r"'dense' names variants not in \['dense', 'pruned'\]"):
        measure_ratio(variants, "x", "dense", precision=0)


def test_bench_config_collects_every_problem(tmp_path):
    from ldpruner import api

    with pytest.raises(ConfigError) as info:
        api.bench("random:sd-tiny", out=tmp_path, budgets=[0.2, 1.5], repeats=0, metric="flops")
    message = str(info.value)
    assert "budgets" in message and "repeats" in message and "metric" in message
    with pytest.raises(ConfigError, match=r"distill_data is one model's dataset.*\(got 2 models\); distill_data needs "
                                          r"distill_steps > 0"):
        api.bench(["zoo:crawl-tiles", "zoo:espeak-digits"], out=tmp_path, distill_data=tmp_path)
    assert not (tmp_path / "report.json").exists()


def test_bench_distils_on_a_dataset_folder(tmp_path):
    """--distill-data: the pruned zoo model is distilled on VAE-encoded images (denoising loss added)."""
    import numpy as np
    from PIL import Image

    from ldpruner import api

    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"tile{i}.png")
    report = api.bench("zoo:crawl-tiles", out=tmp_path / "bench", budgets=[0.2], distill_steps=2, distill_data=tmp_path,
                       distill_options={"batch_size": 2}, quality=False, memory=False, repeats=1, warmup=0,
                       batch_sizes=[1], num_samples=2, steps=1, progress=False)
    (entry,) = report["models"][0]["budgets"]
    assert entry["distill"]["data"] == str(tmp_path) and entry["distill"]["steps"] == 2
    distilled = json.loads(
        (tmp_path / "bench" / "zoo-crawl-tiles" / "budget-0.20" / "distill" / "distill.json").read_text())
    assert distilled["data"]["kind"] == "latents" and distilled["data"]["rows_on_this_rank"] == 4


def test_bench_smoke_tiny_unet(tmp_path):
    from ldpruner import api
    from tests.conftest import make_tiny_sd_unet

    out = tmp_path / "bench"
    report = api.bench(make_tiny_sd_unet(), out=out, budgets=[0.2], repeats=2, warmup=1, quality=True,
                       num_samples=2, steps=1, latency_precision=0.9, progress=False)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["format"] == "ldpruner.bench/2" and on_disk["config"]["budgets"] == [0.2]
    (model,) = on_disk["models"]
    assert model["quality"] == {"available": False, "reason": model["quality"]["reason"]}  # not a zoo model
    assert model["dense"]["onnx"]["passed"]
    (entry,) = model["budgets"]
    assert entry["removed"]
    assert entry["params"]["pruned"] < entry["params"]["dense"] == model["dense"]["params"]
    assert entry["params"]["ratio"] == pytest.approx(entry["params"]["pruned"] / entry["params"]["dense"])
    assert 0 < entry["macs_per_sample"]["ratio"] < 1
    assert entry["onnx"]["passed"] and entry["onnx"]["max_abs_diff"] < 1e-3
    for runtime in ("torch", "onnxruntime"):
        assert set(entry["latency"][runtime]) == {"batch_1", "batch_2"}
        for lat in entry["latency"][runtime].values():
            rounds = lat["repeats"]  # 2, and more when ±90 % was not reached: the interval says how well it is known
            assert lat["order"][:4] == ["dense", "pruned", "pruned", "dense"] and len(lat["order"]) == 2 * rounds
            assert lat["dense"]["repeats"] == lat["pruned"]["repeats"] == rounds >= 2
            assert lat["ratio"] == pytest.approx(lat["pruned"]["median_ms"] / lat["dense"]["median_ms"])
            assert lat["interval"][0] <= lat["ratio"] <= lat["interval"][1] and lat["precision"] == 0.9
    # the budget asked for against what the plan removed (parameters: counted)
    assert entry["target"]["metric"] == "params" and entry["target"]["budget"] == 0.2
    assert entry["target"]["achieved"] == pytest.approx(1 - entry["params"]["ratio"])
    assert entry["target"]["met"] == (0.17 <= entry["target"]["achieved"] <= 0.23)
    assert entry["distill"] is None  # distill_steps=0; the distilled variant is exercised by the real runs
    mem = entry["peak_memory_onnx"]
    if mem["available"]:  # Linux
        assert mem["run_peak_ratio"] == pytest.approx(mem["run_peak_mib"]
                                                      / model["dense"]["peak_memory_onnx"]["run_peak_mib"])
        assert mem["model_mib"] > 0
    assert (out / "report.md").read_text().startswith("# ldpruner bench")
    assert (out / model["plots"]["latency"].split("/")[-2] / "latency.png").is_file()
    assert report["models"][0]["budgets"][0]["params"] == entry["params"]

    with pytest.raises(ArtifactError, match="overwrite"):
        api.bench("random:sd-tiny", out=out, budgets=[0.2])


def test_missing_metric_package_is_a_typed_error(monkeypatch):
    import sys

    import ldpruner.bench
    from ldpruner.base.errors import BenchError
    from ldpruner.bench.quality import QualityMeter

    # a fresh import of the metrics, in a world without scipy (their FD needs it; the [bench] extra installs it)
    for name in [m for m in sys.modules if m.startswith(("ldpruner.bench.metrics", "scipy"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(ldpruner.bench, "metrics", raising=False)
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(BenchError, match=r"quality metrics need the package 'scipy'.*ldpruner\[bench\]"):
        QualityMeter("mnist-t2i", 10)


def test_bench_with_a_latency_budget_predicts_and_measures_each_plan(tmp_path):
    from ldpruner import api

    report = api.bench("random:sd-tiny", out=tmp_path, budgets=[0.3], metric="latency", order="knapsack",
                       runtime="torch", batch_sizes=[2], quality=False, memory=False, repeats=2, warmup=1,
                       num_samples=2, steps=1, latency_precision=0.9, progress=False)
    (entry,) = report["models"][0]["budgets"]
    plan = json.loads((tmp_path / "random-sd-tiny" / "costs.json").read_text())
    assert plan["placement"]["runtime"] == "torch" and entry["order"] == "knapsack"
    prediction = entry["latency_prediction"]
    # the measured cut is this budget's own torch batch-2 ratio
    assert prediction["measured_cut"] == pytest.approx(1 - entry["latency"]["torch"]["batch_2"]["ratio"])
    assert prediction["predicted_cut"] >= 0.3 and prediction["batch"] == 2
    assert prediction["flagged"] == (prediction["shortfall"] > prediction["tolerance"])
    assert "latency cut predicted / measured" in (tmp_path / "report.md").read_text()
    # a latency budget is judged on the measured cut
    assert entry["target"]["achieved"] == prediction["measured_cut"] and entry["target"]["basis"].startswith(
        "measured (torch, batch 2)")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A finished build of a tiny UNet folder: 30 % of the parameters, distilled one step."""
    from ldpruner import api
    from tests.conftest import make_tiny_sd_unet

    root = tmp_path_factory.mktemp("build")
    make_tiny_sd_unet().save_pretrained(root / "unet", safe_serialization=True)
    report = api.build(str(root / "unet"), out=root / "out", budget=0.3, num_samples=2, steps=1, distill_steps=1,
                       distill_options={"batch_size": 2, "trajectories": 2, "trajectory_steps": 2}, samples=False,
                       progress=False)
    return root / "out", report


def test_the_build_report_states_the_budget_asked_for_and_whether_it_was_met(built):
    out, report = built
    plan = json.loads((out / "plan.json").read_text())
    target = report["target"]
    assert (target["metric"], target["budget"], target["basis"]) == ("params", 0.3, "counted")
    assert target["achieved"] == pytest.approx(plan["totals"]["params_removed_fraction"])
    assert target["range"] == pytest.approx([0.255, 0.345]) and target["met"] == (0.255 <= target["achieved"] <= 0.345)
    assert ("target met" if target["met"] else "TARGET MISSED") in report["summary"]
    markdown = (out / "report.md").read_text()
    assert f"**Target {'met' if target['met'] else 'MISSED'}.** T{target['line'][1:]}." in markdown


def test_bench_of_a_build_folder_measures_the_plan_students_and_onnx_the_build_ships(built, tmp_path):
    from ldpruner import api

    out, _ = built
    report = api.bench(str(out), out=tmp_path, repeats=2, warmup=1, batch_sizes=[1], latency_precision=0.9,
                       quality=False, memory=False, progress=False)
    (record,) = report["models"]
    (entry,) = record["budgets"]  # the build's one plan, not the bench's default budgets
    plan = json.loads((out / "plan.json").read_text())
    assert entry["label"] == "build" and (entry["metric"], entry["budget"]) == ("params", 0.3)
    assert entry["removed"] == [r["name"] for r in plan["removals"]]
    assert entry["onnx"]["path"] == str(out / "onnx" / "unet.onnx")
    assert entry["distill"]["student"] == str(out / "distill" / "student") and entry["distill"]["steps"] == 1
    assert record["build"]["path"] == str(out) and record["model_weights"] == plan["model_weights"]
    assert entry["target"]["achieved"] == pytest.approx(plan["totals"]["params_removed_fraction"])
    assert entry["params"]["pruned"] == plan["totals"]["params_after"]
    for runtime in ("torch", "onnxruntime"):
        assert entry["latency"][runtime]["batch_1"]["ratio"] > 0
    assert "build (params 30%)" in (tmp_path / "report.md").read_text()


def test_bench_refuses_a_build_that_changed_or_did_not_finish(built, tmp_path):
    import shutil

    from ldpruner import api

    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "plan.json", "a") as f:
        f.write(" ")
    with pytest.raises(ArtifactError) as info:
        api.bench(str(copy), out=tmp_path / "b1", quality=False, progress=False)
    assert str(info.value) == (f"{str(copy / 'plan.json')!r} changed since the build wrote it: bench measures a "
                               f"build only as it was made; run `ldpruner build` into {str(copy)!r} again (with "
                               "--overwrite)")
    shutil.rmtree(copy)
    shutil.copytree(out, copy)
    (copy / "report.json").unlink()
    with pytest.raises(ArtifactError) as info:
        api.bench(str(copy), out=tmp_path / "b2", quality=False, progress=False)
    assert str(info.value) == (f"{str(copy)!r} holds no finished build (it has no report.json): run `ldpruner build` "
                               "into it first")
    shutil.copytree(out, copy, dirs_exist_ok=True)
    (copy / "report.json").write_text((out / "report.json").read_text())
    state = json.loads((copy / ".ldpruner-build.json").read_text())
    state["files"]["select"]["plan.json"] = "0" * 64  # plan.json made again, the build stopped before its report
    (copy / ".ldpruner-build.json").write_text(json.dumps(state))
    with pytest.raises(ArtifactError, match=r"report.json' describes another build than the files beside it \(e.g. "
                                            r"plan.json: a build stopped after its stages, before its report\)"):
        api.bench(str(copy), out=tmp_path / "b4", quality=False, progress=False)
    (copy / ".ldpruner-build.json").write_text("{")
    with pytest.raises(ArtifactError, match=r"the build record .* is damaged \(JSONDecodeError: .*\); ldpruner cannot "
                                            r"tell which files a build wrote; run `ldpruner build` into .* again "
                                            r"\(with --overwrite\)$"):
        api.bench(str(copy), out=tmp_path / "b3", quality=False, progress=False)
    assert not any((tmp_path / b).exists() for b in ("b1", "b2", "b3", "b4"))  # refused before anything was written


def test_a_build_folder_whose_onnx_fixes_the_text_length_is_refused_saying_so(built, tmp_path):
    """A build folder of an earlier ldpruner: its export fixed the text at 77 tokens. Its export stage is made again
    only with --overwrite, and the refusal says why the files there would change."""
    import hashlib
    import shutil

    from ldpruner import api

    out, report = built
    old = tmp_path / "old"
    shutil.copytree(out, old)
    summary = json.loads((old / "onnx" / "export.json").read_text())
    del summary["export"]["dynamic_axes"]["encoder_hidden_states"]["1"]
    (old / "onnx" / "export.json").write_text(json.dumps(summary))
    state = json.loads((old / ".ldpruner-build.json").read_text())
    state["export"] = "0123456789abcdef"  # the key of an export without the format tag
    state["files"]["export"]["onnx/export.json"] = hashlib.sha256((old / "onnx" / "export.json").read_bytes()
                                                                  ).hexdigest()
    (old / ".ldpruner-build.json").write_text(json.dumps(state))
    config = report["config"]
    with pytest.raises(ArtifactError) as info:
        api.build(config["model"], out=old, budget=0.3, num_samples=2, steps=1, distill_steps=1,
                  distill_options={"batch_size": 2, "trajectories": 2, "trajectory_steps": 2}, samples=False,
                  progress=False)
    assert str(info.value) == (f"{str(old / 'onnx' / 'export.json')!r} exists; pass --overwrite (overwrite=True) to "
                               "replace it (the ONNX model there takes a fixed number of tokens, as an earlier "
                               "ldpruner exported it, and pipelines with another text length cannot use it: "
                               "--overwrite exports it again with the text length free)")


def test_a_build_made_from_a_relative_model_path_is_benched_from_anywhere(built, tmp_path, monkeypatch):
    from ldpruner import api

    out, _ = built
    monkeypatch.chdir(out.parent)  # the folder holding unet/: MODEL as a user types it there
    api.build("unet", out=tmp_path / "rel", budget=0.3, num_samples=2, steps=1, distill_steps=0, samples=False,
              progress=False)
    assert json.loads((tmp_path / "rel" / "report.json").read_text())["config"]["model"] == str(out.parent / "unet")
    monkeypatch.chdir(tmp_path)
    report = api.bench(str(tmp_path / "rel"), out=tmp_path / "b", repeats=2, warmup=0, batch_sizes=[1],
                       latency_precision=0.9, quality=False, memory=False, progress=False)
    assert report["models"][0]["build"]["model"] == str(out.parent / "unet")


def test_one_round_is_never_called_precise():
    from ldpruner.runtime.timing import measure_ratio

    clock = FakeClock()
    one = measure_ratio({"dense": clock.variant("dense", 2.0), "pruned": clock.variant("pruned", 1.0)}, "pruned",
                        "dense", warmup=0, repeats=1, precision=0.5, clock=clock)
    assert one.converged and one.run.repeats == 2  # a second round was needed to know the spread
