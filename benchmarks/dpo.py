"""DPO throughput and memory: posttrain against TRL's DPOTrainer (with and without its precomputed
reference log-probs), same tiny model, same pairs (the built-in task's gold-labeled preferences), same
batch, same token ids.

    python benchmarks/dpo.py [--steps 20] [--batch 32] [--size small] [--mixed-precision auto|no|bf16]

Workers, each in its own subprocess (so each peak RSS is its own):

- ``ours``: reference log-probs precomputed once (a fresh cache, timed separately), the reference
  freed, then DPO steps on packed batches where each pair's prompt is computed once.
- ``trl``: DPOTrainer with a live reference model (two models in memory, two forwards per step).
- ``trl_pre``: DPOTrainer with ``precompute_ref_log_probs=True`` (reference pass in ``__init__``).
- ``check_ours`` / ``check_trl``: the DPO loss of the same first batch with a policy and a *different*
  reference (seed 1), before any update, so the comparison is not the trivial log 2.

TRL runs with gradient checkpointing off (its default is on, ~20% slower for a model this small), so
the comparison is against TRL's faster configuration. Pairs/s are steady-state rates after warm-up
steps; the reference pass is reported separately. The three trainers run ``--repeats`` times each,
interleaved, with ``--threads`` OMP threads, and the best rate of each is kept (a shared machine's
load then hits all of them alike). Mixed precision ``auto`` is bf16 autocast for both
when the CPU has AVX-512 bf16, else fp32 for both. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    StepClock,
    bf16_available,
    interleaved,
    peak_rss_mb,
    preference_records,
    run_worker,
    trl_text_rows,
)

WARMUP = 3
BETA = 0.1


def n_pairs(args) -> int:
    return args.batch * (WARMUP + args.steps)


def our_encs(tok, records):
    from posttrain.data.preference import encode_pair

    return [encode_pair(tok, r, 1024) for r in records]


# ----------------------------------------------------------------------------- workers


def worker_ours(args) -> dict:
    import tempfile

    from posttrain.config import ModelConfig, TrainConfig
    from posttrain.data.preference import batch_records, count_records
    from posttrain.engines.loop import TrainEngineAutocast
    from posttrain.engines.train import TrainEngine
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.models.preference import make_loss_fn
    from posttrain.models.reference import precompute

    tok = load_tokenizer(args.model)
    encs = our_encs(tok, preference_records(n_pairs(args)))
    cfg = TrainConfig(lr=5e-5, batch_size=args.batch, micro_batch_size=args.batch, warmup_ratio=0.0,
                      schedule="constant", mixed_precision=args.mixed_precision, output_dir="/tmp/bench-dpo")
    mcfg = ModelConfig(name_or_path=args.model)
    exs = [e.example(k) for e in encs for k in (0, 1)]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: the pass is really computed
        ref, info = precompute(exs, ref_path=args.model, model_cfg=mcfg, cache_dir=cache,
                               pad_id=tok.pad_token_id, autocast=TrainEngineAutocast(cfg), log=lambda *_: None)
    ref_s = time.perf_counter() - t0
    table = ref.view(len(encs), 2)
    model = load_causal_lm(mcfg)
    engine = TrainEngine(model, cfg, WARMUP + args.steps, cfg.output_dir)
    loss_fn = make_loss_fn("dpo", BETA, {})
    clock = StepClock(WARMUP)
    n_tok = n_pad = 0
    for step in range(WARMUP + args.steps):
        idx = list(range(step * args.batch, (step + 1) * args.batch))
        batch = batch_records([encs[i] for i in idx], shared_prompt=True, packing=True, pad_id=tok.pad_token_id)
        batch["ref"] = table[idx]
        n_tok += int((batch["seq_index"] != -1).sum())
        n_pad += int(batch["n_pad"])
        engine.step([batch], loss_fn, count_records)
        clock.tick()
    return {"pairs_per_s": clock.rate(args.batch), "ref_pass_s": ref_s, "peak_rss_mb": peak_rss_mb(),
            "padding_frac": n_pad / max(1, n_pad + n_tok), "loaded_reference": info["loaded_reference"],
            "n_params": sum(p.numel() for p in model.parameters())}


def make_trl(args, records, precompute: bool, ref_model=None, model=None):
    import datasets
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from posttrain.models.loading import load_tokenizer, quiet_transformers

    quiet_transformers()
    tok = load_tokenizer(args.model)
    model = model or AutoModelForCausalLM.from_pretrained(args.model)
    ds = datasets.Dataset.from_list(trl_text_rows(tok, records))
    clock = StepClock(WARMUP)

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            clock.tick()

    cfg = DPOConfig(output_dir="/tmp/bench-dpo-trl", per_device_train_batch_size=args.batch,
                    max_steps=WARMUP + args.steps, learning_rate=5e-5, lr_scheduler_type="constant",
                    logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, beta=BETA,
                    loss_type=["sigmoid"], max_length=1024, dataloader_num_workers=0, disable_tqdm=True,
                    bf16=args.mixed_precision == "bf16", gradient_checkpointing=False,
                    precompute_ref_log_probs=precompute, precompute_ref_batch_size=args.batch, seed=0)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[Clock()])
    return trainer, clock, time.perf_counter() - t0, tok


def worker_trl(args, precompute: bool) -> dict:
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    records = preference_records(n_pairs(args))
    trainer, clock, init_s, tok = make_trl(args, records, precompute)
    ds = trainer.train_dataset
    ours = our_encs(tok, records[:64])
    same = all(ds[i]["prompt_ids"] == e.prompt_ids and ds[i]["chosen_ids"] == e.responses[0]
               and ds[i]["rejected_ids"] == e.responses[1] for i, e in enumerate(ours))
    trainer.train()
    return {"pairs_per_s": clock.rate(args.batch), "init_s": init_s, "peak_rss_mb": peak_rss_mb(),
            "tokens_identical": same}


def first_batch(args):
    return preference_records(args.batch)


def worker_check_ours(args) -> dict:
    import torch

    from posttrain.config import ModelConfig
    from posttrain.data.preference import batch_records
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.models.preference import make_loss_fn
    from posttrain.models.reference import compute_logps

    tok = load_tokenizer(args.model)
    encs = our_encs(tok, first_batch(args))
    ref_model = load_causal_lm(ModelConfig(name_or_path=args.ref))
    ref = compute_logps(ref_model, [e.example(k) for e in encs for k in (0, 1)], pad_id=tok.pad_token_id)
    model = load_causal_lm(ModelConfig(name_or_path=args.model))
    batch = batch_records(encs, shared_prompt=True, packing=True, pad_id=tok.pad_token_id)
    batch["ref"] = ref.view(len(encs), 2)
    with torch.no_grad():
        loss, m = make_loss_fn("dpo", BETA, {})(model, batch, torch.tensor(float(len(encs))))
    return {"loss": float(loss), "logps_chosen": float(m["logps/chosen"]), "logps_rejected": float(m["logps/rejected"])}


def worker_check_trl(args) -> dict:
    import torch
    from datasets.utils.logging import disable_progress_bar
    from transformers import AutoModelForCausalLM

    disable_progress_bar()
    ref = AutoModelForCausalLM.from_pretrained(args.ref)
    trainer, _, _, _ = make_trl(args, first_batch(args), precompute=False, ref_model=ref)
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch)])
    with torch.no_grad():  # the tiny model has no dropout, so train/eval mode give the same loss
        loss = trainer.compute_loss(trainer.model, inputs)
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]  # filed by the model's mode
    logged = {k: sum(v) / len(v) for k, v in metrics.items() if isinstance(v, list) and v}
    return {"loss": float(loss), "logps_chosen": logged.get("logps/chosen"),
            "logps_rejected": logged.get("logps/rejected")}


# ----------------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["ours", "trl", "trl_pre", "check_ours", "check_trl"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", default="small", help="tiny model size (tiny ≈1.6M, small ≈4.4M params)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--ref", default=None, help="reference for the loss check (default: the same size, seed 1)")
    ap.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"])
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per worker (1: robust on a shared machine)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per trainer; the best is kept")
    args = ap.parse_args()
    if args.worker:
        fn = {"ours": worker_ours, "trl": lambda a: worker_trl(a, False), "trl_pre": lambda a: worker_trl(a, True),
              "check_ours": worker_check_ours, "check_trl": worker_check_trl}[args.worker]
        print(json.dumps(fn(args)))
        return
    from posttrain.models.tiny import tiny_path

    args.model = args.model or str(tiny_path("llama", args.size, 0))
    args.ref = args.ref or str(tiny_path("llama", args.size, 1))
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if bf16_available() else "no"
    fwd = ["--steps", str(args.steps), "--batch", str(args.batch), "--model", args.model, "--ref", args.ref,
           "--mixed-precision", args.mixed_precision]
    me = os.path.abspath(__file__)
    check_o = run_worker(me, "check_ours", fwd, threads=args.threads)
    check_t = run_worker(me, "check_trl", fwd, threads=args.threads)
    print(f"first-batch DPO loss (policy seed 0, reference seed 1): posttrain {check_o['loss']:.6f}   "
          f"TRL {check_t['loss']:.6f}   |diff| {abs(check_o['loss'] - check_t['loss']):.2e}   "
          f"logps/chosen {check_o['logps_chosen']:.4f} vs {check_t['logps_chosen']:.4f}")
    runs = interleaved(me, ["ours", "trl", "trl_pre"], fwd, args.repeats, args.threads)
    ours, trl, trl_pre = runs["ours"], runs["trl"], runs["trl_pre"]
    print(f"model {args.model} ({ours['n_params'] / 1e6:.1f}M params)  batch {args.batch} pairs  "
          f"{args.steps} timed steps  mixed precision {args.mixed_precision}  threads {args.threads}  best of "
          f"{args.repeats} interleaved runs")
    print(f"{'trainer':28} {'pairs/s':>9} {'peak MB':>9}  notes")
    print(f"{'posttrain (cached ref)':28} {ours['pairs_per_s']:9.1f} {ours['peak_rss_mb']:9.0f}  ref pass "
          f"{ours['ref_pass_s']:.1f}s, padding {ours['padding_frac']:.1%}")
    print(f"{'TRL DPOTrainer (live ref)':28} {trl['pairs_per_s']:9.1f} {trl['peak_rss_mb']:9.0f}  tokens identical: "
          f"{trl['tokens_identical']}")
    print(f"{'TRL DPOTrainer (precomputed)':28} {trl_pre['pairs_per_s']:9.1f} {trl_pre['peak_rss_mb']:9.0f}  init "
          f"(incl. ref pass) {trl_pre['init_s']:.1f}s")
    result = {
        "benchmark": "dpo", "model": args.model, "batch": args.batch, "steps": args.steps,
        "mixed_precision": args.mixed_precision, "threads": args.threads, "repeats": args.repeats,
        "all_pairs_per_s": {k: r["all_pairs_per_s"] for k, r in runs.items()},
        "posttrain_pairs_per_s": round(ours["pairs_per_s"], 2), "trl_pairs_per_s": round(trl["pairs_per_s"], 2),
        "trl_precompute_pairs_per_s": round(trl_pre["pairs_per_s"], 2),
        "speed_ratio_vs_trl": round(ours["pairs_per_s"] / trl["pairs_per_s"], 3),
        "speed_ratio_vs_trl_precompute": round(ours["pairs_per_s"] / trl_pre["pairs_per_s"], 3),
        "posttrain_peak_rss_mb": round(ours["peak_rss_mb"]), "trl_peak_rss_mb": round(trl["peak_rss_mb"]),
        "trl_precompute_peak_rss_mb": round(trl_pre["peak_rss_mb"]),
        "memory_ratio_vs_trl": round(ours["peak_rss_mb"] / trl["peak_rss_mb"], 3),
        "memory_ratio_vs_trl_precompute": round(ours["peak_rss_mb"] / trl_pre["peak_rss_mb"], 3),
        "posttrain_ref_pass_s": round(ours["ref_pass_s"], 2), "posttrain_padding_frac": round(ours["padding_frac"], 4),
        "tokens_identical": trl["tokens_identical"],
        "first_loss_posttrain": check_o["loss"], "first_loss_trl": check_t["loss"],
        "first_loss_abs_diff": abs(check_o["loss"] - check_t["loss"]),
        "first_logps_chosen_posttrain": check_o["logps_chosen"], "first_logps_chosen_trl": check_t["logps_chosen"],
        "first_logps_rejected_posttrain": check_o["logps_rejected"],
        "first_logps_rejected_trl": check_t["logps_rejected"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
