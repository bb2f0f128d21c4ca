"""Selection baselines for LD-Pruner: per-candidate importance scores from other criteria, and one rule that turns
any of them into a RemovalPlan, so every method removes from the same candidate set under the same budget.

Scores are "higher = more important" (the lowest go first), per candidate operator of an ``OperatorGraph``:

* ``ld``          the latent-deviation score of ``ldpruner.api.analyze`` (‖μ_d − μ_c‖₂ + ‖σ_d − σ_c‖₂).
* ``magnitude``   mean |w| over the parameters the removal drops: the operator module's own parameters, less its
                  ``conv_shortcut`` when the action is ``shortcut`` (that conv stays). L1 norm / number of weights,
                  so large and small operators compare on one scale.
* ``output_mse``  LAPTOP-Diff's one-shot output criterion: mean over timesteps of MSE(ε_dense, ε_without c) of one
                  UNet call. Inputs (:func:`output_mse_scores`): N fixed Gaussian x_0 ~ N(0, I) in latent shape
                  (seed ``seed``), fixed noise ε (seed ``seed + 1``), x_t = scheduler.add_noise(x_0, ε, t) for each
                  t in ``timesteps`` (default 999, 750, 500, 250, 50 — DDPM schedule of 1000 steps), the
                  conditional rows of the analysis conditioning (prompt i mod P; no classifier-free guidance).
                  The candidate is applied with ``compiler.removal.swapped``, exactly what the rewrite computes.
* ``random``      a seeded uniform score per candidate (``random.Random(seed)``, graph order).
* ``bk_sdm``      BK-SDM's fixed block removal as an order, see :func:`bk_sdm_order`.

:func:`plan_for` ranks by score with ``passes.select.select_removals`` (lowest first, until ≥ budget of the UNet's
parameters is removed; candidates whose removal together with earlier picks would remove shared modules —
``OperatorGraph.jointly_removed`` — are skipped), the same rule and candidate set ``ldpruner select`` uses for LD.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldpruner.base.errors import ConfigError
from ldpruner.compiler.graph import Action, OperatorGraph
from ldpruner.compiler.removal import swapped
from ldpruner.passes.plan import RemovalPlan
from ldpruner.passes.select import SelectionConfig, select_removals

__all__ = [
    "CRITERIA",
    "SCORED_CRITERIA",
    "CriterionCandidate",
    "analysis_conditioning",
    "bk_sdm_order",
    "bk_sdm_scores",
    "criterion_scores",
    "ld_scores",
    "magnitude_scores",
    "output_mse_scores",
    "plan_for",
    "random_scores",
    "spearman",
]

CRITERIA = ("ld", "magnitude", "output_mse", "random", "bk_sdm")
SCORED_CRITERIA = ("ld", "magnitude", "output_mse", "random")  # criteria with a per-operator score to correlate
DEFAULT_TIMESTEPS = (999, 750, 500, 250, 50)


@dataclasses.dataclass(frozen=True)
class CriterionCandidate:
    """A candidate operator with one criterion's score (what ``select_removals`` ranks)."""

    name: str
    score: float
    params: int
    macs: int
    action: str


def ld_scores(report: Any) -> dict[str, float]:
    """The LD scores of an ``ImportanceReport`` (``api.analyze``)."""
    return dict(report.scores)


def magnitude_scores(graph: OperatorGraph) -> dict[str, float]:
    """Mean |w| over the parameters each candidate's removal drops (see the module docstring)."""
    gm = graph.traced.gm
    scores = {}
    for op in graph.candidates:
        module = gm.get_submodule(op.name)
        kept = set()
        if op.action is Action.SHORTCUT:
            kept = {id(p) for p in module.conv_shortcut.parameters()}
        params = [p for p in module.parameters() if id(p) not in kept]
        count = sum(p.numel() for p in params)
        scores[op.name] = float(sum(p.detach().abs().double().sum() for p in params) / count) if count else 0.0
    return scores


def random_scores(graph: OperatorGraph, seed: int) -> dict[str, float]:
    """One uniform draw per candidate, in graph order, from ``random.Random(seed)``."""
    rng = random.Random(seed)
    return {op.name: rng.random() for op in graph.candidates}


