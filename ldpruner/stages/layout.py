"""The build folder's layout: every artifact a stage writes, declared once with its file name and format
(:mod:`ldpruner.base.artifact`) — the typed ones beside their type in the passes, the summaries a stage composes
here — and the folders the students and the ONNX model go in."""

from __future__ import annotations

from ldpruner.base.artifact import ArtifactFile
from ldpruner.passes.cost_report import COSTS
from ldpruner.passes.distill.summary import SUMMARY as DISTILL_SUMMARY
from ldpruner.passes.plan import PLAN
from ldpruner.passes.scores import SCORES

__all__ = ["COSTS", "DISTILL_DIR", "DISTILL_SUMMARY", "EXPORT_SUMMARY", "LATENCY", "LORA", "ONNX_DIR", "PLAN", "SCORES",
           "STUDENT"]

# the artifacts not declared beside their type (SCORES, COSTS, PLAN, DISTILL_SUMMARY, imported above), each once with
# its file name and format (ldpruner.base.artifact): the summaries a stage composes here
LATENCY = ArtifactFile("latency.json", "ldpruner.latency/1", "latency check", reads=(None,))
EXPORT_SUMMARY = ArtifactFile("export.json", "ldpruner.export-summary/1", "export summary",  # in ONNX_DIR
                              reads=(None,))  # what was exported, validated and optimized, for which weights
LORA = ArtifactFile("lora.json", "ldpruner.lora/1", "LoRA fusion report")  # what fusing a LoRA into a student did
STUDENT = "student"
DISTILL_DIR = "distill"
ONNX_DIR = "onnx"
