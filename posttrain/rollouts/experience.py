"""Experience for online RL, shared by GRPO / Dr.GRPO / DAPO / GSPO / CISPO, RLOO, REINFORCE and PPO.

One step of experience, top to bottom (:meth:`ExperienceMaker.make`):

1. a batch of prompts (a pure function of ``(seed, step)``, so resume replays nothing);
2. ``group_size`` rollouts per prompt from the rollout engine (token ids in, token ids + log-probs out);
3. rewards: every reward function scores the decoded completions; ``None`` means "does not apply"
   (the weighted sum runs over the functions that apply; a sample no function applies to is left out
   of the loss); truncated responses are scored, penalised or masked (``shaping.truncated``), and the
   DAPO soft overlong penalty can be added;
4. the trainer recomputes log-probs of the sampled tokens in one packed, no-grad forward per model:
   the policy (π_old, only when a batch gets more than one optimizer step), the reference (for KL)
   and the value model (PPO). The mean |rollout log-prob − trainer log-prob| is logged
   (``logprob_gap``): engines in another dtype, vLLM kernels or top-p sampling show up there;
5. the algorithm turns scores into advantages (a function picked once from a registry).

:func:`minibatches` then walks the batch for several epochs in shuffled minibatches; the loss sees
importance ratios π_θ/π_old against the stored π_old. Everything per token is kept *completion
aligned*, ``[N, T]`` with ``T`` the longest completion, so the pure loss functions (which take
``[B, T]`` tensors and a mask) apply unchanged; the forward itself runs on packed rows
(:func:`token_forward`), and the language-model head is applied only at completion positions.
"""

from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Callable

import torch

from posttrain.advantages import overlong_penalty, zero_variance_groups
from posttrain.data.batching import StepSampler
from posttrain.data.chat import encode_prompt
from posttrain.data.formats import load_records
from posttrain.data.records import ReadOptions
from posttrain.engines.ray_rewards import score_components
from posttrain.engines.rollout import HFRolloutEngine, SamplingParams, engine_dtype
from posttrain.errors import ConfigError, DataError
from posttrain.losses.policy import truncated_is_weight
from posttrain.masked import masked_mean
from posttrain.models.forward import collate_shared, lockstep, to_layout
from posttrain.rewards import outcome_metrics, reward_name
from posttrain.rewards.combine import combine_rewards
from posttrain.rollouts.config import BatchPlan, RolloutConfig, ShapingConfig
from posttrain.rollouts.episodes import episode_batch, episode_metrics, load_environment, run_episodes
from posttrain.rollouts.metrics import group_std_zero_frac, rollout_metrics


