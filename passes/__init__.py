"""ldpruner.passes: the analysis (LD-score importance), selection, the rewrite, distillation and ONNX export.

One pass per module, each stating its transformation in its docstring; every option of every pass is declared once
in :mod:`ldpruner.passes.config`. The public surface is listed below and resolves lazily, so importing
``ldpruner.passes`` (or its configs) does not load torch.

    config        TraceConfig, AnalysisConfig, SelectionConfig, PruneConfig, DistillConfig, ExportConfig, OptimizeConfig
    importance    analyze_importance → ImportanceReport                    scores         scores.json: ImportanceReport
    costs         measure_costs → CostReport                               cost_report    costs.json: CostReport
    latency_check check_latency (predicted vs measured cut)                conditioning   Conditioning, prompts
    inputs        resolve_conditioning (conditioning fitted to a traced UNet: seeded stand-ins, extra channels,
                  latent size, scheduler)
    deviation     LatentDeviation: the LD score of any removed set         search         SetScores (the set search on
                  (the analysis' sampling, fixed once)                                    the model), joint_score
    select        select_removals, check_budget → RemovalPlan (plan.json)  plan           RemovalPlan, PlannedRemoval
    remove        RemoveOperators, apply_plan, prune → PrunedUNet          student        save_student, load_student
    distill/      distill.distill → DistillResult (trainer, checkpoint, data, datasets)
    onnx/         export_onnx, validate_onnx, optimize_onnx (export, validate, optimize, numeric_check, files)
"""

from __future__ import annotations

from ldpruner.base.lazy import lazy_exports

__all__ = [
    "AnalysisConfig",
    "CandidateScore",
    "Conditioning",
    "DistillConfig",
    "DistillResult",
    "ExportConfig",
    "ExportResult",
    "ImportanceReport",
    "LatentDeviation",
    "OptimizeConfig",
    "PlannedRemoval",
    "PruneConfig",
    "PrunedUNet",
    "RemovalPlan",
    "RemoveOperators",
    "SelectionConfig",
    "SetScores",
    "TraceConfig",
    "analyze_importance",
    "apply_plan",
    "check_budget",
    "export_onnx",
    "joint_score",
    "load_student",
    "optimize_onnx",
    "prune",
    "resolve_conditioning",
    "save_student",
    "select_removals",
    "validate_onnx",
]

_WHERE = {
    "AnalysisConfig": "config", "DistillConfig": "config", "ExportConfig": "config", "OptimizeConfig": "config",
    "PruneConfig": "config", "SelectionConfig": "config", "TraceConfig": "config",
    "CandidateScore": "scores", "ImportanceReport": "scores", "analyze_importance": "importance",
    "Conditioning": "conditioning",
    "LatentDeviation": "deviation", "SetScores": "search", "joint_score": "search",
    "resolve_conditioning": "inputs",
    "check_budget": "select", "select_removals": "select",
    "PlannedRemoval": "plan", "RemovalPlan": "plan",
    "PrunedUNet": "remove", "RemoveOperators": "remove", "apply_plan": "remove", "prune": "remove",
    "load_student": "student", "save_student": "student",
    "DistillResult": "distill",
    "ExportResult": "onnx.export", "export_onnx": "onnx.export", "validate_onnx": "onnx.validate",
    "optimize_onnx": "onnx.optimize",
}

__getattr__ = lazy_exports(__name__, _WHERE)
