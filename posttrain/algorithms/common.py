"""Pieces every algorithm file uses: model setup, held-out loss, sampling-based task metrics,
throughput, the final save. Functions, not a base class: an algorithm calls what it needs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from posttrain.config import LoraConfig, ModelConfig


def load_tokenizer(cfg: ModelConfig):
    from posttrain.models.loading import load_tokenizer as _load

    return _load(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)


def load_policy(cfg: ModelConfig, lora: LoraConfig | None = None, name_or_path: str | None = None):
    """The trainable causal LM (LoRA-wrapped when enabled)."""
    from posttrain.models.loading import apply_lora, load_causal_lm

    model = load_causal_lm(cfg, name_or_path)
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora)
    return model


class Throughput:
    """Items per second since construction (wall clock)."""

    def __init__(self):
        self.t0, self.n = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.n += n

    def rate(self) -> float:
        return self.n / max(time.perf_counter() - self.t0, 1e-9)


@torch.no_grad()
def eval_loss(engine, examples, loss_fn, count_fn, pad_id, packing, micro) -> dict[str, float]:
    """Held-out loss and metrics, weighted exactly like training (sum / total count)."""
    from posttrain.data.batching import collate

    if not examples:
        return {}
    model = engine.unwrapped  # not the DDP wrapper: only the main process evaluates
    model.eval()
    batches = [collate(examples[s:s + micro], packing=packing, pad_id=pad_id)
               for s in range(0, len(examples), micro)]
    total = torch.stack([count_fn(b) for b in batches]).sum().clamp(min=1)
    loss, sums = 0.0, {}
    for b in batches:
        with engine.autocast():
            l, m = loss_fn(model, b, total)
        loss += l.float()
        w = count_fn(b) / total
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v.float() * w
    out = {k: float(v) for k, v in sums.items()}
    out["loss"] = float(loss)
    return out


def rollout_engine(model, tokenizer):
    from posttrain.engines.rollout import HFRolloutEngine

    return HFRolloutEngine(model, pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer)


def sample_texts(model, tokenizer, prompts: list, n: int, max_new_tokens: int, temperature: float,
                 seed: int, engine=None) -> list[str]:
    """``n`` sampled completions per prompt (grouped), decoded without special tokens."""
    outs = sample_rollouts(model, tokenizer, prompts, n, max_new_tokens, temperature, seed, engine)
    return [tokenizer.decode(o.completion_ids, skip_special_tokens=True) for o in outs]


def builtin_task_eval(model, tokenizer, n_prompts: int = 64, n_samples: int = 4, seed: int = 0,
                      temperature: float = 1.0, engine=None) -> dict[str, float]:
    """The built-in task's held-out metrics on samples from the policy: mean gold reward and
    accuracy (share of samples whose numbers are exactly right)."""
    from posttrain.tasks import builtin

    problems = builtin.heldout_problems(n_prompts)
    prompts = [p.prompt for p in problems]
    texts = sample_texts(model, tokenizer, prompts, n_samples, 24, temperature, seed + 17, engine)
    rep = [p for p in prompts for _ in range(n_samples)]
    gold = [builtin.gold_reward(p, t) for p, t in zip(rep, texts)]
    acc = [float(builtin.is_correct(p, t)) for p, t in zip(rep, texts)]
    return {"gold_reward": sum(gold) / len(gold), "accuracy": sum(acc) / len(acc),
            "response_chars": sum(len(t) for t in texts) / len(texts)}


def save_final(engine, tokenizer, run_dir: Path, lora: LoraConfig | None = None) -> Path:
    """The trained model in Hugging Face format under ``run_dir/final``."""
    from posttrain.models.loading import save_pretrained

    return save_pretrained(engine.unwrapped, tokenizer, Path(run_dir) / "final",
                           merge_lora=bool(lora and lora.enabled and lora.merge_on_save))


def write_summary(run_dir: Path, summary: dict) -> None:
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=float))


def _eval_row(metrics: dict, flatten) -> dict:
    return {f"eval/{k}": v for k, v in (flatten(metrics) if flatten else metrics).items()}


def between_steps(engine, train, step: int, total: int, evaluate, logger, state: dict, flatten=None) -> None:
    """Periodic work after optimizer step ``step``: a held-out evaluation every ``train.eval_every``
    steps (main process; the last step is evaluated by ``finish``) and a checkpoint every
    ``train.save_every`` steps carrying ``state`` (what resuming needs besides the engine's own)."""
    if train.eval_every and step % train.eval_every == 0 and step < total and engine.is_main:
        if row := _eval_row(evaluate(), flatten):
            logger.log(step, row)
    if train.save_every and step % train.save_every == 0:
        engine.save_checkpoint(state)


def finish(engine, logger, run_dir: Path, summary: dict, evaluate, step: int, save, flatten=None) -> dict:
    """End of a training run: on the main process the final held-out evaluation, ``save()`` (the
    model into final/) and summary.json; then every process waits for it."""
    if engine.is_main:
        summary["final"] = evaluate()
        if row := _eval_row(summary["final"], flatten):
            logger.log(step, row)
        save()
        write_summary(run_dir, summary)
    logger.close()
    engine.accelerator.wait_for_everyone()
    summary["run_dir"] = str(run_dir)
    return summary


def sample_rollouts(model, tokenizer, prompts: list, n: int, max_new_tokens: int, temperature: float,
                    seed: int, engine=None) -> list:
    """``n`` rollouts per prompt (grouped contiguously) with token ids, for scoring and KL."""
    from posttrain.data.chat import encode_prompt
    from posttrain.engines.rollout import SamplingParams

    engine = engine or rollout_engine(model, tokenizer)
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed,
                            stop_token_ids=[tokenizer.eos_token_id])
    was_training = model.training
    model.eval()
    out = engine.generate(ids, params)
    model.train(was_training)
    return out


@torch.no_grad()
def completion_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                     micro: int = 64) -> torch.Tensor:
    """[N] summed log π(completion | prompt) in packed forwards (no padding compute)."""
    from posttrain.data.batching import collate
    from posttrain.data.chat import Example
    from posttrain.logprobs import token_logps
    from posttrain.models.attention import model_inputs

    model.eval()
    out = []
    for s in range(0, len(prompt_ids), micro):
        exs = [Example(p + c, [0] * len(p) + [1] * len(c))
               for p, c in zip(prompt_ids[s:s + micro], completion_ids[s:s + micro])]
        batch = collate(exs, packing=True)
        logp = token_logps(model(**model_inputs(model, batch)).logits, batch["input_ids"])
        same = batch["seq_index"][:, 1:] == batch["seq_index"][:, :-1]
        mask = batch["loss_mask"][:, 1:].bool() & same
        seq = batch["seq_index"][:, 1:].clamp(min=0)
        sums = torch.zeros(len(exs)).index_add_(0, seq[mask], logp[mask].float())
        out.append(sums)
    return torch.cat(out) if out else torch.zeros(0)
