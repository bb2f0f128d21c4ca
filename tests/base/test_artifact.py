"""The one artifact protocol (ldpruner.base.artifact): every JSON artifact a stage writes and another reads is declared
once, tagged with its format, written atomically, refused with its own error when malformed, and cached by one
policy."""

import json

import pytest

from ldpruner import stages
from ldpruner.base.artifact import ArtifactFile
from ldpruner.base.errors import ArtifactError, PlanError
from ldpruner.bench import stage as bench_stage
from ldpruner.passes.config import CostConfig
from ldpruner.passes.cost_report import CostReport, OperatorCost
from ldpruner.passes.plan import PlannedRemoval, RemovalPlan
from ldpruner.stages.report import REPORT

DECLARED = [stages.SCORES, stages.COSTS, stages.PLAN, stages.LATENCY, stages.DISTILL_SUMMARY, stages.EXPORT_SUMMARY,
            stages.LORA, REPORT, bench_stage.REPORT]


def costs(key: str = "k") -> CostReport:
    return CostReport(operators={"a": OperatorCost("a", ms=3.0, iqr_ms=0.1, kept_ms=0.5, kept_basis="measured")},
                      dense_ms=10.0, dense_iqr_ms=0.2, attributed_ms=3.0, profiled_ms=11.0, config=CostConfig(),
                      placement={"runtime": "onnxruntime", "batch": 2}, model_class="M", granularity="block",
                      cache_key=key)


def plan() -> RemovalPlan:
    return RemovalPlan(removals=(PlannedRemoval(name="a", params=10, macs=100, score=0.5, action="bypass"),),
                       model_class="M", granularity="block", total_params=100, total_macs=1000)


def test_every_artifact_has_one_format_and_the_build_folder_no_name_twice():
    # the tags are what files on disk say: written out here, so that a rename in the code cannot change them
    assert {a.name: a.format for a in DECLARED if a is not bench_stage.REPORT} == {
        "scores.json": "ldpruner.scores/1", "costs.json": "ldpruner.costs/1", "plan.json": "ldpruner.plan/1",
        "latency.json": "ldpruner.latency/1", "distill.json": "ldpruner.distill/1",
        "export.json": "ldpruner.export-summary/1", "lora.json": "ldpruner.lora/1", "report.json": "ldpruner.report/2"}
    assert bench_stage.REPORT.format == "ldpruner.bench/2"
    formats = [a.format for a in DECLARED]
    assert len(set(formats)) == len(formats) and all(f.startswith("ldpruner.") and "/" in f for f in formats)
    in_build_folder = [a.name for a in DECLARED if a is not bench_stage.REPORT]  # bench writes its own folder
    assert len(set(in_build_folder)) == len(in_build_folder)


@pytest.mark.parametrize("artifact", [costs(), plan()], ids=["costs", "plan"])
def test_a_typed_artifact_round_trips_through_its_file_tagged_with_its_format(artifact, tmp_path):
    path = artifact.save(tmp_path)  # a folder receives the declared file name
    assert path == tmp_path / artifact.FILE.name and json.loads(path.read_text())["format"] == artifact.FILE.format
    assert type(artifact).load(tmp_path) == artifact == type(artifact).load(path)
    assert [p.name for p in tmp_path.iterdir()] == [artifact.FILE.name]  # atomic: no temporary file left


@pytest.mark.parametrize("cls, error", [(CostReport, ArtifactError), (RemovalPlan, PlanError)])
@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds a list, expected a JSON object"),
    ('{"format": "ldpruner.other/1"}', "is not an ldpruner .*: expected format 'ldpruner.(costs|plan)/1', "
                                       "got 'ldpruner.other/1'"),
    (None, r"is malformed: KeyError: "),  # the right format, a field missing
])
def test_a_malformed_file_raises_the_artifacts_own_error_naming_the_file(cls, error, content, message, tmp_path):
    path = tmp_path / cls.FILE.name
    path.write_text(content if content is not None else json.dumps({"format": cls.FILE.format}))
    with pytest.raises(error, match=rf"^{cls.FILE.what} '{path}' {message}"):
        cls.load(path)
    with pytest.raises(error, match=rf"^{cls.FILE.what} '{tmp_path / 'gone.json'}' does not exist"):
        cls.load(tmp_path / "gone.json")


def test_the_cache_policy_absent_or_stale_is_a_miss_damaged_raises_and_is_kept(tmp_path):
    assert CostReport.load_cached(tmp_path, "k") is None  # absent
    costs("k").save(tmp_path)
    assert CostReport.load_cached(tmp_path, "k") == costs("k")
    assert CostReport.load_cached(tmp_path, "other") is None  # made under another key: a miss
    damaged = tmp_path / "costs.json"
    damaged.write_text('{"format": "ldpruner.costs/1", "operators": []}')
    with pytest.raises(ArtifactError, match=r"is malformed: KeyError: .*; it is not reused: pass --overwrite"):
        CostReport.load_cached(tmp_path, "k")  # never a silent miss that a stage would overwrite
    assert damaged.read_text() == '{"format": "ldpruner.costs/1", "operators": []}'
    assert CostReport.load_cached(tmp_path, "k", overwrite=True) is None  # told to replace it: a miss


def test_a_summary_reads_its_earlier_formats_and_quotes_its_fields_without_the_tag(tmp_path):
    summary = ArtifactFile("export.json", "ldpruner.export-summary/1", "export summary", reads=(None,))
    (tmp_path / "export.json").write_text('{"export": {"passed": true}}')  # written before summaries had a format
    assert summary.fields(tmp_path) == {"export": {"passed": True}}
    summary.write(tmp_path / "export.json", {"export": {"passed": False}})
    assert json.loads((tmp_path / "export.json").read_text()) == {"format": "ldpruner.export-summary/1",
                                                                  "export": {"passed": False}}
    assert stages.EXPORT_SUMMARY.reads == (None,) and stages.LATENCY.reads == (None,)
    (tmp_path / "report.json").write_text('{"format": "ldpruner.report/1", "config": {}}')
    assert REPORT.read(tmp_path)["format"] == "ldpruner.report/1"  # a flat-config report is still read