@dataclass
class Experience:
    """One RL step's rollouts with everything the loss needs. Per-token tensors are [N, T]."""

    prompts: list  # per rollout (repeated per group)
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    finish: list[str]
    group_size: int
    scores: torch.Tensor  # [N] shaped total reward (before KL)
    valid: torch.Tensor  # [N] bool: enters the loss
    components: dict[str, torch.Tensor]  # raw reward per function, NaN where it did not apply
    mask: torch.Tensor  # [N, T] completion tokens of valid rollouts
    rollout_logp: torch.Tensor  # [N, T] from the rollout engine
    old_logp: torch.Tensor | None = None  # [N, T] trainer log-probs before the update (π_old)
    ref_logp: torch.Tensor | None = None  # [N, T]
    values: torch.Tensor | None = None  # [N, T] PPO critic
    advantages: torch.Tensor | None = None  # [N, T]
    returns: torch.Tensor | None = None  # [N, T] PPO value targets
    metrics: dict[str, float] = field(default_factory=dict)
    token_rewards: torch.Tensor | None = None  # [N, T] multi-turn: each turn's reward on its last sampled token

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(c) for c in self.completion_ids])

    def select(self, idx: list[int]) -> "Experience":
        """The rollouts ``idx`` (e.g. the groups that survive dynamic sampling)."""
        t = torch.tensor(idx, dtype=torch.long)

        def pick(x):
            return None if x is None else x[t]

        return Experience([self.prompts[i] for i in idx], [self.prompt_ids[i] for i in idx],
                          [self.completion_ids[i] for i in idx], [self.texts[i] for i in idx],
                          [self.finish[i] for i in idx], self.group_size, self.scores[t], self.valid[t],
                          {k: v[t] for k, v in self.components.items()}, self.mask[t], self.rollout_logp[t],
                          pick(self.old_logp), pick(self.ref_logp), pick(self.values), pick(self.advantages),
                          pick(self.returns), dict(self.metrics), pick(self.token_rewards))

    @staticmethod
    def concat(parts: list["Experience"]) -> "Experience":
        if len(parts) == 1:
            return parts[0]
        T = max(p.mask.shape[1] for p in parts)

        def cat(xs):
            if any(x is None for x in xs):
                return None
            return torch.cat([torch.nn.functional.pad(x, (0, T - x.shape[1])) if x.dim() == 2 else x for x in xs])

        first = parts[0]
        return Experience(sum((p.prompts for p in parts), []), sum((p.prompt_ids for p in parts), []),
                          sum((p.completion_ids for p in parts), []), sum((p.texts for p in parts), []),
                          sum((p.finish for p in parts), []), first.group_size,
                          torch.cat([p.scores for p in parts]), torch.cat([p.valid for p in parts]),
                          {k: torch.cat([p.components[k] for p in parts]) for k in first.components},
                          cat([p.mask for p in parts]), cat([p.rollout_logp for p in parts]),
                          cat([p.old_logp for p in parts]), cat([p.ref_logp for p in parts]),
                          cat([p.values for p in parts]), cat([p.advantages for p in parts]),
                          cat([p.returns for p in parts]), dict(first.metrics), cat([p.token_rewards for p in parts]))

    def micro_batch(self, idx: list[int]) -> dict:
        """A packed training micro-batch of rollouts ``idx`` (a prompt shared by consecutive rollouts
        computed once, :func:`collate_shared`) plus their [n, T] per-token tensors."""
        batch = collate_shared([self.prompt_ids[i] for i in idx], [self.completion_ids[i] for i in idx])
        t = torch.tensor(idx, dtype=torch.long)
        for name in ("mask", "rollout_logp", "old_logp", "ref_logp", "values", "advantages", "returns"):
            x = getattr(self, name)
            if x is not None:
                batch[name] = x[t]
        batch["scores"] = self.scores[t]
        return batch


