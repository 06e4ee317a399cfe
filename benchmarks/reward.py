"""Reward-model throughput and memory: posttrain against TRL's RewardTrainer, same tiny backbone,
same freshly initialised head (same seed), same pairs and token ids, same batch.

    python benchmarks/reward.py [--steps 20] [--batch 32] [--size small] [--mixed-precision auto|no|bf16]

Each trainer runs in its own subprocess. TRL gets the pairs pre-tokenized with our ids
(``chosen_ids``/``rejected_ids``, which RewardTrainer accepts as-is), so both score exactly the same
sequences; before training each computes the Bradley–Terry loss of the same first batch, which must
agree (same initial weights, same inputs). posttrain runs chosen and rejected in one packed forward
with each pair's prompt computed once and the head applied at the last tokens only; TRL pads the
2B sequences and runs the classifier on every position. TRL runs with gradient checkpointing off
(its faster setting here). Both run ``--repeats`` times, interleaved, with ``--threads`` OMP threads;
the best rate of each is kept. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    StepClock,
    bf16_available,
    interleaved,
    peak_rss_mb,
    preference_records,
)

WARMUP = 3


def data(args):
    from posttrain.data.preference import encode_pair
    from posttrain.models.loading import load_tokenizer

    tok = load_tokenizer(args.model)
    records = preference_records(args.batch * (WARMUP + args.steps))
    return tok, [encode_pair(tok, r, 1024) for r in records]


def fresh_rm(args, pad_id):
    import torch

    from posttrain.config import ModelConfig
    from posttrain.models.heads import load_reward_model

    torch.manual_seed(0)  # the head's initialisation: identical in both workers
    return load_reward_model(ModelConfig(name_or_path=args.model), pad_token_id=pad_id)


def worker_ours(args) -> dict:
    import torch

    from posttrain.algorithms.reward import RewardConfig, make_loss_fn
    from posttrain.config import TrainConfig
    from posttrain.data.preference import batch_records, count_records
    from posttrain.engines.train import TrainEngine

    tok, encs = data(args)
    model = fresh_rm(args, tok.pad_token_id)
    cfg = TrainConfig(lr=1e-4, batch_size=args.batch, micro_batch_size=args.batch, warmup_ratio=0.0,
                      schedule="constant", mixed_precision=args.mixed_precision, output_dir="/tmp/bench-rm")
    loss_fn = make_loss_fn(RewardConfig(), tok.pad_token_id)

    def batch(step):
        return batch_records(encs[step * args.batch:(step + 1) * args.batch], shared_prompt=True, packing=True, pad_id=tok.pad_token_id)

    with torch.no_grad():
        first, _ = loss_fn(model, batch(0), torch.tensor(float(args.batch)))
    engine = TrainEngine(model, cfg, WARMUP + args.steps, cfg.output_dir)
    clock = StepClock(WARMUP)
    n_tok = n_pad = 0
    for step in range(WARMUP + args.steps):
        b = batch(step)
        n_tok += int((b["seq_index"] != -1).sum())
        n_pad += int(b["n_pad"])
        engine.step([b], loss_fn, count_records)
        clock.tick()
    return {"pairs_per_s": clock.rate(args.batch), "peak_rss_mb": peak_rss_mb(), "first_loss": float(first),
            "padding_frac": n_pad / max(1, n_pad + n_tok), "n_params": sum(p.numel() for p in model.parameters())}


def worker_trl(args) -> dict:
    import datasets
    import torch
    from datasets.utils.logging import disable_progress_bar
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    disable_progress_bar()
    tok, encs = data(args)
    model = fresh_rm(args, tok.pad_token_id)
    rows = [{"chosen_ids": e.prompt_ids + e.responses[0], "rejected_ids": e.prompt_ids + e.responses[1]}
            for e in encs]
    clock = StepClock(WARMUP)

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            clock.tick()

    cfg = RewardConfig(output_dir="/tmp/bench-rm-trl", per_device_train_batch_size=args.batch,
                       max_steps=WARMUP + args.steps, learning_rate=1e-4, lr_scheduler_type="constant",
                       logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, max_length=1024,
                       dataloader_num_workers=0, disable_tqdm=True, bf16=args.mixed_precision == "bf16",
                       gradient_checkpointing=False, center_rewards_coefficient=None, seed=0)
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                            processing_class=tok, callbacks=[Clock()])
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch)])
    with torch.no_grad():
        first = trainer.compute_loss(trainer.model, inputs)
    trainer._metrics["train"].clear()
    trainer.train()
    return {"pairs_per_s": clock.rate(args.batch), "peak_rss_mb": peak_rss_mb(), "first_loss": float(first)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["ours", "trl"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", default="small", help="tiny model size (tiny ≈1.6M, small ≈4.4M params)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"])
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per worker (1: robust on a shared machine)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per trainer; the best is kept")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps((worker_ours if args.worker == "ours" else worker_trl)(args)))
        return
    from posttrain.models.tiny import tiny_path

    args.model = args.model or str(tiny_path("llama", args.size, 0))
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if bf16_available() else "no"
    fwd = ["--steps", str(args.steps), "--batch", str(args.batch), "--model", args.model,
           "--mixed-precision", args.mixed_precision]
    me = os.path.abspath(__file__)
    runs = interleaved(me, ["ours", "trl"], fwd, args.repeats, args.threads)
    ours, trl = runs["ours"], runs["trl"]
    print(f"model {args.model} ({ours['n_params'] / 1e6:.1f}M params)  batch {args.batch} pairs  "
          f"{args.steps} timed steps  mixed precision {args.mixed_precision}  threads {args.threads}  best of "
          f"{args.repeats} interleaved runs")
    print(f"first-batch BT loss (same init, same ids): posttrain {ours['first_loss']:.6f}   TRL "
          f"{trl['first_loss']:.6f}   |diff| {abs(ours['first_loss'] - trl['first_loss']):.2e}")
    print(f"{'trainer':22} {'pairs/s':>9} {'peak MB':>9}")
    print(f"{'posttrain reward':22} {ours['pairs_per_s']:9.1f} {ours['peak_rss_mb']:9.0f}  padding "
          f"{ours['padding_frac']:.1%}")
    print(f"{'TRL RewardTrainer':22} {trl['pairs_per_s']:9.1f} {trl['peak_rss_mb']:9.0f}")
    print(json.dumps({
        "benchmark": "reward", "model": args.model, "batch": args.batch, "steps": args.steps,
        "mixed_precision": args.mixed_precision, "threads": args.threads, "repeats": args.repeats,
        "all_pairs_per_s": {k: r["all_pairs_per_s"] for k, r in runs.items()},
        "posttrain_pairs_per_s": round(ours["pairs_per_s"], 2), "trl_pairs_per_s": round(trl["pairs_per_s"], 2),
        "speed_ratio": round(ours["pairs_per_s"] / trl["pairs_per_s"], 3),
        "posttrain_peak_rss_mb": round(ours["peak_rss_mb"]), "trl_peak_rss_mb": round(trl["peak_rss_mb"]),
        "memory_ratio": round(ours["peak_rss_mb"] / trl["peak_rss_mb"], 3),
        "posttrain_padding_frac": round(ours["padding_frac"], 4),
        "first_loss_posttrain": ours["first_loss"], "first_loss_trl": trl["first_loss"],
        "first_loss_abs_diff": abs(ours["first_loss"] - trl["first_loss"]),
    }))


if __name__ == "__main__":
    main()
