"""Quality of a pruned zoo text-to-image model before distillation: dense vs LD-pruned vs randomly pruned.

    python -m benchmarks.zoo_prune_quality --budgets 0.1 0.2 0.3 --per-digit 20

For each budget (fraction of UNet parameters removed): the LD-score plan and a random plan of the same candidate
set; every model samples the same seeds and prompts ("a handwritten <digit>", DDIM, guidance 5); the digit
classifier (ldpruner.bench.metrics, trained on the first 90 % of each MNIST class) says which digit each image shows.
Reports prompt-digit accuracy (and the pruned/dense latency ratio of the torch graph, batch 2·N, measured in this
run) as JSON. No distillation: this measures what selection alone keeps.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

from ldpruner.runtime.graph_unet import GraphUNet


def _accuracy(model, unet, prompts, digits, seeds, steps) -> float:
    from ldpruner.bench.metrics import prompt_digit_accuracy

    images = model.sample(prompts, steps=steps, guidance_scale=5.0, seed=seeds, unet=unet)
    return prompt_digit_accuracy(images, digits)


def main(argv: list[str] | None = None) -> int:

    from ldpruner import api
    from ldpruner.passes.plan import PlannedRemoval, RemovalPlan
    from ldpruner.zoo import load_text_to_image

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mnist-t2i")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--per-digit", type=int, default=20)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--random-seeds", type=int, default=3)
    args = p.parse_args(argv)

    model = load_text_to_image(args.model)
    spec = f"zoo:{args.model}"
    digits = [d for d in range(10) for _ in range(args.per_digit)]
    words = "zero one two three four five six seven eight nine".split()
    prompts = [f"a handwritten {words[d]}" for d in digits]
    seeds = [100_000 + i for i in range(len(prompts))]
    scores = api.analyze(spec, num_samples=20, steps=10, progress=False)
    graph = api.inspect(spec)
    result: dict[str, Any] = {"model": spec, "images_per_model": len(prompts), "steps": args.steps,
                              "analysis": {"num_samples": 20, "steps": 10}, "budgets": []}
    t0 = time.perf_counter()
    result["dense_accuracy"] = _accuracy(model, None, prompts, digits, seeds, args.steps)
    dense_s = time.perf_counter() - t0
    for budget in args.budgets:
        plan = api.select(scores, model=spec, budget=budget)
        pruned = api.prune(spec, plan)
        t0 = time.perf_counter()
        ld_acc = _accuracy(model, GraphUNet.of(pruned), prompts, digits, seeds, args.steps)
        pruned_s = time.perf_counter() - t0
        random_accs = []
        for seed in range(args.random_seeds):
            rng = random.Random(seed)
            pool = [op for op in graph.candidates]
            rng.shuffle(pool)
            chosen, removed = [], 0
            for op in pool:
                if removed >= plan.removed_params:
                    break
                if graph.jointly_removed([c.name for c in chosen] + [op.name]):
                    continue
                chosen.append(op)
                removed += op.params
            rplan = RemovalPlan(tuple(PlannedRemoval(o.name, o.action.value, o.params, o.macs) for o in chosen),
                                plan.model_class, plan.granularity, plan.total_params, plan.total_macs)
            rpruned = api.prune(spec, rplan)
            random_accs.append(_accuracy(model, GraphUNet.of(rpruned), prompts, digits,
                                         seeds, args.steps))
        mean = sum(random_accs) / len(random_accs)
        std = (sum((a - mean) ** 2 for a in random_accs) / len(random_accs)) ** 0.5
        result["budgets"].append({
            "budget": budget, "removed": len(plan.removals),
            "params_removed_fraction": plan.removed_params / plan.total_params,
            "macs_removed_fraction": plan.removed_macs / plan.total_macs,
            "ld_accuracy": ld_acc, "random_accuracy_mean": mean, "random_accuracy_std": std,
            "random_accuracies": random_accs,
            "sampling_time_ratio_pruned_over_dense": pruned_s / dense_s,
        })
        print(json.dumps(result["budgets"][-1]), file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