class ExperienceMaker:
    """Makes :class:`Experience` for one RL step. The models are passed in: ``policy`` (the trained
    causal LM the rollout engine samples from), ``ref`` (a callable batch -> per-token log-probs, or
    None), ``critic`` (batch -> per-token values, or None)."""

    def __init__(self, *, tokenizer, engine, rollout: RolloutConfig, shaping: ShapingConfig,
                 rewards: list[tuple[str, Callable, float]], records: list[dict], seed: int,
                 plan: BatchPlan, rank: int = 0, world: int = 1, max_staleness: int = 0,
                 last_step: int | None = None, score_raw: Callable | None = None):
        self.tokenizer, self.engine, self.rollout, self.shaping = tokenizer, engine, rollout, shaping
        self.rewards, self.records, self.seed, self.plan = rewards, records, seed, plan
        self.score_raw = score_raw or functools.partial(score_components, rewards)  # or Ray reward workers
        self.rank, self.world = rank, world
        # asynchronous RL: steps t+1..t+k are submitted while step t trains (engines with submit/collect)
        self.max_staleness, self.last_step = max_staleness, last_step
        self.pending: dict[int, object] = {}
        self.env = load_environment(rollout.environment) if rollout.environment else None
        self.prompt_ids = []
        for i, r in enumerate(records):
            ids = encode_prompt(tokenizer, r["prompt"])
            if len(ids) > rollout.max_prompt_tokens:
                raise DataError(f"prompt {i + 1} has {len(ids)} tokens, more than rollout.max_prompt_tokens="
                                f"{rollout.max_prompt_tokens}", where=f"{rollout.prompts}:{i + 1}",
                                fix="raise rollout.max_prompt_tokens or shorten the prompt")
            self.prompt_ids.append(ids)

        self.sampler = StepSampler(len(records), rollout.prompts_per_step, seed)

    # ---- which prompts
    def prompt_indices(self, step: int, round_: int = 0) -> list[int]:
        """This process's prompts for RL step ``step`` (round > 0: extra draws for dynamic sampling)."""
        if round_ == 0:
            idx = self.sampler.batch(step)
        else:
            rng = random.Random((self.seed * 1_000_003 + step) * 101 + round_)
            idx = rng.sample(range(len(self.records)), self.rollout.prompts_per_step)
        per = len(idx) // self.world
        return idx[self.rank * per:(self.rank + 1) * per]

    # ---- steps 2-3: sample and score
    def request(self, step: int, round_: int = 0):
        """(prompt indices, their token ids, sampling params) of this process's share of step ``step``.
        Each prompt's seed is a function of (seed, step, round, prompt), never of the process or worker
        that samples it."""
        ro = self.rollout
        idx = self.prompt_indices(step, round_)
        base = (self.seed * 1_000_003 + step) * 131 + round_ * 7
        params = SamplingParams(max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
                                top_k=ro.top_k, stop_token_ids=[self.tokenizer.eos_token_id],
                                stop_strings=list(ro.stop_strings), n=ro.group_size,
                                seeds=[(base * 1_000_033 + i) % 2**62 for i in idx])
        return idx, [self.prompt_ids[i] for i in idx], params

    def prefetch(self, step: int) -> None:
        """Asynchronous RL: submit steps ``step+1 .. step+k`` (k = max_staleness) not yet submitted, to be
        sampled with the weights the workers hold now."""
        if not self.max_staleness or not hasattr(self.engine, "submit") or self.env is not None:
            return
        last = step + self.max_staleness if self.last_step is None else min(step + self.max_staleness,
                                                                             self.last_step - 1)
        for s in range(step + 1, last + 1):
            if s not in self.pending:
                _, ids, params = self.request(s, 0)
                self.pending[s] = self.engine.submit(ids, params)

    def _rollouts(self, step: int, round_: int, ids, params) -> tuple[list, dict]:
        """The step's rollouts — submitted earlier (asynchronous RL) or generated now — and the staleness
        metrics: a rollout more than max_staleness versions older than the current policy is never used
        (that batch is generated again, and counted)."""
        pending = self.pending.pop(step, None) if round_ == 0 else None
        outs = self.engine.collect(pending) if pending is not None else self.engine.generate(ids, params)
        m = {}
        versions = [o.version for o in outs if o.version is not None]
        if versions:
            # several learner ranks decide together (a regeneration is a collective): on the oldest
            # version of the whole request, which the group engine reports
            oldest = getattr(self.engine, "oldest_version", None)
            m["async/regenerated"] = 0.0
            if self.engine.version - (min(versions) if oldest is None else oldest) > self.max_staleness:
                outs = self.engine.generate(ids, params)
                m["async/regenerated"] = float(len(outs))
            lag = [self.engine.version - o.version for o in outs]
            m["async/staleness_mean"], m["async/staleness_max"] = sum(lag) / len(lag), float(max(lag))
            m["async/restarts"] = float(getattr(self.engine, "restarts", 0))
        return outs, m

    def sample(self, step: int, round_: int = 0) -> Experience:
        idx, ids, params = self.request(step, round_)
        G = self.rollout.group_size
        t0 = time.perf_counter()
        if self.env is not None:  # multi-turn: G episodes per prompt, the environment's reward
            recs = [self.records[i] for i in idx for _ in range(G)]
            eps = run_episodes(self.engine, self.tokenizer, [self.env() for _ in recs], recs, replace(params, n=1),
                               max_turns=self.rollout.max_turns, max_tokens=self.rollout.max_episode_tokens,
                               seed=params.seeds[0] if params.seeds else 0)
            b = episode_batch(eps)
            return Experience([r["prompt"] for r in recs], b["prompt_ids"], b["completion_ids"], b["texts"],
                              b["finish"], G, b["scores"], torch.ones(len(eps), dtype=torch.bool),
                              {"environment": b["scores"]}, b["mask"], b["rollout_logp"],
                              metrics={"gen_s": time.perf_counter() - t0, "reward_s": 0.0, **episode_metrics(eps)},
                              token_rewards=b["token_rewards"])
        outs, lag_metrics = self._rollouts(step, round_, ids, params)
        t1 = time.perf_counter()
        recs = [self.records[i] for i in idx for _ in range(G)]
        texts = [self.tokenizer.decode(o.completion_ids, skip_special_tokens=True) for o in outs]
        finish = [o.finish_reason for o in outs]
        scores, valid, comps = self.score(recs, texts, [len(o.completion_ids) for o in outs], finish, step)
        T = max(len(o.completion_ids) for o in outs)
        mask = torch.zeros(len(outs), T)
        rlp = torch.zeros(len(outs), T)
        for i, o in enumerate(outs):
            mask[i, :len(o.completion_ids)] = 1.0
            rlp[i, :len(o.logprobs)] = torch.tensor(o.logprobs)
        mask = mask * valid[:, None].float()
        timing = {"gen_s": t1 - t0, "reward_s": time.perf_counter() - t1, **lag_metrics,
                  **getattr(self.score_raw, "metrics", {})}  # reward workers: async/reward_restarts
        return Experience([r["prompt"] for r in recs], [o.prompt_ids for o in outs],
                          [o.completion_ids for o in outs], texts, finish, G, scores, valid, comps, mask, rlp,
                          metrics=timing)

    def score(self, recs: list[dict], texts: list[str], lengths: list[int], finish: list[str], step=None):
        """(shaped scores [N], valid [N], raw components {name: [N] with NaN}) for one batch."""
        prompts = [r["prompt"] for r in recs]
        columns = {k: [r.get(k) for r in recs] for k in recs[0] if k != "prompt"} if recs else {}
        raw = self.score_raw(prompts, texts, columns, step)
        weights = {name: w for name, _, w in self.rewards}
        truncated = torch.tensor([f == "length" for f in finish])
        if self.shaping.truncated == "penalize":  # only finished responses are scored
            raw = {k: [None if t else v for v, t in zip(vals, truncated.tolist())] for k, vals in raw.items()}
        total, valid = combine_rewards(raw, weights)
        if self.shaping.truncated == "penalize":
            total = torch.where(truncated, torch.tensor(self.shaping.truncation_penalty), total)
            valid = valid | truncated
        elif self.shaping.truncated == "mask":
            valid = valid & ~truncated
        if self.shaping.overlong_buffer:
            pen = self.shaping.overlong_penalty * overlong_penalty(
                torch.tensor(lengths, dtype=torch.float32), self.rollout.max_new_tokens, self.shaping.overlong_buffer)
            raw["overlong"] = pen.tolist()
            total = total + pen
        if self.shaping.clip is not None:
            total = total.clamp(-self.shaping.clip, self.shaping.clip)
        comps = {k: torch.tensor([float("nan") if v is None else float(v) for v in vals]) for k, vals in raw.items()}
        return total, valid, comps

    # ---- step 4: trainer forwards
    @torch.no_grad()
    def forward_all(self, exp: Experience, fn: Callable[[dict], torch.Tensor], micro: int) -> torch.Tensor:
        """Apply ``fn(micro_batch) -> flat per-token values [K]`` over the batch in packed chunks -> [N, T]."""
        N, T = exp.mask.shape
        lockstep(fn, N)  # a sharded frozen model: as many forwards on every rank, or an error (never a hang)
        out = torch.zeros(N, T)
        for s in range(0, N, micro):
            idx = list(range(s, min(N, s + micro)))
            mb = exp.micro_batch(idx)
            flat, seq, j = fn(mb)
            out[idx[0]:idx[-1] + 1] = to_layout(flat.float().cpu(), seq.cpu(), j.cpu(), len(idx), T)
        return out

    def make(self, step: int, *, policy=None, ref=None, critic=None, need_old: bool,
             dynamic_sampling: bool = False, max_rounds: int = 1, micro: int = 64) -> Experience:
        """Steps 1-4 for RL step ``step``. ``policy``/``ref``/``critic`` are callables
        ``micro_batch -> (flat values, seq, j)``; π_old is computed only when ``need_old``."""
        parts, kept_groups, seen_groups, zero_frac = [], 0, 0, None
        G, want = self.rollout.group_size, self.plan.prompts_per_process
        for round_ in range(max_rounds if dynamic_sampling else 1):
            exp = self.sample(step, round_)
            if round_ == 0:
                self.prefetch(step)  # the workers sample the next steps while this one trains
            groups = len(exp) // G
            seen_groups += groups
            if zero_frac is None:
                zero_frac = float(group_std_zero_frac(exp.scores, G, exp.valid))
            if dynamic_sampling:  # DAPO: keep groups whose valid rewards differ
                keep = (~zero_variance_groups(exp.scores, G, exp.valid)).nonzero().flatten().tolist()
                keep = keep[:want - kept_groups]
                exp = exp.select([k * G + i for k in keep for i in range(G)])
                kept_groups += len(keep)
            else:
                kept_groups += groups
            parts.append(exp)
            if kept_groups >= want:
                break
        timing = {k: sum(p.metrics[k] for p in parts) for k in ("gen_s", "reward_s")}
        timing.update({k: v for k, v in parts[0].metrics.items() if k.startswith("async/")})
        exp = Experience.concat([p for p in parts if len(p)]) if any(len(p) for p in parts) else parts[0]
        t1 = time.perf_counter()
        if len(exp):
            if need_old and policy is not None:
                exp.old_logp = self.forward_all(exp, policy, micro)
            if ref is not None:
                exp.ref_logp = self.forward_all(exp, ref, micro)
            if critic is not None:
                exp.values = self.forward_all(exp, critic, micro)
        # metrics over everything sampled in round 0 is what the policy does; report the kept batch
        m = exp.metrics
        m.update(rollout_metrics(exp))
        m["reward/std_zero_frac"] = zero_frac if zero_frac is not None else float("nan")
        m.update(timing)
        m["forward_s"] = time.perf_counter() - t1
        remote = getattr(self.score_raw, "last_stats", None)  # reward workers count the outcomes there
        for name, fn, _ in self.rewards:
            m.update(outcome_metrics(fn if remote is None else SimpleNamespace(name=reward_name(fn),
                                                                                 last_stats=remote.get(name))))
        if dynamic_sampling:
            m["dynamic/kept_groups"] = float(kept_groups)
            m["dynamic/sampled_groups"] = float(seen_groups)
        if exp.old_logp is not None and len(exp) and exp.mask.any():
            m["logprob_gap"] = float(masked_mean((exp.old_logp - exp.rollout_logp).abs(), exp.mask))
        return exp