def _unet_inputs(graph: OperatorGraph, conditioning: Any, num_samples: int, timestep: int, x_t: torch.Tensor
                 ) -> list[torch.Tensor]:
    names = graph.traced.input_names
    rows = conditioning.rows(torch.arange(num_samples), x_t.device, x_t.dtype) if conditioning is not None else {}
    inputs: dict[str, torch.Tensor] = {"sample": x_t, "timestep": torch.full((num_samples,), timestep)}
    for name in names:
        if name in inputs:
            continue
        if name not in rows:
            raise ConfigError(f"output_mse needs {name} for {graph.traced.model_class}; the conditioning lacks it")
        value = rows[name]
        inputs[name] = value.expand(num_samples, *value.shape[1:]) if value.shape[0] == 1 else value
    return [inputs[n] for n in names]


def output_mse_scores(graph: OperatorGraph, conditioning: Any = None, *, num_samples: int = 8,
                      timesteps: Sequence[int] = DEFAULT_TIMESTEPS, seed: int = 0, scheduler: Any = None
                      ) -> dict[str, float]:
    """LAPTOP-Diff's output criterion: mean over ``timesteps`` of MSE between the dense UNet's output and the
    output with one candidate removed, one call per (candidate, timestep); inputs in the module docstring.

    ``conditioning``: a ``passes.importance.Conditioning`` (its positive rows are used), None for unconditional
    UNets. ``scheduler``: supplies ``add_noise``; None is ``diffusers.DDPMScheduler()`` (1000 steps, linear β).
    The graph and its weights are unchanged afterwards."""
    if scheduler is None:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler()
    gm = graph.traced.gm
    example = graph.traced.example_inputs[graph.traced.input_names[0]]
    param = next(gm.parameters())
    shape = (num_samples, *example.shape[1:])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(param)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(param)
    batches = []
    for t in timesteps:
        x_t = scheduler.add_noise(x0, noise, torch.full((num_samples,), int(t), dtype=torch.long))
        batches.append(_unet_inputs(graph, conditioning, num_samples, int(t), x_t))
    training = {name: m.training for name, m in gm.named_modules()}
    gm.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            dense = [gm(*b) for b in batches]
            scores = {}
            for op in graph.candidates:
                with swapped(gm, op):
                    errors = [torch.mean((gm(*b) - d).double() ** 2) for b, d in zip(batches, dense)]
                scores[op.name] = float(sum(errors) / len(errors))
    finally:
        for name, m in gm.named_modules():
            m.training = training.get(name, m.training)
    return scores


_PAIR = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)(\.|$)")
_MID = re.compile(r"^mid_block\.")


def bk_sdm_order(graph: OperatorGraph) -> list[str]:
    """BK-SDM's block removal as an ordered list of candidates (first = removed first).

    BK-SDM (Kim et al., 2023) removes one residual+attention (R–A) pair per stage — the second pair: the last of
    the two in an SD down stage, the middle of the three in an up stage — and then the whole mid block. Here, as
    rounds until the candidates run out (selection stops at the budget):

    1. down stages in order, then up stages in order: pair index 1 of the stage (index 0 when the stage has one
       pair): its resnet, then its attention;
    2. the mid block's operators in graph order;
    3. the remaining pairs, index 0, 2, 3, … per stage, stages in the same order (an extension past BK-SDM so
       larger budgets are reachable; BK-SDM-Tiny likewise goes on to remove more blocks).

    Adaptations: a stage without attention (SD's innermost stages, resnet-only UNets) contributes its resnet
    alone; an operator that is not a candidate (not removable) is left out and the rest of its pair still goes;
    at ``sublayer`` granularity the pair's operators are every candidate under ``…resnets.j`` / ``…attentions.j``.
    Candidates outside down/up/mid blocks never enter the plan."""
    stages: dict[tuple[str, int], dict[int, list[str]]] = {}
    mid: list[str] = []
    for op in graph.candidates:
        m = _PAIR.match(op.name)
        if m:
            pairs = stages.setdefault((m.group(1), int(m.group(2))), {})
            pairs.setdefault(int(m.group(4)), []).append(op.name)
        elif _MID.match(op.name):
            mid.append(op.name)
    kind_rank = {"resnets": 0, "attentions": 1}

    def pair_ops(names: list[str]) -> list[str]:  # resnet before attention, graph order within each
        return sorted(names, key=lambda n: kind_rank[_PAIR.match(n).group(3)])

    ordered_stages = sorted(stages, key=lambda s: (s[0] != "down_blocks", s[1]))
    first = {s: (1 if 1 in stages[s] else min(stages[s])) for s in ordered_stages}
    order = [n for s in ordered_stages for n in pair_ops(stages[s][first[s]])]
    order += mid
    rest_indices = sorted({j for s in ordered_stages for j in stages[s] if j != first[s]})
    for j in rest_indices:
        order += [n for s in ordered_stages if j in stages[s] and j != first[s] for n in pair_ops(stages[s][j])]
    return order


