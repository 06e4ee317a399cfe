"""Rollout speed: HF ``model.generate`` vs posttrain's HFRolloutEngine, in one process.

Model: the tiny-model factory's "small" Llama (hidden 256, 6 layers, 8 heads / 4 KV heads,
intermediate 688, vocab 512; ≈4.4M parameters), random init. Prompts: random ids, 8–24 tokens (mixed
lengths, so left padding is exercised); 32 new tokens; EOS disabled so every row decodes all 32.

Timed (warm-up excluded; each variant's median over --reps rounds, variants interleaved so machine
noise hits them alike):
  generate greedy / sampled  — ``model.generate`` with the same settings
  engine fp32 / bf16, eager / compiled — sampled (temperature 1), and fp32 greedy
Compile time (first call of a compiled engine at that batch size) is reported separately.
Checks: fp32 greedy outputs identical to generate's (eager and compiled); mean per-token |log-prob gap|
of the bf16 engine vs an fp32 teacher-forced forward on the same sequences.

The last line printed is one JSON object with every number.  Usage:
    OMP_NUM_THREADS=2 python benchmarks/generate.py [--batches 8 64] [--reps 5] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

NEW_TOKENS = 32


def build_model():
    from posttrain.models.tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, arch="llama", size="small", seed=0).eval()
    return model, tok


def make_prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 25, (batch,), generator=g)
    return [torch.randint(10, vocab, (int(n),), generator=g).tolist() for n in lengths]


def hf_generate(model, prompts, pad, greedy: bool, seed: int = 0):
    from transformers import GenerationConfig

    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=not greedy,
                           temperature=1.0, top_p=1.0, top_k=0, pad_token_id=pad, eos_token_id=None)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    return out[:, P:].tolist()


def teacher_forced_logprobs(model, rollouts) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for r in rollouts:
            seq = torch.tensor([r.prompt_ids + r.completion_ids])
            lp = model(seq).logits[0].float().log_softmax(-1)
            P = len(r.prompt_ids)
            out.append(lp[P - 1:-1].gather(-1, torch.tensor(r.completion_ids)[:, None]).squeeze(1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from posttrain.engines.rollout import HFRolloutEngine, SamplingParams

    model, tok = build_model()
    pad = tok.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    sampled = dict(max_new_tokens=NEW_TOKENS, temperature=1.0, stop_token_ids=[])
    greedy = dict(max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=[])
    result: dict = {"model_params": n_params, "new_tokens": NEW_TOKENS, "threads": torch.get_num_threads(),
                    "tokens_per_s": {}, "ratio_vs_generate": {}, "compile_s": {}, "greedy_identical": {},
                    "bf16_logprob_gap": {}, "fp32_logprob_gap": {}}
    compile_modes = [False] if args.no_compile else [False, True]
    for B in args.batches:
        prompts = make_prompts(B, model.config.vocab_size, seed=B)
        engines = {}
        for dtype in ("fp32", "bf16"):
            for comp in compile_modes:
                name = f"engine_{dtype}{'_compiled' if comp else ''}"
                eng = HFRolloutEngine(model, pad_token_id=pad, fast=True, compile=comp,
                                      dtype=None if dtype == "fp32" else torch.bfloat16)
                t0 = time.perf_counter()
                eng.generate(prompts, SamplingParams(**sampled, seed=0))  # warm-up (compiles)
                if comp:
                    result["compile_s"][f"{name}_b{B}"] = round(time.perf_counter() - t0, 2)
                engines[name] = eng

        variants = {
            "generate_greedy": lambda: hf_generate(model, prompts, pad, greedy=True),
            "generate_sampled": lambda: hf_generate(model, prompts, pad, greedy=False),
            "engine_fp32_greedy": lambda: engines["engine_fp32"].generate(prompts, SamplingParams(**greedy)),
        }
        for name, eng in engines.items():
            variants[name] = (lambda e: lambda: e.generate(prompts, SamplingParams(**sampled, seed=1)))(eng)
        for f in variants.values():  # warm-up every path once
            f()
        times = {k: [] for k in variants}
        for _ in range(args.reps):
            for k, f in variants.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        for k, ts in times.items():
            result["tokens_per_s"][f"{k}_b{B}"] = round(B * NEW_TOKENS / statistics.median(ts), 1)
        tps = result["tokens_per_s"]
        for k in variants:
            if k.startswith("engine"):
                base = tps[f"generate_greedy_b{B}"] if "greedy" in k else tps[f"generate_sampled_b{B}"]
                result["ratio_vs_generate"][f"{k}_b{B}"] = round(tps[f"{k}_b{B}"] / base, 2)

        ref = hf_generate(model, prompts, pad, greedy=True)
        for name in [n for n in engines if n.startswith("engine_fp32")]:
            got = [r.completion_ids for r in engines[name].generate(prompts, SamplingParams(**greedy))]
            result["greedy_identical"][f"{name}_b{B}"] = got == ref
        for dtype in ("fp32", "bf16"):
            rolls = engines[f"engine_{dtype}"].generate(prompts, SamplingParams(**sampled, seed=2))
            tf = teacher_forced_logprobs(model, rolls)
            gaps = torch.cat([(t - torch.tensor(r.logprobs)).abs() for t, r in zip(tf, rolls)])
            result[f"{dtype}_logprob_gap"][f"b{B}"] = float(f"{gaps.mean().item():.3g}")

    tps, ratio = result["tokens_per_s"], result["ratio_vs_generate"]
    print(f"\nLlama {n_params / 1e6:.2f}M params, {NEW_TOKENS} new tokens, {result['threads']} threads "
          f"(median of {args.reps}; tokens/s, ratio vs generate with the same sampling)")
    print(f"{'variant':<30}" + "".join(f"{'batch ' + str(B):>22}" for B in args.batches))
    for k in variants:
        cells = []
        for B in args.batches:
            r = ratio.get(f"{k}_b{B}")
            cells.append(f"{tps[f'{k}_b{B}']:>12.0f}" + (f" ({r:>4.2f}x)" if r else " " * 8))
        print(f"{k:<30}" + "".join(f"{c:>22}" for c in cells))
    print("compile_s:", result["compile_s"])
    print("greedy_identical:", result["greedy_identical"])
    print("mean |logprob gap| vs fp32 teacher forcing: fp32", result["fp32_logprob_gap"],
          "bf16", result["bf16_logprob_gap"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
