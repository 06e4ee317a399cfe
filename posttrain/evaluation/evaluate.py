"""``posttrain eval``: compare policies on held-out prompts.

For every policy, ``samples`` responses per held-out prompt are drawn at ``temperature`` (the
distribution RLHF optimises) and measured:

- **gold reward / accuracy** (built-in task) and the proxy reward-model score when one is given;
- **win rate against the baseline** policy, judged by the gold annotator, the reward model, or an LLM
  judge in both orders; ties count ½; 95% bootstrap interval over prompts; length-controlled win rate;
- **paired bootstrap** of the gold-reward difference to the baseline on the same prompts;
- **KL to the reference**: mean over samples y ~ π of log π(y|x) − log π_ref(y|x) (sequence level);
- **response length** statistics;
- **over-optimisation**: gold and proxy reward against √KL along training (checkpoints of the runs in
  ``overopt_runs``) and for best-of-N (N = 1…64) on the same axes, with BoN's analytic
  KL = log N − (N−1)/N (Gao et al. 2023).

Writes ``eval.json`` (and ``summary.json``) in ``output_dir`` and prints a summary table of the key
results with the paths it wrote (:func:`format_summary`); ``posttrain report OUTPUT_DIR`` turns them
into an HTML/Markdown report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from posttrain.config import ModelConfig, opt
from posttrain.data.formats import load_records
from posttrain.data.records import ReadOptions
from posttrain.engines.loop import write_summary
from posttrain.engines.rollout import sample_rollouts
from posttrain.engines.train import seed_everything
from posttrain.errors import ConfigError
from posttrain.evaluation import stats
from posttrain.evaluation.report import paired_p, text_table
from posttrain.judges.backends import backend_from_spec
from posttrain.judges.pairwise import Pair, judge_pairs
from posttrain.models.forward import completion_logps
from posttrain.models.loading import load_policy, tokenizer_for
from posttrain.rewards.reward_model import RewardModelScorer
from posttrain.tasks import builtin


@dataclass
class EvalConfig:
    policies: dict[str, str] = opt({}, "Policies to evaluate: name -> model path.")
    baseline: str = opt("", "Name (in policies) of the baseline for win rates and paired tests.")
    reference: str | None = opt(None, "Reference model for KL (default: the baseline's path).")
    prompts: str = opt("builtin:eval_prompts", "Held-out prompts.")
    n_prompts: int = opt(64, "How many prompts.")
    samples: int = opt(4, "Samples per prompt and policy.")
    temperature: float = opt(1.0, "Sampling temperature.")
    max_new_tokens: int = opt(24, "Longest response.")
    judge: str = opt("gold", "Win-rate judge: 'gold' (the built-in task's annotator), 'rm' (reward_model), "
                     "or 'llm:<backend spec>' (both orders).")
    reward_model: str | None = opt(None, "Proxy reward model (path) scored for every policy and for "
                                   "the over-optimisation view.")
    overopt_runs: dict[str, str] = opt({}, "name -> run directory whose checkpoints trace gold/proxy "
                                      "reward against sqrt(KL) along training.")
    best_of_n: list[int] = opt([1, 2, 4, 8, 16, 32, 64], "N values for the best-of-N curve (needs "
                               "reward_model); 64 samples per prompt are drawn from the reference.",
                               "Gao et al. 2023")
    bon_prompts: int = opt(32, "Prompts for the best-of-N curve.")
    bootstrap: int = opt(2000, "Bootstrap resamples.", "Chatbot Arena uses 100+; percentile bootstrap (Efron & Tibshirani 1993)")
    seed: int = opt(0, "Sampling and bootstrap seed.")
    output_dir: str = opt("runs/eval", "Where eval.json goes.")

    def validate(self) -> None:
        if not self.policies:
            raise ConfigError("no policies to evaluate", where="policies",
                              fix="policies={sft: runs/sft/final, dpo: runs/dpo/final}")
        if self.baseline and self.baseline not in self.policies:
            raise ConfigError(f"baseline '{self.baseline}' is not one of the policies {list(self.policies)}",
                              where="baseline")
        if self.judge == "rm" and not self.reward_model:
            raise ConfigError("judge=rm needs reward_model", where="judge")
        if not (self.judge in ("gold", "rm") or self.judge.startswith("llm:")):
            raise ConfigError(f"unknown judge '{self.judge}'", where="judge", fix="gold, rm, or llm:<spec>")


class _Models:
    """Loads each model once per evaluation."""

    def __init__(self):
        self._cache = {}

    def policy(self, path: str):
        if path not in self._cache:
            self._cache[path] = load_policy(ModelConfig(name_or_path=path))
        return self._cache[path]


def _sample(models, tokenizer, path, prompts, n, cfg, seed):
    model = models.policy(path)
    rolls = sample_rollouts(model, tokenizer, prompts, n, cfg.max_new_tokens, cfg.temperature, seed)
    texts = [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in rolls]
    return rolls, texts


def _kl(models, path, ref_path, rolls) -> tuple[float, float]:
    """Mean and standard error of log π(y) − log π_ref(y) over samples y ~ π."""
    p = [r.prompt_ids for r in rolls]
    c = [r.completion_ids for r in rolls]
    diff = (completion_logps(models.policy(path), p, c) - completion_logps(models.policy(ref_path), p, c)).numpy()
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0


def _gold(prompts_rep, texts):
    return np.array([builtin.gold_reward(p, t) for p, t in zip(prompts_rep, texts)])


def _per_prompt(x: np.ndarray, n: int) -> np.ndarray:
    return x.reshape(-1, n).mean(1)


def run(cfg: EvalConfig) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    rows = load_records(cfg.prompts, "prompt", options=ReadOptions(prefix=None))[: cfg.n_prompts]
    prompts = [r["prompt"] for r in rows]
    rep = [p for p in prompts for _ in range(cfg.samples)]
    is_task = cfg.prompts.startswith("builtin:")
    base_name = cfg.baseline or next(iter(cfg.policies))
    ref_path = cfg.reference or cfg.policies[base_name]
    tokenizer = tokenizer_for(ModelConfig(name_or_path=ref_path))
    models = _Models()
    scorer = None
    if cfg.reward_model:
        scorer = RewardModelScorer(cfg.reward_model, where="reward_model")

    results: dict = {"policies": {}, "baseline": base_name, "judge": cfg.judge, "n_prompts": len(prompts),
                     "samples": cfg.samples, "bootstrap": cfg.bootstrap}
    texts_by: dict[str, list[str]] = {}
    gold_by: dict[str, np.ndarray] = {}  # per-sample scores, computed once per policy
    proxy_by: dict[str, np.ndarray] = {}
    for name, path in cfg.policies.items():
        rolls, texts = _sample(models, tokenizer, path, prompts, cfg.samples, cfg, cfg.seed + 1)
        texts_by[name] = texts
        r: dict = {"path": path}
        lengths = np.array([len(t) for t in texts])
        r["length_mean"], r["length_std"] = float(lengths.mean()), float(lengths.std())
        r["truncated_frac"] = float(np.mean([x.finish_reason == "length" for x in rolls]))
        r["kl"], r["kl_se"] = _kl(models, path, ref_path, rolls) if path != ref_path else (0.0, 0.0)
        if is_task or cfg.judge == "gold":
            gold_by[name] = _gold(rep, texts)
        if is_task:
            gold = gold_by[name]
            r["gold_reward"] = float(gold.mean())
            r["gold_ci"] = list(stats.bootstrap_ci(_per_prompt(gold, cfg.samples), n_boot=cfg.bootstrap, seed=cfg.seed)[1:])
            r["accuracy"] = float(np.mean([builtin.is_correct(p, t) for p, t in zip(rep, texts)]))
        if scorer is not None:
            proxy_by[name] = np.asarray(scorer.score(rep, texts), dtype=float)
            r["proxy_reward"] = float(proxy_by[name].mean())
        r["samples"] = [{"prompt": p, "response": t} for p, t in list(zip(rep, texts))[:: cfg.samples][:6]]
        results["policies"][name] = r

    # ---- win rates and paired tests against the baseline
    base_texts = texts_by[base_name]
    for name, texts in texts_by.items():
        if name == base_name:
            continue
        cached = {"gold": gold_by, "rm": proxy_by}.get(cfg.judge)
        outcomes = _judge(cfg, rep, texts, base_texts, *((cached[name], cached[base_name]) if cached else ()))
        per_prompt = _per_prompt(np.asarray(outcomes, dtype=float), cfg.samples)
        wr = stats.win_rate(outcomes)
        point, lo, hi = stats.bootstrap_ci(per_prompt, n_boot=cfg.bootstrap, seed=cfg.seed)
        lens = (np.array([len(t) for t in texts]), np.array([len(t) for t in base_texts]))
        lc = stats.length_controlled_win_rate(outcomes, *lens)
        entry = {"win_rate": wr["win_rate"], "ci": [lo, hi], "wins": wr["wins"], "ties": wr["ties"],
                 "losses": wr["losses"], "lc_win_rate": lc["lc_win_rate"]}
        if is_task:
            a, b = (_per_prompt(gold_by[n], cfg.samples) for n in (name, base_name))
            entry["gold_paired"] = stats.paired_bootstrap(a, b, n_boot=cfg.bootstrap, seed=cfg.seed)
        if scorer is not None:  # the reward model's view: what PPO-style training optimises
            a, b = (_per_prompt(proxy_by[n], cfg.samples) for n in (name, base_name))
            entry["proxy_paired"] = stats.paired_bootstrap(a, b, n_boot=cfg.bootstrap, seed=cfg.seed)
        results["policies"][name]["vs_baseline"] = entry

    # ---- over-optimisation: along training, and best-of-N
    if cfg.overopt_runs:
        results["overopt"] = {name: _trace_run(cfg, models, tokenizer, Path(d), prompts[:32], ref_path, scorer)
                              for name, d in cfg.overopt_runs.items()}
    if scorer is not None and is_task and cfg.best_of_n:
        results["best_of_n"] = _best_of_n(cfg, models, tokenizer, ref_path, scorer)
    (out / "eval.json").write_text(json.dumps(results, indent=2, default=_json))
    write_summary(out, {k: v for k, v in results.items() if k != "policies"} |
                  {"policies": {n: {k: v for k, v in r.items() if k != "samples"} for n, r in results["policies"].items()}})
    results["run_dir"] = str(out)
    print(format_summary(results, {"eval.json": out / "eval.json", "summary.json": out / "summary.json"}))
    return results


def _ci(point, ci, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return (f + " [" + f + ", " + f + "]").format(point, *ci)


def format_summary(results: dict, files: dict | None = None) -> str:
    """The key results of ``results`` (as :func:`run` returns and eval.json holds) as plain text:
    one row per policy with its gold reward [95% CI], accuracy, proxy (RM) reward, KL ± se, win
    rate vs the baseline [95% CI], and the paired difference to the baseline (gold reward, else the
    RM score) [95% CI] with its one-sided p-value (``< 1/B`` when no bootstrap resample favoured
    the baseline); then ``files`` (label -> path). Columns that no policy has are left out."""
    pols = results.get("policies", {})
    base, b = results.get("baseline"), results.get("bootstrap")
    vs_all = [r["vs_baseline"] for r in pols.values() if "vs_baseline" in r]
    paired = next((k for k in ("gold_paired", "proxy_paired") if any(k in v for v in vs_all)), None)
    what = "gold" if paired == "gold_paired" else "RM score"

    def has(key: str) -> bool:
        return any(key in r for r in pols.values())

    def num(r: dict, key: str) -> str:
        return f"{r[key]:.3f}" if key in r else "-"

    def row(name: str, r: dict) -> dict[str, str]:
        v = r.get("vs_baseline", {})
        kl = r.get("kl", 0.0)
        gold = _ci(r["gold_reward"], r["gold_ci"]) if "gold_ci" in r else num(r, "gold_reward")
        cells = {"policy": name, "gold reward [95% CI]": gold,
                 "accuracy": num(r, "accuracy"), "RM score": num(r, "proxy_reward"),
                 "KL (nats)": "0 (reference)" if kl == 0.0 and not r.get("kl_se") else
                 f"{kl:.3f} ± {r.get('kl_se', float('nan')):.3f}",
                 f"win rate vs {base} [95% CI]": _ci(v["win_rate"], v["ci"]) if v else
                 ("baseline" if name == base else "-")}
        if paired:
            pd = v.get(paired)
            cells[f"{what} diff [95% CI]"] = _ci(pd["diff"], (pd["lo"], pd["hi"]), signed=True) if pd else "-"
            cells["p"] = paired_p(pd, b) or "-"
        return cells

    keep = {"gold reward [95% CI]": has("gold_reward"), "accuracy": has("accuracy"), "RM score": has("proxy_reward"),
            f"win rate vs {base} [95% CI]": bool(vs_all)}
    rows = [row(n, r) for n, r in pols.items()]
    columns = [c for c in (rows[0] if rows else ["policy"]) if keep.get(c, True)]
    lines = [f"posttrain eval: {len(pols)} policies on {results.get('n_prompts')} prompts x "
             f"{results.get('samples')} samples; win rates judged by {results.get('judge')} against {base}",
             "", text_table(columns, [[r[c] for c in columns] for r in rows], indent="  "), "",
             "  95% intervals: percentile bootstrap over prompts" + (f", B = {b} resamples" if b else "")]
    if paired:
        lines.append(f"  p: one-sided paired bootstrap, \"policy > {base}\"; \"< 1/B\": no resample favoured {base}")
    if files:
        w = max(len(k) for k in files) + 1
        run_dir = Path(next(iter(files.values()))).parent
        lines += ["", *(f"  {k + ':':{w}} {v}" for k, v in files.items()),
                  f"  {'report:':{w}} posttrain report {run_dir}  (report.html, report.md)"]
    return "\n".join(lines)


def _json(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))


def _judge(cfg, prompts, texts, base_texts, a=None, b=None) -> list[float]:
    """1 / 0.5 / 0 for each (policy, baseline) response pair. The gold and rm judges compare the
    per-sample scores ``a``, ``b`` (already computed for the policy results); others judge the texts."""
    if cfg.judge not in ("gold", "rm"):
        # both orders; a disagreement is a tie; an unparseable verdict also counts as a tie here
        judged = judge_pairs(backend_from_spec(cfg.judge.split(":", 1)[1]),
                             [Pair(p, x, y) for p, x, y in zip(prompts, texts, base_texts)])
        return [{"a": 1.0, "b": 0.0}.get(j.winner, 0.5) for j in judged]
    return list(np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5)))


def _trace_run(cfg, models, tokenizer, run_dir: Path, prompts, ref_path, scorer) -> list[dict]:
    """Gold and proxy reward against sqrt(KL) at each saved checkpoint of a run."""
    from safetensors.torch import load_file


    points = []
    ckpts = sorted(run_dir.glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]))
    rep = [p for p in prompts for _ in range(cfg.samples)]
    for ck in ckpts:
        files = list(ck.glob("*.safetensors"))
        model = load_policy(ModelConfig(name_or_path=ref_path))
        state = load_file(str(next(f for f in files if f.name.startswith(("model", "policy")))))
        if any(k.startswith("policy.") for k in state):  # PPO checkpoints hold policy + critic
            state = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
        missing = model.load_state_dict(state, strict=False)
        if missing.unexpected_keys:
            continue  # a LoRA or value-head checkpoint this view does not read
        key = f"{ck}"
        models._cache[key] = model
        rolls, texts = _sample(models, tokenizer, key, prompts, cfg.samples, cfg, cfg.seed + 2)
        kl, _ = _kl(models, key, ref_path, rolls)
        pt = {"step": int(ck.name.split("-")[1]), "kl": kl, "sqrt_kl": math.sqrt(max(kl, 0.0)),
              "gold": float(_gold(rep, texts).mean())}
        if scorer is not None:
            pt["proxy"] = float(np.mean(scorer.score(rep, texts)))
        points.append(pt)
        del models._cache[key]
    return points


def _best_of_n(cfg, models, tokenizer, ref_path, scorer) -> list[dict]:
    """Expected gold and proxy reward of the proxy-best of N samples from the reference."""
    m = max(cfg.best_of_n)
    prompts = [p.prompt for p in builtin.heldout_problems(cfg.bon_prompts)]
    _, texts = _sample(models, tokenizer, ref_path, prompts, m, cfg, cfg.seed + 3)
    rep = [p for p in prompts for _ in range(m)]
    proxy = np.array(scorer.score(rep, texts)).reshape(len(prompts), m)
    gold = _gold(rep, texts).reshape(len(prompts), m)
    out = []
    for n in cfg.best_of_n:
        kl = stats.best_of_n_kl(n)
        out.append({"n": n, "kl": kl, "sqrt_kl": math.sqrt(kl),
                    "gold": float(stats.best_of_n_expected(gold, n, select_by=proxy).mean()),
                    "proxy": float(stats.best_of_n_expected(proxy, n).mean())})
    return out
