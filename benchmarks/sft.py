"""SFT throughput and memory: posttrain against TRL's SFTTrainer, same model, data, batch, lengths.

    python benchmarks/sft.py [--steps 20] [--batch 32] [--size small]

Each trainer runs in its own subprocess (so peak RSS is its own) on the same tiny Llama, the same
prompt/completion records and the same global batch, for a few warm-up steps and then ``--steps``
timed steps. Two cases: the built-in task's short chat examples (~25 tokens) and long ones
(~120 tokens). Tokens/s counts real (non-padding) tokens: mean example length x examples/s, the same
estimator for both. MFU = 6 N tokens/s / the fp32 matmul peak measured here first. TRL runs twice
per repeat: with gradient checkpointing off (``trl``: its faster configuration, and the same
recomputation policy as ours, so the memory comparison is like for like) and with its SFTConfig
defaults (``trl_default``: checkpointing on, what a user gets). Each trainer runs ``--repeats``
times, interleaved; the fastest run of each and the highest peak RSS are kept. Ratios are
posttrain / TRL. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import matmul_peak_gflops, peak_rss_mb, run_worker

WARMUP = 3


def records(case: str, n: int = 2048) -> list[dict]:
    from posttrain.tasks import builtin

    rows = builtin.sft_records(n, seed=0)
    if case == "long":  # a long instruction: earlier worked problems in the prompt (~120 tokens)
        rng = random.Random(1)
        out = []
        for r in rows:
            shots = [builtin.sample_problem(rng) for _ in range(4)]
            context = " ".join(f"{p.prompt} Answer: {p.answer}." for p in shots)
            out.append({"prompt": f"{context} Now: {r['prompt']}", "completion": r["completion"]})
        rows = out
    return rows


# ----------------------------------------------------------------------------- workers


def worker_ours(args) -> dict:
    from posttrain.algorithms.sft import count_tokens, sft_loss
    from posttrain.config import ModelConfig, TrainConfig
    from posttrain.data.batching import collate
    from posttrain.data.chat import encode_sft
    from posttrain.engines.train import TrainEngine
    from posttrain.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(args.model)
    exs = [encode_sft(tok, r, 512) for r in records(args.case)]
    model = load_causal_lm(ModelConfig(name_or_path=args.model))
    n_params = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(lr=1e-4, batch_size=args.batch, micro_batch_size=args.batch, warmup_ratio=0.0,
                      schedule="constant", mixed_precision=args.mixed_precision, output_dir="/tmp/bench-sft",
                      gradient_checkpointing=args.checkpointing)
    engine = TrainEngine(model, cfg, WARMUP + args.steps, cfg.output_dir)
    rng = random.Random(0)
    order = list(range(len(exs)))
    rng.shuffle(order)
    first_loss = None
    for step in range(WARMUP + args.steps):
        if step == WARMUP:
            t0 = time.perf_counter()
        idx = [order[(step * args.batch + i) % len(order)] for i in range(args.batch)]
        batch = collate([exs[i] for i in idx], packing=True, pad_id=tok.pad_token_id)
        m = engine.step([batch], sft_loss, count_tokens)
        if first_loss is None:
            first_loss = float(m["loss"])
    dt = time.perf_counter() - t0
    mean_len = sum(len(e) for e in exs) / len(exs)
    return {"examples_per_s": args.steps * args.batch / dt, "tokens_per_s": mean_len * args.steps * args.batch / dt,
            "mean_tokens": mean_len, "peak_rss_mb": peak_rss_mb(), "n_params": n_params, "first_loss": first_loss}


def worker_trl(args) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from posttrain.models.loading import load_tokenizer, quiet_transformers

    quiet_transformers()
    tok = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    # conversational form, so TRL applies the same chat template we do (plain strings would be
    # concatenated without it: fewer tokens, not the same data)
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                      "completion": [{"role": "assistant", "content": r["completion"]}]}
                                     for r in records(args.case)])
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter())

    cfg = SFTConfig(output_dir="/tmp/bench-sft-trl", per_device_train_batch_size=args.batch,
                    max_steps=WARMUP + args.steps, learning_rate=1e-4, lr_scheduler_type="constant",
                    logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, max_length=512,
                    dataloader_num_workers=0, bf16=args.mixed_precision == "bf16", disable_tqdm=True,
                    **({} if args.trl_defaults else {"gradient_checkpointing": False}))
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    lens = [len(x) for x in trainer.train_dataset["input_ids"]]
    mean_len = sum(lens) / len(lens)
    dt = times[-1] - times[WARMUP - 1]
    first = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return {"examples_per_s": args.steps * args.batch / dt, "tokens_per_s": mean_len * args.steps * args.batch / dt,
            "mean_tokens": mean_len, "peak_rss_mb": peak_rss_mb(), "first_loss": first}


# ----------------------------------------------------------------------------- driver


def run(which: str, case: str, args) -> dict:
    argv = ["--case", case, "--steps", str(args.steps), "--batch", str(args.batch), "--model", args.model,
            "--mixed-precision", args.mixed_precision] + (["--checkpointing"] if args.checkpointing else [])
    if which == "trl_default":
        return run_worker(__file__, "trl", argv + ["--trl-defaults"])
    return run_worker(__file__, which, argv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["ours", "trl"])
    ap.add_argument("--trl-defaults", action="store_true", help="TRL worker: keep SFTConfig's gradient checkpointing")
    ap.add_argument("--checkpointing", action="store_true", help="posttrain with train.gradient_checkpointing "
                    "(compare its memory with trl_default's)")
    ap.add_argument("--case", default="short", choices=["short", "long"])
    ap.add_argument("--cases", default="short,long", help="the cases the comparison runs (comma-separated)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--size", default="small", help="tiny model size (tiny ≈1.6M, small ≈4.4M params)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    args = ap.parse_args()
    if args.worker:
        result = (worker_ours if args.worker == "ours" else worker_trl)(args)
        print(json.dumps(result))
        return
    from posttrain.models.tiny import resolve

    args.model = args.model or resolve(f"tiny-llama-{args.size}")
    peak = matmul_peak_gflops()
    result = {"model": args.model, "batch": args.batch, "steps": args.steps, "matmul_peak_gflops": round(peak, 1)}
    print(f"fp32 matmul peak: {peak:.0f} GFLOP/s   model: {args.model}")
    print(f"{'case':6} {'trainer':11} {'tokens':>7} {'tok/s':>9} {'MFU':>6} {'peak MB':>8} {'loss@1':>8}")
    for case in args.cases.split(","):
        runs = {"ours": [], "trl": [], "trl_default": []}
        for _ in range(args.repeats):  # interleaved: load from other processes hits all alike
            for w in runs:
                runs[w].append(run(w, case, args))
        ours, trl, trl_def = ({**max(rs, key=lambda r: r["tokens_per_s"]),
                               "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)} for rs in runs.values())
        flops = 6 * ours["n_params"]
        for name, r in (("posttrain", ours), ("trl", trl), ("trl_default", trl_def)):
            r["mfu"] = flops * r["tokens_per_s"] / (peak * 1e9)
            print(f"{case:6} {name:11} {r['mean_tokens']:7.1f} {r['tokens_per_s']:9.0f} {r['mfu']:6.1%} "
                  f"{r['peak_rss_mb']:8.0f} {r['first_loss']:8.4f}")
        result[case] = {"posttrain_tokens_per_s": round(ours["tokens_per_s"]), "trl_tokens_per_s": round(trl["tokens_per_s"]),
                        "speed_ratio": round(ours["tokens_per_s"] / trl["tokens_per_s"], 3),
                        "posttrain_peak_rss_mb": round(ours["peak_rss_mb"]), "trl_peak_rss_mb": round(trl["peak_rss_mb"]),
                        "memory_ratio": round(ours["peak_rss_mb"] / trl["peak_rss_mb"], 3),
                        "posttrain_mfu": round(ours["mfu"], 3), "trl_mfu": round(trl["mfu"], 3),
                        "trl_default_tokens_per_s": round(trl_def["tokens_per_s"]),
                        "speed_ratio_vs_trl_default": round(ours["tokens_per_s"] / trl_def["tokens_per_s"], 3),
                        "memory_ratio_vs_trl_default": round(ours["peak_rss_mb"] / trl_def["peak_rss_mb"], 3),
                        "mean_tokens": round(ours["mean_tokens"], 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
