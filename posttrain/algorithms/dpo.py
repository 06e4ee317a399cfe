"""Direct alignment from preference pairs: DPO and its family, chosen once by ``loss``.

DPO (Rafailov et al. 2023; RLHF book ch. 8), with h = β[(log π(y_c|x) − log π_ref(y_c|x)) −
(log π(y_r|x) − log π_ref(y_r|x))]:

    L_DPO = −log σ(h)

The other losses of the registry (``posttrain.losses.direct.DIRECT_LOSSES``): ``cdpo`` (label
smoothing ε), ``robust`` (rDPO, unbiased under label noise ε), ``ipo`` ((h/β − 1/(2β))², Azar et al.
2023), ``hinge`` (SLiC), and the reference-free ``simpo`` (length-normalised log-probs with a target
margin γ, Meng et al. 2024) and ``orpo`` (NLL + odds-ratio term, Hong et al. 2024). Extra loss
hyper-parameters go in ``loss_args`` and are checked against the loss function's signature.

Efficiency: chosen and rejected of a micro-batch run in ONE packed forward (``pairs.collate_responses``);
log-probs are gathered (``token_logps``), never a full [B, T, V] log-softmax; reference log-probs are
precomputed once and cached (``reference.py``), so training holds one model. Each loss returns a batch
mean, which is scaled by (pairs in this micro-batch / pairs in the optimizer step) so accumulation and
DDP give the gradient of one big batch. With ``shared_prompt`` (default) the prompt of a pair is
computed once for both responses (``pairs.collate_shared``).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.config import DataConfig, LoraConfig, ModelConfig, TrainConfig, opt
from posttrain.errors import ConfigError

REFERENCE_FREE = ("simpo", "orpo")
_STANDARD = {"chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "beta",
             "chosen_lengths", "rejected_lengths"}


def loss_hparams(fn) -> dict[str, object]:
    """Keyword hyper-parameters a direct loss accepts beyond the standard inputs (name -> default)."""
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if k not in _STANDARD and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def check_reference(reference: str, loss: str) -> None:
    if reference in ("precompute", "live") and loss in REFERENCE_FREE:
        raise ConfigError(f"loss={loss} uses no reference model, but reference={reference}", where="reference",
                          fix="set reference=auto (or none)")
    if reference == "none" and loss not in REFERENCE_FREE:
        raise ConfigError(f"loss={loss} needs reference log-probs, but reference=none", where="reference",
                          fix=f"set reference=auto (precompute) or live; reference-free losses: {REFERENCE_FREE}")


@dataclass
class DPOConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="Policy to train (usually an SFT model); also the "
                             "reference unless ref_model is set.")
    lora: LoraConfig = opt(factory=LoraConfig, help="LoRA adapters; the reference is then the same model "
                           "with adapters disabled (no second copy).")
    data: DataConfig = opt(factory=lambda: DataConfig(train="builtin:preferences", eval=None),
                           help="Preference pairs {prompt, chosen, rejected} (strings or messages; "
                                "implicit-prompt conversations allowed).")
    train: TrainConfig = opt(factory=lambda: TrainConfig(lr=5e-5, epochs=1.0, schedule="linear", batch_size=32,
                                                         micro_batch_size=32),
                             help="Optimisation; defaults suit the tiny model (real models: lr 5e-7..1e-6, "
                                  "TRL/Tulu 3).")
    loss: str = opt("dpo", "Direct-alignment loss: dpo, cdpo, robust, ipo, hinge, simpo, orpo.",
                    "posttrain.losses.direct.DIRECT_LOSSES")
    beta: float = opt(0.1, "β: strength of the implicit KL constraint (SimPO: reward scale, ~2; ORPO: "
                      "odds-ratio weight λ).", "Rafailov et al. 2023; TRL default 0.1")
    loss_args: dict[str, float] = opt({}, "Extra hyper-parameters of the chosen loss, e.g. {label_smoothing: "
                                      "0.1} for cdpo/robust, {gamma: 0.5} for simpo (names per the loss).")
    nll_weight: float = opt(0.0, "Add nll_weight x the chosen responses' per-token NLL to the loss (RPO); "
                            "counters likelihood displacement (chosen and rejected log-probs both falling). "
                            "0 = the loss alone; ORPO has its own NLL term.",
                            "Pang et al. 2024 (RPO, alpha = 1); TRL loss_type ['sigmoid', 'sft']")
    reference: Literal["auto", "precompute", "live", "none"] = opt(
        "auto", "precompute: one cached inference pass, then the reference is freed; live: computed each "
        "step; none: reference-free losses. auto = none for simpo/orpo, else precompute.",
        "TRL precompute_ref_log_probs; RLHF book ch. 8")
    ref_model: str | None = opt(None, "Reference model path (default: model.name_or_path).")
    ref_cache_dir: str | None = opt(None, "Where precomputed reference log-probs are cached (default "
                                    "$POSTTRAIN_CACHE/ref_logps).")
    eval_holdout: int = opt(0, "With data.eval null, hold out the last N training pairs for evaluation.")
    packing: bool = opt(True, "Pack sequences into rows with isolated attention (no compute on padding).")
    shared_prompt: bool = opt(True, "Compute each record's prompt once for all its responses (packed "
                              "layout where a response attends to the prompt and itself only). Needs packing.")
    task_eval: bool = opt(True, "When data.train is the built-in task, sample held-out prompts and report "
                          "the gold reward, accuracy and KL to the reference.")
    task_eval_prompts: int = opt(64, "Held-out prompts for the built-in task's metrics.")
    task_eval_samples: int = opt(4, "Samples per held-out prompt (temperature 1).")

    def validate(self) -> None:
        validate_direct(self.loss, self.beta, self.loss_args, self.reference)
        if self.nll_weight < 0:
            raise ConfigError(f"nll_weight must be >= 0, got {self.nll_weight}", where="nll_weight")
        if self.nll_weight and self.loss == "orpo":
            raise ConfigError("orpo already contains an NLL term on the chosen responses", where="nll_weight",
                              fix="leave nll_weight=0 with loss=orpo")
        if self.shared_prompt and not self.packing:
            raise ConfigError("shared_prompt needs packing (the shared layout is a packed row)", where="shared_prompt",
                              fix="set shared_prompt=false, or packing=true")
        if self.eval_holdout < 0:
            raise ConfigError("eval_holdout must be >= 0", where="eval_holdout")


def validate_direct(loss: str, beta: float, loss_args: dict, reference: str) -> None:
    from posttrain.losses.direct import DIRECT_LOSSES, get_direct_loss

    if loss not in DIRECT_LOSSES:
        near = difflib.get_close_matches(loss, list(DIRECT_LOSSES), n=1)
        raise ConfigError(f"unknown loss '{loss}'", where="loss",
                          fix=(f"did you mean '{near[0]}'? " if near else "") +
                              f"valid losses: {', '.join(DIRECT_LOSSES)}")
    if beta <= 0:
        raise ConfigError(f"beta must be positive, got {beta}", where="beta", fix="use e.g. beta=0.1")
    accepted = loss_hparams(get_direct_loss(loss))
    for k in loss_args:
        if k not in accepted:
            raise ConfigError(f"loss={loss} takes no hyper-parameter '{k}'", where=f"loss_args.{k}",
                              fix=f"{loss} accepts: {', '.join(accepted) or 'none besides beta'}")
    check_reference(reference, loss)


def resolve_reference(reference: str, loss: str) -> str:
    return ("none" if loss in REFERENCE_FREE else "precompute") if reference == "auto" else reference


# ----------------------------------------------------------------------------- loss


def make_loss_fn(loss: str, beta: float, loss_args: dict, live=None, nll_weight: float = 0.0):
    """(model, batch, total) -> (sum/total loss, metrics): the registry's loss on one packed forward,
    plus ``nll_weight`` x mean over pairs of −log π(y_c|x) / |y_c| (RPO) when set."""
    from posttrain.algorithms.pairs import by_slot, sequence_logps
    from posttrain.losses.direct import get_direct_loss

    fn = get_direct_loss(loss)

    def loss_fn(model, batch, total):
        logp, ntok = sequence_logps(model, batch)  # chosen and rejected in one forward
        pol, lens = by_slot(logp, batch), by_slot(ntok, batch)
        ref = by_slot(live.batch_logps(batch, model), batch) if live is not None else batch.get("ref")
        ref_c, ref_r = (ref[:, 0], ref[:, 1]) if ref is not None else (None, None)
        out, metrics = fn(pol[:, 0], pol[:, 1], ref_c, ref_r, beta=beta, chosen_lengths=lens[:, 0],
                          rejected_lengths=lens[:, 1], **loss_args)
        metrics = {k: v.detach() for k, v in metrics.items()}
        if nll_weight:
            nll = (-pol[:, 0] / lens[:, 0].clamp(min=1)).mean()
            metrics["nll"] = nll.detach()
            out = out + nll_weight * nll
        metrics["loss"] = out.detach()
        with torch.no_grad():
            metrics["logps/accuracy"] = (pol[:, 0] > pol[:, 1]).float().mean()
        n = batch["n_records"]
        return out * (n / total), metrics  # batch mean -> this micro-batch's share of sum/total

    return loss_fn


@torch.no_grad()
def pair_eval(model, batches: list[dict], loss_fn, autocast) -> dict[str, float]:
    """Held-out pairs: loss and metrics weighted by pairs (implicit-reward accuracy rewards/accuracy,
    margin, chosen/rejected rewards and log-probs; logps/accuracy = share with log π(y_c) > log π(y_r))."""
    if not batches:
        return {}
    was = model.training
    model.eval()
    total = sum(b["n_records"] for b in batches).float()
    sums: dict[str, float] = {}
    for b in batches:
        with autocast():
            _, m = loss_fn(model, b, total)
        w = float(b["n_records"]) / float(total)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v) * w
    model.train(was)
    return sums


# ----------------------------------------------------------------------------- shared setup


def attach_reference(batch: dict, table: torch.Tensor | None, idx: list[int]) -> dict:
    """Add the precomputed reference log-probs [N, K] of records ``idx`` to a micro-batch."""
    if table is not None:
        batch["ref"] = table[idx]
    return batch


def attach_reference_in_order(batches: list[dict], table: torch.Tensor | None) -> list[dict]:
    s = 0
    for b in batches:
        n = int(b["n_records"])
        attach_reference(b, table, list(range(s, s + n)))
        s += n
    return batches


def precompute_tables(encs_by_split: dict[str, list], *, ref_path: str, model_cfg: ModelConfig, policy,
                      cache_dir, pad_id: int, autocast, extra: dict[str, list] | None = None):
    """Reference log-probs of every response of every record, one pass for all splits and extras.
    Returns ({split: [N, K] table}, {name: [M] tensor} for ``extra`` example lists, info)."""
    from posttrain.algorithms.reference import precompute

    exs, spans = [], {}
    for name, encs in encs_by_split.items():
        start = len(exs)
        exs += [e.example(k) for e in encs for k in range(len(e.responses))]
        spans[name] = (start, len(exs))
    for name, more in (extra or {}).items():
        start = len(exs)
        exs += more
        spans[name] = (start, len(exs))
    logps, info = precompute(exs, ref_path=ref_path, model_cfg=model_cfg, policy=policy, cache_dir=cache_dir,
                             pad_id=pad_id, autocast=autocast)
    tables = {}
    for name, encs in encs_by_split.items():
        a, _ = spans[name]
        k = max((len(e.responses) for e in encs), default=1)
        tables[name] = logps[a:a + len(encs) * k].view(len(encs), k) if encs else None
    extras = {name: logps[spans[name][0]:spans[name][1]] for name in (extra or {})}
    return tables, extras, info


def task_metrics(cfg, engine, tokenizer, live, ref_path: str, initial: bool) -> dict:
    """Gold reward / accuracy of samples from the policy, and KL(π‖π_ref) (0 by definition before
    the first update when the policy is the reference)."""
    from posttrain.algorithms.reference import reference_logps_for, sampled_eval

    model = engine.unwrapped
    same = initial and ref_path == cfg.model.name_or_path
    ref_fn = None if same else (lambda exs: reference_logps_for(
        exs, policy=model, ref_path=ref_path, model_cfg=cfg.model, live=live, pad_id=tokenizer.pad_token_id,
        autocast=engine.autocast))
    out = sampled_eval(model, tokenizer, n_prompts=cfg.task_eval_prompts, n_samples=cfg.task_eval_samples,
                       seed=cfg.train.seed, ref_logps_fn=ref_fn, pad_id=tokenizer.pad_token_id,
                       autocast=engine.autocast)
    if same:
        out["kl"] = 0.0
    return out


# ----------------------------------------------------------------------------- command


def run(cfg: DPOConfig) -> dict:
    from posttrain.algorithms import common
    from posttrain.algorithms.pairs import (
        batch_records,
        count_records,
        encode_pair,
        truncation_counts,
        micro_batches_of,
    )
    from posttrain.algorithms.reference import LiveReference
    from posttrain.data.formats import load_train_eval
    from posttrain.data.batching import StepSampler, shard
    from posttrain.engines.train import (
        MetricsLogger,
        Progress,
        TrainEngine,
        make_run_dir,
    )

    # ---- data first: bad rows stop the run before any model loads
    train_rows, eval_rows = load_train_eval(cfg.data, "preference", eval_holdout=cfg.eval_holdout)
    ties = sum(bool(r.get("tie")) for r in train_rows)
    train_rows = [r for r in train_rows if not r.get("tie")]
    eval_rows = [r for r in eval_rows if not r.get("tie")]
    if ties:
        print(f"dpo: {ties} tie record(s) carry no preference direction and are not trained (reported as "
              f"ties_skipped)")
    run_dir = make_run_dir(cfg.train, "dpo", cfg)
    tokenizer = common.load_tokenizer(cfg.model)
    pad = tokenizer.pad_token_id
    train_enc = [encode_pair(tokenizer, r, cfg.data.max_length) for r in train_rows]
    eval_enc = [encode_pair(tokenizer, r, cfg.data.max_length) for r in eval_rows]
    reference = resolve_reference(cfg.reference, cfg.loss)
    ref_path = cfg.ref_model or cfg.model.name_or_path
    train_cfg_autocast = TrainEngineAutocast(cfg.train)

    # ---- reference pass before the policy is loaded (full fine-tuning holds one model at a time)
    tables, ref_info = {"train": None, "eval": None}, {"cache": "none"}
    if reference == "precompute" and not cfg.lora.enabled:
        tables, _, ref_info = precompute_tables({"train": train_enc, "eval": eval_enc}, ref_path=ref_path,
                                                model_cfg=cfg.model, policy=None, cache_dir=cfg.ref_cache_dir,
                                                pad_id=pad, autocast=train_cfg_autocast)
    model = common.load_policy(cfg.model, cfg.lora)
    if reference == "precompute" and cfg.lora.enabled:
        tables, _, ref_info = precompute_tables({"train": train_enc, "eval": eval_enc}, ref_path=ref_path,
                                                model_cfg=cfg.model, policy=model, cache_dir=cfg.ref_cache_dir,
                                                pad_id=pad, autocast=train_cfg_autocast)
    live = LiveReference(model, cfg.model, ref_path) if reference == "live" else None

    sampler = StepSampler(len(train_enc), cfg.train.batch_size, cfg.train.seed)
    total = cfg.train.max_steps or max(1, int(cfg.train.epochs * sampler.steps_per_epoch))
    engine = TrainEngine(model, cfg.train, total, run_dir)
    logger = MetricsLogger(run_dir, enabled=engine.is_main)
    if engine.maybe_resume() is not None:
        logger.truncate_after(engine.step_count)
    loss_fn = make_loss_fn(cfg.loss, cfg.beta, cfg.loss_args, live, cfg.nll_weight)
    kw = dict(shared_prompt=cfg.shared_prompt, packing=cfg.packing, pad_id=pad)

    def micro_batches(step: int) -> list[dict]:
        parts = shard(sampler.batch(step), engine.rank, engine.world_size, cfg.train.micro_batch_size)
        return [attach_reference(batch_records([train_enc[i] for i in p], **kw), tables["train"], p)
                for p in parts]

    eval_batches = attach_reference_in_order(micro_batches_of(eval_enc, cfg.train.micro_batch_size, **kw),
                                             tables["eval"])

    def evaluate(initial: bool = False) -> dict:
        out = pair_eval(engine.unwrapped, eval_batches, loss_fn, engine.autocast)
        if cfg.task_eval and cfg.data.train.startswith("builtin:"):
            out.update(task_metrics(cfg, engine, tokenizer, live, ref_path, initial))
        return out

    # ---- loop
    progress = Progress(total, cfg.loss, cfg.train.progress)
    clock = common.Throughput()
    summary: dict = {**truncation_counts(train_enc), "loss": cfg.loss, "beta": cfg.beta, "reference": reference, "reference_cache": ref_info,
                     "train_pairs": len(train_enc), "eval_pairs": len(eval_enc), "ties_skipped": ties,
                     "world_size": engine.world_size, "total_steps": total}
    if engine.step_count == 0 and engine.is_main:
        summary["initial"] = evaluate(initial=True)
        logger.log(0, {f"eval/{k}": v for k, v in summary["initial"].items()})
    while engine.step_count < total:
        batches = micro_batches(engine.step_count)
        metrics = engine.step(batches, loss_fn, count_records)
        clock.add(sum(int(b["n_records"]) for b in batches) * engine.world_size)
        step = engine.step_count
        if step % cfg.train.log_every == 0 or step == total:
            row = {f"train/{k}": v for k, v in metrics.items()}
            row["pairs_per_s"] = clock.rate()
            logger.log(step, row)
            progress.update(step, f"loss {row['train/loss']:.3f} acc {row.get('train/rewards/accuracy', 0):.2f}")
        common.between_steps(engine, cfg.train, step, total, evaluate, logger, {"data_step": step})
    progress.close()
    summary["pairs_per_s"] = clock.rate()
    return common.finish(engine, logger, run_dir, summary, evaluate, engine.step_count,
                         save=lambda: common.save_final(engine, tokenizer, run_dir, cfg.lora))


class TrainEngineAutocast:
    """The autocast context the engine will use, available before the engine exists (the reference
    pass runs before the policy is loaded)."""

    def __init__(self, train: TrainConfig):
        self.mp = train.mixed_precision

    def __call__(self):
        from contextlib import nullcontext

        if self.mp == "no":
            return nullcontext()
        dtype = torch.bfloat16 if self.mp == "bf16" else torch.float16
        return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=dtype)
