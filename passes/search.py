"""The set search on the model, and the joint score of any plan: the LD score of a removed *set* (every operator of it
removed together), sampled exactly as the one-shot analysis sampled (same noise, seeds, conditioning, scheduler), so
a singleton's set score is its one-shot score.

:class:`SetScores` is the scorer :func:`~ldpruner.passes.select.select_removals` calls for ``order="greedy"``: the
sets of one step are independent, so torchrun ranks share them (every rank gets every score); every score is kept in
``search.json`` under the analysis' cache key, written after each step, so a killed search resumes where it stopped
and makes the same plan; and a cap on UNet calls makes it answer None (the selection then finishes the plan in
score-per-cost order and says so). :func:`joint_score` measures one set (a plan of any order).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldpruner.base import distributed
from ldpruner.base.artifact import ArtifactFile
from ldpruner.base.errors import ArtifactError, ConfigError

from .conditioning import Conditioning
from .config import AnalysisConfig
from .deviation import LatentDeviation, analysis_conditioning
from .inputs import scheduler_record

__all__ = ["SEARCH", "COMPOUNDING", "SetScores", "joint_score", "one_shot_calls", "record_joint"]

SEARCH = ArtifactFile("search.json", "ldpruner.set-scores/1", "set scores file")
# a plan whose removed set scores more than this many times the sum of its single scores is flagged
COMPOUNDING = 2.0


def _set_key(names: Sequence[str]) -> str:
    """A set of operator names as one JSON key (any character may be in a name, so none can be a separator)."""
    return json.dumps(sorted(names))


def one_shot_calls(deviation: LatentDeviation, candidates: int) -> int:
    """The UNet calls of the one-shot analysis of ``candidates`` operators (one process): the unit of the cap."""
    return deviation.dense_calls + candidates * deviation.calls_per_generation


class SetScores:
    """The set search's scorer on ``operator_graph`` (the graph the analysis scored, in its dtype): call it with a
    step's sets (lists of operator names) to get their LD scores, or None when scoring them would pass ``cap``
    (in one-shot analyses). Use it as a context manager (the dense latents are generated on entering). ``cache``:
    the search.json to resume from and write (rank 0), under ``key`` (the analysis' cache key)."""

    def __init__(self, operator_graph: Any, calib: Conditioning | str | os.PathLike | None, *,
                 config: AnalysisConfig, scheduler: Any, key: str, cap: float, cache: str | os.PathLike | None = None,
                 world: distributed.World | None = None, progress: bool = False) -> None:
        scheduler, info = scheduler_record(scheduler)
        conditioning = analysis_conditioning(operator_graph.traced, calib, config, scheduler)
        self.ops = {op.name: op for op in operator_graph.candidates}
        self.deviation = LatentDeviation(operator_graph, conditioning, config, scheduler, info)
        self.world = world if world is not None else distributed.current()
        self.key, self.progress = key, progress
        calls = cap * one_shot_calls(self.deviation, len(self.ops))
        self.cap_calls: float = int(calls) if calls != float("inf") else calls
        dense = self.deviation.dense_calls
        if dense > self.cap_calls:
            raise ConfigError(f"search_cap={cap:g} (--search-cap) allows {self.cap_calls:,.0f} UNet calls, fewer than "
                              f"the dense generation alone ({dense:,}): raise it")
        self.cache = Path(cache) if cache is not None else None
        # rank 0 reads search.json and every rank takes its sets (a rank may not see rank 0's folder)
        scores: dict[str, list[float]] = {}
        error: ArtifactError | None = None
        if self.world.is_main:
            try:
                scores = self._resumed()
            except ArtifactError as exc:
                error = exc
        if self.world.size > 1:
            scores = distributed.share_from_rank0(self.world, scores, error)
        elif error is not None:
            raise error
        self.scores = scores
        self.calls = 0  # UNet calls of this run, every rank's (the dense generation included)
        # what the cap counts: the dense generation once and every set the search asked for, scored now or resumed
        # from search.json, so a resumed search and one of another world size stop where an uninterrupted one would
        self.spent = 0
        self.resumed = len(self.scores)

    def _resumed(self) -> dict[str, list[float]]:
        if self.cache is None or not self.cache.is_file():
            return {}
        data = SEARCH.read(self.cache)
        if data.get("cache_key") != self.key:
            return {}  # another analysis: its sets say nothing about this one
        sets = data.get("sets")
        if not isinstance(sets, dict) or not all(isinstance(v, list) and len(v) == 2 for v in sets.values()):
            raise ArtifactError(f"{SEARCH.what} {str(self.cache)!r} is malformed: sets must map a set to [mu, sigma]; "
                                "delete it to search again")
        return {k: [float(v[0]), float(v[1])] for k, v in sets.items()}

    def __enter__(self) -> SetScores:
        self.deviation.__enter__()
        self.calls += self.deviation.dense_calls * self.world.size
        self.spent += self.deviation.dense_calls
        return self

    def __exit__(self, *exc: Any) -> None:
        self.deviation.__exit__(*exc)

    def terms(self, names: Sequence[str]) -> tuple[float, float] | None:
        """(μ-term, σ-term) of a set scored already, else None."""
        found = self.scores.get(_set_key(names))
        return (found[0], found[1]) if found is not None else None

    def __call__(self, sets: list[list[str]]) -> list[float] | None:
        asked = {_set_key(s): sorted(s) for s in sets}
        cost = len(asked) * self.deviation.calls_per_generation
        if self.spent + cost > self.cap_calls:
            return None
        self.spent += cost
        todo = [key for key in asked if key not in self.scores]
        needed = len(todo) * self.deviation.calls_per_generation
        mine = todo[self.world.rank::self.world.size]
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine) * self.deviation.calls_per_generation, desc="set search", unit="call",
                   disable=not (self.progress and self.world.is_main), dynamic_ncols=True, leave=False)
        self.deviation.on_call = lambda: bar.update(1)
        found = {}
        for key in mine:
            bar.set_postfix_str(f"{len(asked[key])} removed", refresh=False)
            found[key] = list(self.deviation.score([self.ops[name] for name in asked[key]]))
        bar.close()
        if self.world.size > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.world.size
            dist.all_gather_object(gathered, found)
            found = {k: v for part in gathered for k, v in part.items()}
        self.scores.update(found)
        self.calls += needed
        if self.cache is not None and self.world.is_main:
            SEARCH.write(self.cache, {"cache_key": self.key, "sets": self.scores})
        return [sum(self.scores[_set_key(s)]) for s in sets]

    def fitting_shortlist(self, candidates: int, steps: int) -> int:
        """The most candidates (at least ``steps``, at most ``candidates``) whose search over ``steps`` steps fits the
        cap: Σ (K − i) sets for i < steps, after the dense generation."""
        per_set = self.deviation.calls_per_generation
        # (the sets a resumed search has cached are not counted: it must choose the K the first run chose)
        room = (self.cap_calls - self.deviation.dense_calls) / per_set
        best = min(steps, candidates)
        for k in range(best, candidates + 1):
            if sum(max(0, k - i) for i in range(steps)) <= room:
                best = k
        return max(1, best)

    def announce(self, shortlist: int, steps: int) -> int:
        """Print (rank 0, with progress) and return the UNet calls a search of ``steps`` steps over ``shortlist``
        candidates plans to make: the dense generation and Σ (shortlist − i) sets; cached sets are not counted."""
        sets = sum(max(0, shortlist - i) for i in range(steps))
        planned = self.deviation.dense_calls * self.world.size + sets * self.deviation.calls_per_generation
        if self.progress and self.world.is_main:
            resumed = f", {self.resumed} sets resumed from {self.cache}" if self.resumed else ""
            print(f"set search: {shortlist} short-listed candidates, up to {steps} steps = up to {planned:,} UNet "
                  f"calls (cap {self.cap_calls:,.0f}: the one-shot analysis x the search cap{resumed})",
                  file=sys.stderr)
        return planned