def bk_sdm_scores(graph: OperatorGraph) -> dict[str, float]:
    """Position in :func:`bk_sdm_order` as a score (lower = removed earlier); only the ordered candidates."""
    return {name: float(i) for i, name in enumerate(bk_sdm_order(graph))}


def plan_for(graph: OperatorGraph, scores: Mapping[str, float], *, budget: float, criterion: str,
             metric: str = "params") -> RemovalPlan:
    """A RemovalPlan removing ≥ ``budget`` of ``metric`` from ``graph``'s candidates, lowest score first.

    ``scores`` may cover a subset of the candidates (bk_sdm); names that are not candidates are an error. The plan
    records the criterion in its budget block; every removal's ``score`` is the criterion's score."""
    candidates = {op.name: op for op in graph.candidates}
    unknown = sorted(set(scores) - set(candidates))
    if unknown:
        raise ConfigError(f"criterion {criterion!r} scores operators that are not candidates: {unknown}")
    scored = [CriterionCandidate(name=n, score=float(scores[n]), params=op.params, macs=op.macs,
                                 action=op.action.value) for n, op in candidates.items() if n in scores]
    plan = select_removals(scored, total_params=graph.total_params, total_macs=graph.total_macs,
                           model_class=graph.traced.model_class, granularity=graph.traced.granularity.value,
                           config=SelectionConfig(budget=budget, metric=metric),
                           jointly_removed=graph.jointly_removed)
    return dataclasses.replace(plan, budget={**plan.budget, "criterion": criterion})


def criterion_scores(model: Any, graph: OperatorGraph, criteria: Sequence[str], *, ld_samples: int = 20,
                     ld_steps: int = 10, mse_samples: int = 8, random_seeds: Sequence[int] = (0, 1, 2),
                     progress: bool = False) -> dict[str, dict[str, float]]:
    """Scores of ``criteria`` for ``model`` (a spec or folder ``ldpruner.api`` loads), keyed ``criterion`` — or
    ``random/<seed>`` for each random seed. LD comes from ``api.analyze(num_samples=ld_samples,
    steps=ld_steps)``; ``output_mse`` uses the conditioning that analysis uses (the model's prompts, encoded)."""
    from ldpruner import api

    unknown = sorted(set(criteria) - set(CRITERIA))
    if unknown:
        raise ConfigError(f"unknown criteria {unknown}; known: {list(CRITERIA)}")
    result: dict[str, dict[str, float]] = {}
    for criterion in criteria:
        if criterion == "ld":
            result["ld"] = ld_scores(api.analyze(model, num_samples=ld_samples, steps=ld_steps, progress=progress))
        elif criterion == "magnitude":
            result["magnitude"] = magnitude_scores(graph)
        elif criterion == "output_mse":
            result["output_mse"] = output_mse_scores(graph, analysis_conditioning(model, graph, mse_samples),
                                                     num_samples=mse_samples)
        elif criterion == "random":
            result.update({f"random/{s}": random_scores(graph, s) for s in random_seeds})
        else:
            result["bk_sdm"] = bk_sdm_scores(graph)
    return result


def analysis_conditioning(model: Any, graph: OperatorGraph, num_samples: int) -> Any:
    """The conditioning ``api.analyze`` would use for ``model`` (None for an unconditional UNet)."""
    from ldpruner import api
    from ldpruner.passes.inputs import resolve_conditioning
    from ldpruner.stages import calibration

    if "encoder_hidden_states" not in graph.traced.input_names and "class_labels" not in graph.traced.input_names:
        return None
    loaded = api.load(model)
    config = calibration.analysis_config(loaded, {"num_samples": num_samples, "steps": 1, "seed": 0,
                                                  "guidance_scale": 1.0}, None)
    calib = calibration.conditioning_source(loaded, config.prompts)
    return resolve_conditioning(graph.traced, calib, num_samples=config.num_samples, seed=config.seed,
                                guidance_scale=config.guidance_scale, prompts=config.prompts)


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, float | int | None]:
    """Spearman's ρ (scipy.stats.spearmanr, ties averaged) with its two-sided p-value and n; ρ is None when either
    side is constant or n < 3 (undefined)."""
    from scipy.stats import spearmanr

    if len(x) != len(y):
        raise ConfigError(f"spearman needs paired values; got {len(x)} and {len(y)}")
    n = len(x)
    if n < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"rho": None, "p": None, "n": n}
    result = spearmanr(x, y)
    return {"rho": float(result.statistic), "p": float(result.pvalue), "n": n}
