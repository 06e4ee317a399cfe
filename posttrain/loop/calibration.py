"""Judges against people on the same pairs, per round, and which of a judge's pairs people should see.

Where people (the app, simulated annotators) and a judge labelled the same pairs:

    people's outcome o_i = the majority of the people's choices on pair i (a, b or tie; an even split is a tie)
    agreement = 1/N Σ_i 1[judge_i = o_i]                 (95% percentile bootstrap over the pairs)
    κ = Cohen's kappa of the two outcome lists (``judges.pairwise.cohens_kappa``)
    swap_inconsistency = #(pairs whose two presentation orders disagree) / #(pairs judged in both orders)

A judge is **unsure** of a pair when it called a tie, its two orders disagreed, or (logprob mode) its
P(a better) is within ``margin`` of 1/2; with ``route_unsure`` those pairs go to people as well.
"""

from __future__ import annotations

from collections import Counter, defaultdict


def people_outcomes(labels: list[dict]) -> dict[str, str]:
    votes: dict[str, Counter] = defaultdict(Counter)
    for lab in labels:
        votes[lab["pair_id"]][lab["choice"]] += 1
    out = {}
    for pid, c in votes.items():
        top = c.most_common()
        out[pid] = top[0][0] if len(top) == 1 or top[0][1] > top[1][1] else "tie"
    return out


def judge_vs_people(labels: list[dict], judges: list[str], seed: int = 0) -> dict[str, dict]:
    """Per judge source: agreement with people's majority on the pairs both labelled (with its
    interval), Cohen's κ, and its swap inconsistency over all its labels given."""
    from posttrain.evaluation.stats import bootstrap_ci
    from posttrain.judges.pairwise import cohens_kappa

    people = people_outcomes([x for x in labels if x["source"] not in judges])
    out = {}
    for j in judges:
        mine = [x for x in labels if x["source"] == j]
        both = [(x["choice"], people[x["pair_id"]]) for x in mine if x["pair_id"] in people]
        swap = [x["consistent"] for x in mine if x.get("consistent") is not None]
        res: dict = {"pairs": len(both), "swap_inconsistency": (sum(not c for c in swap) / len(swap)) if swap else None,
                     "swap_pairs": len(swap)}
        if both:
            hits = [float(a == b) for a, b in both]
            point, lo, hi = bootstrap_ci(hits, n_boot=2000, seed=seed)
            res.update(agreement=float(point), agreement_ci=[float(lo), float(hi)],
                       kappa=cohens_kappa([a for a, _ in both], [b for _, b in both]))
        out[j] = res
    return out


def unsure(labels: list[dict], margin: float) -> list[str]:
    """Pair ids a judge called a tie, judged inconsistently across orders, or gave P(a) within
    ``margin`` of 1/2."""
    return sorted({x["pair_id"] for x in labels if x["choice"] == "tie" or x.get("consistent") is False
                   or (x.get("prob_a") is not None and abs(x["prob_a"] - 0.5) < margin)})
