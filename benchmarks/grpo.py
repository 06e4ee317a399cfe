"""GRPO step throughput and memory: posttrain against TRL's GRPOTrainer, same model, prompts, group
size, completion length and optimizer-step structure.

    python benchmarks/grpo.py [--steps 8] [--prompts 16] [--group 8] [--max-new 24] [--model PATH]

Each trainer runs in its own subprocess (so peak RSS is its own) on the same tiny Llama (``tiny`` by
default, random weights, so every completion runs to the budget: the worst case for generation; pass
an SFT model with ``--model`` for short completions), the built-in task's prompts in chat format, the
built-in verifiable reward, P prompts x G completions per step, one optimizer step per generation
batch, temperature 1, beta 0 (so neither loads a reference model), fp32 weights and training (our rollout
engine decodes in bf16 on CPUs with native bf16: ``rollout.engine_dtype=auto``, the default; ``--engine-dtype
model`` keeps it fp32), no gradient checkpointing.
After ``WARMUP`` steps, ``--steps`` steps are timed from step end to step end. Generation share =
time inside generation / step time (posttrain: the engine's ``gen_s``; TRL: time inside
``model.generate``). The last line printed is one JSON object.

Timings on a shared machine only ever get slower, so each trainer runs ``--repeats`` times,
alternating (ours, TRL, ours, TRL, ...), and the fastest run of each is reported (peak RSS: the
largest). With two intra-op threads on a 2-core machine, one busy neighbour process slows small
decode steps by 10-40x (OpenMP barriers wait on a preempted thread): use ``--threads 1`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import peak_rss_mb, run_worker

WARMUP = 2


def prompt_rows(n: int = 512) -> list[dict]:
    from posttrain.tasks import builtin

    return builtin.prompt_records(n, seed=3)


def correct_reward(prompts, completions, **kw):
    """The built-in verifier for TRL's calling convention (conversational prompts/completions)."""
    from posttrain.rewards.builtin import builtin_correct

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return builtin_correct(prompts, texts)


# ----------------------------------------------------------------------------- workers


def worker_ours(args) -> dict:
    import posttrain.engines.runlog as runlog
    from posttrain.algorithms.grpo import GRPOConfig, run
    from posttrain.config import load_config

    stamps: list[float] = []
    original = runlog.MetricsLogger.log

    def log(self, step, metrics):  # step-end timestamps, as TRL's on_step_end callback gives them
        if "step_s" in metrics:
            stamps.append(time.perf_counter())
            gen.append(metrics["gen_s"])
        return original(self, step, metrics)

    gen: list[float] = []
    runlog.MetricsLogger.log = log
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "prompts.jsonl")
        with open(path, "w") as f:
            for r in prompt_rows():
                f.write(json.dumps(r) + "\n")
        cfg = load_config(GRPOConfig, None, [
            f"model.name_or_path={args.model}", f"train.output_dir={tmp}/run", f"rollout.prompts={path}",
            f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group}",
            f"rollout.max_new_tokens={args.max_new}", "rollout.temperature=1.0", "reward=builtin_correct",
            "kl.beta=0", "kl.track=false", "loss.aggregation=token_mean", f"train.max_steps={WARMUP + args.steps}",
            "train.lr=1e-5", "train.progress=false", "train.log_every=1", "train.warmup_ratio=0",
            "train.schedule=constant", f"rollout.engine_dtype={args.engine_dtype}",
            "train.stop_without_signal=0",  # random weights: every reward is 0, by design of this benchmark
            f"rollout.compile={str(args.compile).lower()}"])
        run(cfg)
    dt = stamps[-1] - stamps[WARMUP - 1]
    return {"steps_per_s": args.steps / dt, "step_s": dt / args.steps, "gen_share": sum(gen[WARMUP:]) / dt,
            "peak_rss_mb": peak_rss_mb()}


def worker_trl(args) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.models.loading import load_tokenizer, quiet_transformers

    quiet_transformers()
    tok = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in prompt_rows()]
    ds = datasets.Dataset.from_list(rows)
    stamps: list[float] = []
    gen: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())

    generate = model.generate

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        out = generate(*a, **kw)
        gen.append(time.perf_counter() - t)
        return out

    model.generate = timed_generate
    n = args.prompts * args.group
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=n, gradient_accumulation_steps=1,
                     num_generations=args.group, max_completion_length=args.max_new, temperature=1.0,
                     beta=0.0, loss_type="grpo", learning_rate=1e-5, lr_scheduler_type="constant",
                     max_steps=WARMUP + args.steps, logging_steps=1, report_to="none", save_strategy="no",
                     use_cpu=True, bf16=False, gradient_checkpointing=False, dataloader_num_workers=0,
                     disable_tqdm=True, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=correct_reward, args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    dt = stamps[-1] - stamps[WARMUP - 1]
    return {"steps_per_s": args.steps / dt, "step_s": dt / args.steps, "gen_share": sum(gen[WARMUP:]) / dt,
            "peak_rss_mb": peak_rss_mb()}


# ----------------------------------------------------------------------------- driver


def run(which: str, args) -> dict:
    extra = (["--engine-dtype", args.engine_dtype] + (["--threads", str(args.threads)] if args.threads else [])
             + (["--compile"] if args.compile else []))
    return run_worker(__file__, which, ["--steps", str(args.steps), "--prompts", str(args.prompts), "--group",
                                        str(args.group), "--max-new", str(args.max_new), "--model", args.model, *extra])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["ours", "trl"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=24)
    ap.add_argument("--model", default=None, help="model path (default: the offline tiny model)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per trainer; the fastest counts (3: one slow run each no longer decides the ratio)")
    ap.add_argument("--compile", action="store_true", help="posttrain: rollout.compile=true (compiled in the warm-up steps)")
    ap.add_argument("--engine-dtype", default="auto", choices=["auto", "model", "bfloat16"],
                    help="posttrain's rollout.engine_dtype (default auto: bf16 decoding on CPUs with native bf16, "
                         "as users get it; model: exact fp32 rollouts); training stays fp32")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.model is None:
        from posttrain.models.tiny import resolve

        args.model = str(resolve("tiny"))
    if args.worker:
        res = worker_ours(args) if args.worker == "ours" else worker_trl(args)
        print(json.dumps(res))
        return
    import torch

    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for _ in range(args.repeats):
        for which in ("ours", "trl"):
            runs[which].append(run(which, args))

    def best(rs: list[dict]) -> dict:
        out = dict(max(rs, key=lambda r: r["steps_per_s"]))
        out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        out["all_steps_per_s"] = [round(r["steps_per_s"], 4) for r in rs]
        return out

    ours, trl = best(runs["ours"]), best(runs["trl"])
    for name, r in (("posttrain", ours), ("trl", trl)):
        print(f"{name:10s} {r['steps_per_s']:.3f} steps/s  ({r['step_s']:.2f} s/step, generation "
              f"{100 * r['gen_share']:.0f}%)  peak RSS {r['peak_rss_mb']:.0f} MB")
    print(json.dumps({
        "benchmark": "grpo_step", "model": os.path.basename(args.model.rstrip("/")), "prompts": args.prompts,
        "group": args.group, "max_new_tokens": args.max_new, "steps": args.steps, "threads": torch.get_num_threads(),
        "posttrain_engine_dtype": args.engine_dtype, "posttrain_compile": args.compile,
        "posttrain": ours, "trl": trl,
        "speedup_steps_per_s": ours["steps_per_s"] / trl["steps_per_s"],
        "peak_rss_ratio": ours["peak_rss_mb"] / trl["peak_rss_mb"],
    }))


if __name__ == "__main__":
    main()
