"""Peak memory and step time at a real model shape: our SFT, DPO and GRPO steps against TRL's on a
randomly initialised Qwen2.5-0.5B-shaped model (151,936-token vocabulary, 494M parameters), built offline.

    python benchmarks/memory.py [--shape qwen2.5-0.5b] [--steps 2] [--only sft,dpo,grpo]

It runs ``sft.py`` (long examples), ``dpo.py`` and ``grpo.py`` with ``--model`` pointing at the shape,
one run each (``--repeats 1``), with batches small enough for a 24 GiB machine; each of those runs every
trainer in its own subprocess, so each peak RSS is that trainer's own. fp32 weights for SFT and GRPO,
bf16 autocast for DPO where the CPU has it (``dpo.py``'s ``auto``), no gradient checkpointing on either
side. Ratios are posttrain / TRL (memory: peak RSS; speed: items per second). DPO is compared with TRL's
precomputed-reference path (like ours: one model in memory while training) and with its live reference.
The last line printed is one JSON object:
``{"sft": {"memory_ratio": …, "speed_ratio": …}, "dpo": {…}, "grpo": {…}, …}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run_benchmark(script: str, args: list[str], threads: int) -> dict:
    """Run one of the sibling benchmarks; its last stdout line is its JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True, text=True,
                         env=env, timeout=7200)
    if out.returncode != 0:
        raise SystemExit(f"{script} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{script}: {time.perf_counter() - t:.0f} s: {json.dumps(result)}", flush=True)  # kept if a later one fails
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-0.5b", help="a posttrain.models.tiny.SHAPES name")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after each benchmark's warm-up steps")
    ap.add_argument("--only", default="sft,dpo,grpo", help="comma-separated subset of sft,dpo,grpo")
    ap.add_argument("--threads", type=int, default=2, help="OMP threads per trainer process")
    args = ap.parse_args()

    sys.path.insert(0, os.path.dirname(HERE))
    from posttrain.models.tiny import resolve

    path = resolve(f"shape:{args.shape}")  # built once (random weights, the tiny tokenizer), then cached
    steps = ["--steps", str(args.steps), "--repeats", "1", "--model", path]
    result: dict = {"benchmark": "memory", "model": f"shape:{args.shape}", "steps": args.steps,
                    "threads": args.threads}
    only = set(args.only.split(","))
    if "sft" in only:
        c = run_benchmark("sft.py", [*steps, "--cases", "long", "--batch", "4"], args.threads)["long"]
        result["sft"] = {k: c.get(k) for k in ("memory_ratio", "speed_ratio", "memory_ratio_vs_trl_default",
                                                "speed_ratio_vs_trl_default")}
        result["sft"].update(batch=4, case="long", raw=c)
    if "dpo" in only:
        r = run_benchmark("dpo.py", [*steps, "--ref", path, "--batch", "4", "--threads", str(args.threads)],
                          args.threads)
        result["dpo"] = {"memory_ratio": r["memory_ratio_vs_trl_precompute"],
                         "speed_ratio": r["speed_ratio_vs_trl_precompute"],
                         "memory_ratio_vs_live_reference": r["memory_ratio_vs_trl"],
                         "speed_ratio_vs_live_reference": r["speed_ratio_vs_trl"], "batch": 4,
                         "peak_rss_mb": {"posttrain": r["posttrain_peak_rss_mb"], "trl": r["trl_peak_rss_mb"],
                                         "trl_precompute": r["trl_precompute_peak_rss_mb"]},
                         "first_loss_abs_diff": r.get("first_loss_abs_diff")}
    if "grpo" in only:
        r = run_benchmark("grpo.py", [*steps, "--prompts", "4", "--group", "4", "--max-new", "16",
                                      "--threads", str(args.threads)], args.threads)
        result["grpo"] = {"memory_ratio": r["peak_rss_ratio"], "speed_ratio": r["speedup_steps_per_s"],
                          "prompts": 4, "group": 4, "max_new_tokens": 16,
                          "peak_rss_mb": {"posttrain": r["posttrain"]["peak_rss_mb"], "trl": r["trl"]["peak_rss_mb"]},
                          "step_s": {"posttrain": r["posttrain"]["step_s"], "trl": r["trl"]["step_s"]}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
