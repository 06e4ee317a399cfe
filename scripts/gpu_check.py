"""Quick SFT, DPO, GRPO and PPO runs on one device (CUDA when visible), printing one JSON line per run:
tokens/s (pairs/s for DPO), peak device memory, MFU. Run by scripts/gpu_check.sh; `--device cpu --quick` is the CPU smoke
test of the same code path.

    python scripts/gpu_check.py [--models tiny,shape:qwen2.5-0.5b] [--algos sft,dpo,grpo,ppo] [--quick]

Each run is a posttrain command's own ``run()`` with a small config (a few steps, bf16 autocast on CUDA),
in this process, one after the other. Tokens/s counts the tokens the run trained on per second of its
training loop (summary.json and metrics.jsonl); peak memory is ``torch.cuda.max_memory_allocated`` (peak
RSS on a CPU); MFU = 6 x parameters x tokens/s / the device's dense bf16 peak (H100 SXM: 989 TFLOP/s,
H200 the same; other cards: pass --peak-tflops), an estimate that ignores attention and the head's
skipped positions. The last line is one JSON object with every run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PEAKS_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def device_peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAKS_TFLOPS.items() if k in name), None)


def overrides(algo: str, model: str, out: str, quick: bool, cuda: bool) -> list[str]:
    steps = 2 if quick else 6
    common = [f"model.name_or_path={model}", f"train.output_dir={out}", f"train.max_steps={steps}",
              "train.progress=false", "train.report_to=[]", "train.log_every=1",
              f"train.mixed_precision={'bf16' if cuda else 'no'}"]
    return common + {
        "sft": ["data.max_rows=256", "train.batch_size=16", "train.micro_batch_size=16", "data.eval=null",
                "task_eval=false"],
        "dpo": ["data.max_rows=128", "train.batch_size=16", "train.micro_batch_size=16"],
        "grpo": ["rollout.prompts_per_step=8", "rollout.group_size=8", "rollout.max_new_tokens=32",
                 "task_eval_prompts=16", "task_eval_samples=1"],
        "ppo": ["rollout.prompts_per_step=8", "rollout.group_size=2", "rollout.max_new_tokens=32",
                "task_eval_prompts=16", "task_eval_samples=1", "reward=[builtin_gold]", "value.shared_backbone=true"],
    }[algo]


def trained_tokens_per_s(run_dir: Path) -> float | None:
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if r]
    rates = [r[k] for r in rows for k in ("tokens_per_s", "train/tokens_per_s") if k in r]
    if rates:
        return rates[-1]
    steps = [r for r in rows if "step_s" in r and "response/length_mean" in r]  # online RL: sampled tokens / step time
    if not steps:
        return None
    return sum(r["batch/rollouts"] * r["response/length_mean"] for r in steps) / sum(r["step_s"] for r in steps)


def run_one(algo: str, model: str, quick: bool, device) -> dict:
    import torch

    from posttrain.commands import load_command
    from posttrain.config import ModelConfig, load_config
    from posttrain.models.loading import load_causal_lm

    config_cls, run = load_command(algo)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg = load_config(config_cls, None, overrides(algo, model, str(out), quick, device.type == "cuda"),
                          command=algo)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        run(cfg)
        wall = time.perf_counter() - t
        tok_s = trained_tokens_per_s(out)
        pairs = [json.loads(r).get("pairs_per_s") for r in (out / "metrics.jsonl").read_text().splitlines() if r]
        pairs_s = next((v for v in reversed(pairs) if v is not None), None)  # dpo reports pairs, not tokens
    n_params = sum(p.numel() for p in load_causal_lm(ModelConfig(name_or_path=model)).parameters())
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    tflops = ARGS.peak_tflops or device_peak_tflops(name)
    return {"algo": algo, "model": model, "device": name, "wall_s": round(wall, 1),
            "tokens_per_s": None if tok_s is None else round(tok_s, 1),
            "pairs_per_s": None if pairs_s is None else round(pairs_s, 2),
            "peak_memory_gb": round(peak / 2**30, 2), "params": n_params,
            "mfu": None if not (tok_s and tflops) else round(6 * n_params * tok_s / (tflops * 1e12), 4)}


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,shape:qwen2.5-0.5b")
    ap.add_argument("--algos", default="sft,dpo,grpo,ppo")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="two steps per run")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card for MFU")
    ARGS = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available() if ARGS.device == "auto" else ARGS.device == "cuda"
    if ARGS.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if not cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # keep accelerate on the CPU too
    device = torch.device("cuda" if cuda else "cpu")
    results, failures = [], []
    for model in ARGS.models.split(","):
        for algo in ARGS.algos.split(","):
            try:
                r = run_one(algo, model, ARGS.quick, device)
            except Exception as e:  # report every run, then fail at the end
                r = {"algo": algo, "model": model, "error": f"{type(e).__name__}: {e}"[:2000]}
                failures.append(r)
            print(json.dumps(r), flush=True)
            results.append(r)
    print(json.dumps({"gpu_check": results, "failed": len(failures)}))
    sys.exit(1 if failures else 0)


ARGS = None
if __name__ == "__main__":
    main()
