"""Label efficiency of the loop: gold reward of the policy against the number of labels bought, for an
active selection rule against random selection, on the built-in task with simulated annotators.

    python benchmarks/label_efficiency.py [--rule rm_uncertainty] [--seeds 0 1 2] [--rounds 4] [--labels 24]

For each seed and each rule, ``posttrain loop`` runs ``--rounds`` rounds from the same SFT model (cached):
``--prompts`` prompts x ``--k`` samples per round, ``--labels`` pairs labelled per round by the simulated
annotators, the reward model on all labels so far, iterative DPO on the round's pairs, and ``posttrain
eval`` (gold reward on held-out prompts) after every round. The SFT model's gold reward is the curve's
point at 0 labels.

``labels_ratio`` (per seed): the labels the active rule needed to reach random selection's final gold
reward (linear interpolation along its curve), over random's total labels; ``> 1`` (extrapolated from
its last two rounds, or ``inf``) if it never does. Its interval is a percentile bootstrap over seeds
(with 3 seeds, a rough one). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import yaml
from _common import cached, posttrain

ROOT = Path(__file__).resolve().parent.parent


def curve(run_dir: Path) -> list[tuple[int, float]]:
    """[(labels bought so far, gold reward after that round)] from the loop's summary."""
    s = json.loads((run_dir / "summary.json").read_text())
    out, total = [], 0
    for r in s["rounds"]:
        total += sum(r["labels"].values())
        out.append((total, r["gold_reward"]))
    return out


def labels_to_reach(points: list[tuple[int, float]], target: float) -> float:
    """Labels at which the curve first reaches ``target`` (linear between rounds; extrapolated from the
    last two points when it never does, ``inf`` if it does not rise)."""
    prev = points[0]
    if prev[1] >= target:
        return float(prev[0])
    for x, y in points[1:]:
        if y >= target:
            return prev[0] + (target - prev[1]) * (x - prev[0]) / (y - prev[1])
        prev = (x, y)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return x1 + (target - y1) * (x1 - x0) / (y1 - y0) if y1 > y0 else float("inf")


def bootstrap(xs: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(xs) for _ in xs) / len(xs) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rule", default="rm_uncertainty", choices=["rm_uncertainty", "policy_margin", "diversity"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--labels", type=int, default=24)
    ap.add_argument("--eval-prompts", type=int, default=96)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-label-efficiency"))
    args = ap.parse_args()
    out = Path(args.out)
    cache = Path(os.environ.get("POSTTRAIN_CACHE", ROOT / ".cache" / "posttrain")) / "bench-label-efficiency"
    sft = cached(cache / "sft", "sft", "model.name_or_path=tiny", "train.epochs=2", "data.eval=null",
                 "task_eval=false", "train.progress=false")
    small = {"train": {"epochs": 2, "progress": False, "batch_size": 8, "micro_batch_size": 8}}
    curves: dict[str, dict[int, list]] = {"random": {}, args.rule: {}}
    for seed in args.seeds:
        for rule in curves:
            run_dir = out / f"{rule}-seed{seed}"
            cfg = {"name": f"{rule}-{seed}", "run_dir": str(run_dir), "rounds": args.rounds, "sft": sft,
                   "prompts_per_round": args.prompts, "k": args.k, "labels_per_round": args.labels, "seed": seed,
                   "selection": {"rule": rule, "ensemble": 3}, "sources": [{"kind": "simulated"}],
                   "reward": small, "policy": {**small, "task_eval": False, "train": {**small["train"], "lr": 5e-5}},
                   "eval": {"n_prompts": args.eval_prompts, "samples": 4}, "heldout_prompts": 100}
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"{rule}-seed{seed}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            posttrain("loop", str(path))
            ev = json.loads((run_dir / "round-0" / "eval" / "eval.json").read_text())["policies"]["sft"]
            curves[rule][seed] = [(0, ev["gold_reward"]), *curve(run_dir)]
            print(json.dumps({"rule": rule, "seed": seed, "curve": curves[rule][seed]}), flush=True)
    ratios = []
    for seed in args.seeds:
        rnd, act = curves["random"][seed], curves[args.rule][seed]
        ratios.append(labels_to_reach(act, rnd[-1][1]) / rnd[-1][0])
    finite = [r for r in ratios if r != float("inf")]
    mean = sum(finite) / len(finite) if len(finite) == len(ratios) else float("inf")
    lo, hi = bootstrap(finite) if len(finite) == len(ratios) else (float("inf"), float("inf"))
    res = {"benchmark": "label_efficiency", "rule": args.rule, "seeds": args.seeds, "rounds": args.rounds,
           "labels_per_round": args.labels, "candidates_per_round": args.prompts * args.k * (args.k - 1) // 2,
           "labels_ratio": mean, "labels_ratio_ci": [lo, hi], "labels_ratio_per_seed": ratios, "target": 0.6,
           "final_gold": {rule: [c[s][-1][1] for s in args.seeds] for rule, c in curves.items()},
           "curves": {rule: {str(s): c[s] for s in args.seeds} for rule, c in curves.items()}}
    print(json.dumps(res, default=str).replace("Infinity", "null"))  # null: never reached, not rising


if __name__ == "__main__":
    main()
