"""Active selection: which candidate pairs are worth a label. Pure functions (scores in, an order out).

- **rm_uncertainty** (Christiano et al. 2017, §2.2.4: "the variance in the predictions of an ensemble"):
  M reward models r_1..r_M, each trained on a bootstrap resample of the labels so far, give
  p_m = σ(r_m(x, a) − r_m(x, b)); the pair's score is their standard deviation
  u = sqrt( 1/M Σ_m (p_m − p̄)² ), highest first. With M = 1: u = 1/2 − |p − 1/2| (nearest a coin flip).
- **policy_margin**: the policy's own preference between the two responses, as its per-token
  log-likelihood difference m = | log π(a|x)/|a| − log π(b|x)/|b| |, smallest first (where the policy
  cannot tell them apart, a label moves it most; for iterative DPO, the pairs its implicit reward
  orders least confidently).
- **diversity**: one pair per prompt before any prompt's second, prompts in a seeded order.
- **random**: a seeded shuffle (the baseline every rule is measured against).

``max_per_prompt`` caps how many pairs of one prompt are chosen, whatever the rule.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict


def ensemble_disagreement(rewards_a: list[list[float]], rewards_b: list[list[float]]) -> list[float]:
    """u_i = std_m σ(r_m(a_i) − r_m(b_i)) over M members (population std); with one member
    1/2 − |p − 1/2|. Shapes: [M][P] each; returns [P]."""
    M = len(rewards_a)
    out = []
    for i in range(len(rewards_a[0]) if M else 0):
        p = [1 / (1 + math.exp(-(rewards_a[m][i] - rewards_b[m][i]))) for m in range(M)]
        if M == 1:
            out.append(0.5 - abs(p[0] - 0.5))
        else:
            mean = sum(p) / M
            out.append(math.sqrt(sum((x - mean) ** 2 for x in p) / M))
    return out


def policy_margin(logp_a: list[float], len_a: list[int], logp_b: list[float], len_b: list[int]) -> list[float]:
    """m_i = | log π(a_i)/|a_i| − log π(b_i)/|b_i| | (per-token log-likelihoods; lengths ≥ 1)."""
    return [abs(la / max(na, 1) - lb / max(nb, 1)) for la, na, lb, nb in zip(logp_a, len_a, logp_b, len_b)]


def order(pairs: list[dict], rule: str, scores: dict[str, float] | None, seed: int) -> list[str]:
    """Pair ids in the order the rule prefers them. Ties in the score are broken by a seeded shuffle."""
    rng = random.Random(seed)
    ids = [p["pair_id"] for p in pairs]
    rng.shuffle(ids)
    if rule == "random":
        return ids
    if rule == "diversity":
        by_prompt: dict[str, list[str]] = defaultdict(list)
        prompt_of = {p["pair_id"]: str(p["prompt"]) for p in pairs}
        for pid in ids:  # prompts keep the order their first pair has in the shuffle
            by_prompt[prompt_of[pid]].append(pid)
        rounds = max((len(v) for v in by_prompt.values()), default=0)
        return [v[k] for k in range(rounds) for v in by_prompt.values() if k < len(v)]
    if scores is None:
        raise ValueError(f"rule {rule} needs scores")
    rank = {pid: i for i, pid in enumerate(ids)}
    sign = -1.0 if rule == "rm_uncertainty" else 1.0  # uncertainty: highest first; margin: lowest first
    return sorted(ids, key=lambda pid: (sign * scores[pid], rank[pid]))


def choose(pairs: list[dict], n: int, rule: str, scores: dict[str, float] | None, seed: int,
           max_per_prompt: int | None = None) -> tuple[list[str], list[str]]:
    """(chosen pair ids, passed-over pair ids): the first ``n`` in the rule's order, at most
    ``max_per_prompt`` of one prompt."""
    prompt_of = {p["pair_id"]: str(p["prompt"]) for p in pairs}
    taken: dict[str, int] = defaultdict(int)
    chosen, passed = [], []
    for pid in order(pairs, rule, scores, seed):
        pr = prompt_of[pid]
        if len(chosen) < n and (max_per_prompt is None or taken[pr] < max_per_prompt):
            chosen.append(pid)
            taken[pr] += 1
        else:
            passed.append(pid)
    return chosen, passed


def split_by_share(ids: list[str], shares: list[float], seed: int) -> list[list[str]]:
    """Pair ids dealt to sources in proportion to their shares (largest remainder), seeded."""
    rng = random.Random(seed)
    ids = list(ids)
    rng.shuffle(ids)
    total = sum(shares)
    exact = [len(ids) * s / total for s in shares]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(shares)), key=lambda i: exact[i] - counts[i], reverse=True)[:len(ids) - sum(counts)]:
        counts[i] += 1
    out, start = [], 0
    for c in counts:
        out.append(ids[start:start + c])
        start += c
    return out