def fill_invalid(scores: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """Rewards of samples left out of the loss are replaced by their group's mean valid reward, so they
    do not move the group baseline (their advantages are never used: their tokens are masked)."""
    if bool(valid.all()) or scores.numel() % group_size:
        return scores
    # fp64: the mean of equal valid rewards is then exactly that reward, so the group stays constant
    g, v = scores.view(-1, group_size).double(), valid.view(-1, group_size).double()
    mean = (g * v).sum(1, keepdim=True) / v.sum(1, keepdim=True).clamp(min=1)
    return torch.where(v.bool(), g, mean.expand_as(g)).reshape(-1).to(scores.dtype)


def minibatches(n: int, n_minibatches: int, epochs: int, micro: int, seed: int, group_size: int = 1):
    """Yield (epoch, list of micro-batch index lists) for each optimizer step: every epoch a fresh
    seeded shuffle of the ``n`` rollouts, cut into ``n_minibatches`` near-equal minibatches. Groups of
    ``group_size`` consecutive rollouts are shuffled as units (their shared prompt is then computed
    once per micro-batch; the advantages are already fixed, so the order is all that changes)."""
    rng = random.Random(seed)
    G = group_size if group_size > 1 and n % group_size == 0 else 1
    for epoch in range(epochs):
        groups = list(range(n // G))
        if epochs * n_minibatches > 1:
            rng.shuffle(groups)
        order = [g * G + k for g in groups for k in range(G)]
        bounds = [round(k * n / n_minibatches) for k in range(n_minibatches + 1)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            mb = order[a:b]
            if mb:
                yield epoch, [mb[s:s + micro] for s in range(0, len(mb), micro)]


def load_prompt_records(cfg: RolloutConfig) -> list[dict]:
    return load_records(cfg.prompts, "prompt", columns=cfg.columns, split=cfg.split, max_rows=cfg.max_prompts,
                        options=ReadOptions(format=cfg.format, prefix="rollout.", keys=("format",)))


def load_eval_records(cfg: RolloutConfig) -> list[dict]:
    opts = ReadOptions(format=cfg.format, prefix="rollout.", keys=("format",))
    return load_records(cfg.eval_prompts, "prompt", columns=cfg.columns, options=opts) if cfg.eval_prompts else []


def make_engine(model, tokenizer, cfg: RolloutConfig, model_path: str | None = None, ray=None):
    """The rollout engine ``rollout.engine`` names, chosen here once: local (samples from ``model`` itself), vLLM
    (loads ``model_path``) or servers (sent ``model``'s weights at once), the last two updated by ``update_weights``;
    with ``ray`` (a RayConfig) each Ray rollout worker builds its own (worker i of N: servers i, i+N, ...)."""
    if ray is not None:
        from posttrain.engines.ray_engine import RayRolloutEngine  # optional package

        n, kw = ray.rollout_workers, dict(tokenizer=tokenizer, model_path=model_path)
        makers = [functools.partial(make_engine, cfg=replace(cfg, servers=cfg.servers[i::n]), **kw) for i in range(n)]
        return RayRolloutEngine(model, makers, ray, own_weights=cfg.engine != "local")
    if cfg.engine == "server":
        from posttrain.engines.server_engine import ServerRolloutEngine

        return ServerRolloutEngine(cfg.servers, model, timeout_s=cfg.server_timeout_s, retries=cfg.server_retries,
                                   weights_dir=cfg.server_weights_dir)
    if cfg.engine == "vllm":
        if not torch.cuda.is_available():
            raise ConfigError("rollout.engine=vllm needs a CUDA GPU, and none is visible", where="rollout.engine",
                              fix="use rollout.engine=local on this machine")
        from posttrain.engines.vllm_engine import VLLMRolloutEngine  # optional package, GPU only

        return VLLMRolloutEngine(model_path, tokenizer, sleep=cfg.vllm_sleep, **cfg.vllm_kwargs)
    return local_engine(model, tokenizer, cfg)


def local_engine(model, tokenizer, cfg: RolloutConfig) -> HFRolloutEngine:
    """The in-process engine around ``model`` (also what each Ray rollout worker holds)."""
    return HFRolloutEngine(model, pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer,
                           compile=cfg.compile, dtype=engine_dtype(cfg.engine_dtype, model),
                           max_batch_size=max(128, cfg.group_size))


def rollout_is_weight(cfg: RolloutConfig, old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor):
    """(per-token weight or None, metrics) for ``rollout.correction``."""
    if cfg.correction == "none":
        return None, {}
    return truncated_is_weight(old_logp, rollout_logp, mask, cfg.tis_cap)
