"""On-policy distillation against off-policy distillation (SFT on the teacher's samples), same student,
teacher, data and number of student steps, on the built-in task.

    python benchmarks/distill.py [--steps 20] [--prompts 32] [--samples 4] [--lr 1e-4]

1. student: SFT of the tiny model on the noisy demonstrator (as the RL tests train it; cached);
2. teacher: that SFT model after 30 GRPO steps (cached);
3. on-policy: ``posttrain distill`` — ``--steps`` steps of ``--prompts`` prompts x ``--samples`` student
   samples, scored token by token by the teacher;
4. off-policy: the teacher samples the same number of completions for the same prompts (``--steps`` x
   ``--prompts`` x ``--samples``), and ``posttrain sft`` trains the student on them for ``--steps``
   optimizer steps of ``--prompts`` x ``--samples`` sequences, at the same learning rate;
5. ``posttrain eval`` on 96 held-out prompts x 4 samples, judged by the gold reward, paired bootstrap.

The last line printed is one JSON object with each policy's gold reward and accuracy and
``distill_vs_offpolicy`` (gold difference with its 95% interval).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from _common import cached, posttrain

ROOT = Path(__file__).resolve().parent.parent


def teacher_samples(teacher: str, out: Path, steps: int, prompts: int, samples: int, seed: int) -> None:
    """The teacher's completions for the prompts the student sees, in SFT's prompt/completion format."""
    sys.path.insert(0, str(ROOT))
    from posttrain.config import ModelConfig
    from posttrain.engines.rollout import sample_texts
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.tasks.builtin import prompt_records

    tok, model = load_tokenizer(teacher), load_causal_lm(ModelConfig(name_or_path=teacher))
    rows = prompt_records(steps * prompts, seed=1)
    texts = sample_texts(model, tok, [r["prompt"] for r in rows], samples, 24, 1.0, seed)
    with out.open("w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"prompt": rows[i // samples]["prompt"], "completion": t}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--gamma", type=float, default=0.0, help="distill's discount (0 per token, 1 reward-to-go)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-distill"))
    args = ap.parse_args()
    out = Path(args.out)
    cache = Path(os.environ.get("POSTTRAIN_CACHE", ROOT / ".cache" / "posttrain")) / "bench-distill"
    sft = cached(cache / "sft", "sft", "model.name_or_path=tiny", "train.epochs=2", "data.eval=null",
                 "task_eval=false", "train.progress=false")
    teacher = cached(cache / "teacher", "grpo", f"model.name_or_path={sft}", "reward=builtin_correct",
                     "rollout.prompts_per_step=32", "rollout.group_size=8", "train.max_steps=30", "train.lr=1e-4",
                     "train.progress=false")
    per_step = args.prompts * args.samples
    for name in ("distill", "offpolicy", "eval"):
        shutil.rmtree(out / name, ignore_errors=True)
    posttrain("distill", f"model.name_or_path={sft}", f"teacher.name_or_path={teacher}",
              f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.samples}",
              f"train.max_steps={args.steps}", f"train.lr={args.lr}", f"gamma={args.gamma}",
              "train.progress=false", f"train.output_dir={out / 'distill'}")
    out.mkdir(parents=True, exist_ok=True)
    data = out / "teacher_samples.jsonl"
    teacher_samples(teacher, data, args.steps, args.prompts, args.samples, seed=7)
    posttrain("sft", f"model.name_or_path={sft}", f"data.train={data}", "data.eval=null", "task_eval=false",
              f"train.max_steps={args.steps}", f"train.batch_size={per_step}", f"train.lr={args.lr}",
              "train.schedule=constant", "train.warmup_ratio=0", "train.progress=false",
              f"train.output_dir={out / 'offpolicy'}")
    posttrain("eval", f"policies={{sft: {sft}, teacher: {teacher}, distill: {out / 'distill' / 'final'}, "
                      f"offpolicy: {out / 'offpolicy' / 'final'}}}", "baseline=offpolicy", "n_prompts=96",
              "samples=4", f"output_dir={out / 'eval'}", "best_of_n=[]")
    ev = json.loads((out / "eval" / "eval.json").read_text())["policies"]
    res = {"benchmark": "distill", "steps": args.steps, "sequences_per_step": per_step, "lr": args.lr,
           "gamma": args.gamma,
           **{k: {"gold_reward": v["gold_reward"], "accuracy": v["accuracy"]} for k, v in ev.items()}}
    g = ev["distill"]["vs_baseline"]["gold_paired"]
    res["distill_vs_offpolicy"] = {"diff": g["diff"], "lo": g["lo"], "hi": g["hi"]}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