def joint_score(operator_graph: Any, calib: Conditioning | str | os.PathLike | None, names: Sequence[str], *,
                config: AnalysisConfig, scheduler: Any, singles: float) -> dict[str, Any]:
    """The LD score of ``names`` removed together, sampled as the analysis sampled, beside ``singles`` (the sum of
    their one-shot scores); a set scoring over ``COMPOUNDING`` times that sum is flagged in one logged line."""
    # one set: every rank computes it alike, nothing to share
    scorer = SetScores(operator_graph, calib, config=config, scheduler=scheduler, key="", cap=float("inf"),
                       world=distributed.World())
    with scorer:
        scorer([list(names)])
    mu, sigma = scorer.terms(names)
    return record_joint(mu + sigma, singles, mu_term=mu, sigma_term=sigma, unet_calls=scorer.calls)


def record_joint(score: float, singles: float, **extra: Any) -> dict[str, Any]:
    """The plan's ``joint`` record, with the compounding flagged (logged) where the set scores far above its sum."""
    record = {"score": score, "sum_of_single_scores": singles, **extra}
    if singles > 0 and score > COMPOUNDING * singles:
        record["compounding"] = score / singles
        logging.getLogger("ldpruner.plan").warning(
            "the removed set scores %.4g together, %.1fx the sum of its single scores (%.4g): the removals compound; "
            "--order greedy scores the set itself", score, score / singles, singles)
    return record
