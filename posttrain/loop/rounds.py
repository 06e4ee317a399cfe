"""``posttrain loop FILE.yaml``: the closed loop, round after round (docs/loop.md).

Round r, in ``<run_dir>/round-r/``:

1. **candidates** (``pairs.jsonl``): the current policy samples ``k`` responses to the round's prompts;
   every distinct pair is a candidate, with a stable id and the model that sampled it.
2. **selection** (``selection.json``): the rule orders the candidates; the first ``labels_per_round``
   are chosen. The rule, every candidate's score and the passed-over ids are recorded.
3. **labels** (``requests.json``, ``<run_dir>/labels.jsonl``): the chosen pairs are dealt to the sources
   by share, requested, and their labels collected into the loop's one label store (append-only,
   deduplicated by label id, each label with its round, pair and the model that sampled it).
4. **train and evaluate**: a pipeline (``posttrain.pipeline``) of ``reward`` (all labels so far,
   warm-started from the previous round's reward model), the policy update (iterative DPO on the
   round's pairs, or GRPO/PPO against the round's reward model) and ``eval`` against the SFT model.
   ``lineage.json`` beside each trained model records the label ids it was trained on.

Every step writes its file once, atomically, and is skipped when its file exists, and the pipeline
skips finished stages and resumes interrupted ones, so a loop killed at any point continues where it
stopped; labels already collected are never requested again (the sources keep their own state). A
round whose candidates came from a policy that has since changed (``exclude_annotators`` re-trained
an earlier round) is set aside (``round-r.superseded-N/``) and run again from its candidates.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path

from posttrain.config import merge_tree
from posttrain.loop import calibration, lineage, selection
from posttrain.loop.config import LoopConfig
from posttrain.loop.sources import JUDGES, make_source, pair_id
from posttrain.pipeline import run_spec


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class LabelStore:
    """``labels.jsonl``: every label the loop collected, once (by ``label_id``), append-only."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = {r["label_id"]: r for r in _read_jsonl(path)}

    def add(self, labels: list[dict]) -> int:
        new = [lab for lab in labels if lab["label_id"] not in self.rows]
        if new:
            with self.path.open("a") as f:  # one line per label, flushed: a kill loses at most the line being written
                for lab in new:
                    f.write(json.dumps(lab, ensure_ascii=False) + "\n")
                    self.rows[lab["label_id"]] = lab
                f.flush()
                os.fsync(f.fileno())
        return len(new)

    def of_pairs(self, pair_ids: set[str], exclude: set[str]) -> list[dict]:
        return [r for r in self.rows.values() if r["pair_id"] in pair_ids and r["annotator"] not in exclude]


# ----------------------------------------------------------------------------- steps of a round


def _load(path: str):
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_policy, tokenizer_for

    mc = ModelConfig(name_or_path=path)
    return load_policy(mc), tokenizer_for(mc)


def candidates(cfg: LoopConfig, rd: Path, r: int, policy: str, policy_id: str, prompts: list) -> list[dict]:
    path = rd / "pairs.jsonl"
    if path.exists():
        return _read_jsonl(path)
    from posttrain.engines.rollout import sample_texts

    P = cfg.prompts_per_round
    chosen = [prompts[(r * P + i) % len(prompts)] for i in range(P)]
    model, tok = _load(policy)
    texts = sample_texts(model, tok, chosen, cfg.k, cfg.max_new_tokens, cfg.temperature, cfg.seed * 1009 + r)
    pairs = []
    for i, prompt in enumerate(chosen):
        for a, b in itertools.combinations(texts[i * cfg.k:(i + 1) * cfg.k], 2):
            if a != b:  # nothing to compare
                pairs.append({"pair_id": pair_id(r, prompt, a, b), "round": r, "prompt": prompt, "a": a, "b": b,
                              "model": policy, "model_id": policy_id})
    pairs = list({p["pair_id"]: p for p in pairs}.values())
    rd.mkdir(parents=True, exist_ok=True)
    _write_jsonl(path, pairs)
    return pairs


def _scores(cfg: LoopConfig, pairs: list[dict], policy: str, reward_models: list[str]) -> tuple[dict | None, str]:
    rule = cfg.selection.rule
    if rule in ("random", "diversity"):
        return None, ""
    if rule == "rm_uncertainty":
        if not reward_models:
            return None, "no reward model yet (first round): random"
        from posttrain.rewards.combine import load_rewards

        ra, rb = [], []
        for path in reward_models:
            (_, fn, _), = load_rewards([f"rm:{path}"], [])
            ra.append([float(x) for x in fn([p["prompt"] for p in pairs], [p["a"] for p in pairs])])
            rb.append([float(x) for x in fn([p["prompt"] for p in pairs], [p["b"] for p in pairs])])
        u = selection.ensemble_disagreement(ra, rb)
        return {p["pair_id"]: s for p, s in zip(pairs, u)}, ""
    from posttrain.data.chat import Example
    from posttrain.data.preference import encode_pair
    from posttrain.models.reference import compute_logps

    model, tok = _load(policy)
    exs, lens = [], []
    for p in pairs:
        e = encode_pair(tok, {"prompt": p["prompt"], "chosen": p["a"], "rejected": p["b"]}, 4096)
        for ids in e.responses:
            exs.append(Example(list(e.prompt_ids) + list(ids), [0] * len(e.prompt_ids) + [1] * len(ids)))
            lens.append(len(ids))
    lp = compute_logps(model, exs, pad_id=tok.pad_token_id or 0).tolist()
    m = selection.policy_margin(lp[0::2], lens[0::2], lp[1::2], lens[1::2])
    return {p["pair_id"]: s for p, s in zip(pairs, m)}, ""


def select(cfg: LoopConfig, rd: Path, r: int, pairs: list[dict], policy: str, reward_models: list[str]) -> list[str]:
    path = rd / "selection.json"
    if path.exists():
        return json.loads(path.read_text())["chosen"]
    scores, fallback = _scores(cfg, pairs, policy, reward_models)
    rule = "random" if fallback else cfg.selection.rule
    chosen, passed = selection.choose(pairs, cfg.labels_per_round, rule, scores, cfg.seed * 7 + r,
                                      cfg.selection.max_per_prompt)
    lineage.write_json(path, {"rule": cfg.selection.rule, "applied": rule, "fallback": fallback or None,
                       "reward_models": reward_models, "scores": scores, "chosen": chosen, "passed_over": passed})
    return chosen


def _deal(cfg: LoopConfig, rd: Path, r: int, chosen: list[str], sources: list) -> dict[str, list[str]]:
    """The chosen pairs dealt to the sources by share, plus (``calibrate``) a share of the people's pairs
    also to every judge. Written once (``requests.json``)."""
    path = rd / "requests.json"
    if path.exists():
        return json.loads(path.read_text())
    parts = selection.split_by_share(chosen, [float(s.get("share", 1.0)) for s in cfg.sources], cfg.seed + r)
    dealt = {src.name: ids for src, ids in zip(sources, parts)}
    people = [i for src in sources if src.name not in _judges(cfg) for i in dealt[src.name]]
    if cfg.calibrate and people:
        rng = random.Random(f"{cfg.seed}:calibrate:{r}")
        extra = sorted(rng.sample(people, max(1, round(cfg.calibrate * len(people)))))
        for j in _judges(cfg):
            dealt[j] = dealt[j] + extra
    lineage.write_json(path, dealt)
    return dealt


def _judges(cfg: LoopConfig) -> list[str]:
    return [s.get("name", s["kind"]) for s in cfg.sources if s["kind"] in JUDGES]


def label(cfg: LoopConfig, rd: Path, r: int, pairs: list[dict], chosen: list[str], store: LabelStore,
          sources: list) -> None:
    """Request (idempotent) and collect every source's pairs: judges first, so the pairs they are unsure
    of can be routed to people (``route_unsure``, once: ``routed.json``)."""
    if (rd / "labelled.json").exists():  # this round's labelling finished before
        return
    dealt, by_id = _deal(cfg, rd, r, chosen, sources), {p["pair_id"]: p for p in pairs}

    def keep(labels: list[dict]) -> None:  # each label with its round and pair, stored once
        store.add([{**lab, "round": r, **{k: by_id[lab["pair_id"]][k] for k in ("prompt", "a", "b", "model", "model_id")}}
                   for lab in labels if lab["pair_id"] in by_id])

    def ask(src, ids: list[str]) -> None:
        if hasattr(src, "returned"):  # labels a source handed over just before a kill
            keep(src.returned(r))
        have = {lab["pair_id"] for lab in store.rows.values() if lab["source"] == src.name}
        src.request(r, [by_id[i] for i in ids])  # idempotent: a source never sends a pair twice
        # a stateful source (the app) returns each label once itself; the others are asked for unlabelled pairs
        todo = ids if hasattr(src, "returned") else [i for i in ids if i not in have]
        if todo:
            keep(src.collect(r, todo, wait=True))

    judges = [src for src in sources if src.name in _judges(cfg)]
    people = [src for src in sources if src.name not in _judges(cfg)]
    for src in judges:
        ask(src, dealt.get(src.name, []))
    routed: dict[str, list[str]] = {}
    if cfg.route_unsure is not None and people:
        path = rd / "routed.json"
        if path.exists():
            routed = json.loads(path.read_text())
        else:
            mine = {i for src in judges for i in dealt[src.name]}
            doubt = [i for i in calibration.unsure([x for x in store.rows.values() if x["source"] in dealt
                                                    and x["source"] in _judges(cfg) and x["pair_id"] in mine],
                                                   cfg.route_unsure)
                     if all(i not in dealt[src.name] for src in people)]
            shares = [float(s.get("share", 1.0)) for s in cfg.sources if s["kind"] not in JUDGES]
            routed = {src.name: ids for src, ids in zip(people, selection.split_by_share(doubt, shares, cfg.seed + r))}
            lineage.write_json(path, routed)
    for src in people:
        ask(src, dealt.get(src.name, []) + routed.get(src.name, []))
    mine = {i for ids in dealt.values() for i in ids}
    round_labels = [x for x in store.rows.values() if x["pair_id"] in mine]
    result = {"labels": len(round_labels), "routed_to_people": sum(len(v) for v in routed.values())}
    if judges and people:
        result["calibration"] = calibration.judge_vs_people(round_labels, [j.name for j in judges], cfg.seed + r)
    lineage.write_json(rd / "labelled.json", result)


def preference_rows(labels: list[dict], ties: bool) -> list[dict]:
    out = []
    for lab in sorted(labels, key=lambda x: x["label_id"]):
        if lab["choice"] not in ("a", "b", "tie") or (lab["choice"] == "tie" and not ties):
            continue
        a, b = (lab["b"], lab["a"]) if lab["choice"] == "b" else (lab["a"], lab["b"])
        out.append({"prompt": lab["prompt"], "chosen": a, "rejected": b, "tie": lab["choice"] == "tie",
                    "margin": float(lab.get("strength") or 0), "annotator": lab["annotator"], "source": lab["source"],
                    "label_id": lab["label_id"]})
    return out


def heldout_pairs(cfg: LoopConfig, root: Path) -> str | None:
    """Gold-labelled pairs of the SFT model on the built-in task's held-out prompts (written once)."""
    path = root / "heldout.jsonl"
    if path.exists() or not cfg.prompts.startswith("builtin:") or not cfg.heldout_prompts:
        return str(path) if path.exists() else None
    from posttrain.engines.rollout import sample_texts
    from posttrain.tasks import builtin

    model, tok = _load(cfg.sft)
    prompts = [p.prompt for p in builtin.heldout_problems(cfg.heldout_prompts)]
    texts = sample_texts(model, tok, prompts, 2, cfg.max_new_tokens, cfg.temperature, cfg.seed + 99991)
    rows = []
    for i, p in enumerate(prompts):
        a, b = texts[2 * i], texts[2 * i + 1]
        ga, gb = builtin.gold_reward(p, a), builtin.gold_reward(p, b)
        if ga != gb:
            rows.append({"prompt": p, "chosen": a if ga > gb else b, "rejected": b if ga > gb else a, "source": "gold"})
    _write_jsonl(path, rows)
    return str(path)


def round_spec(cfg: LoopConfig, rd: Path, r: int, policy: str, prev_rd: Path | None, store: LabelStore,
               rounds_pairs: list[set[str]], heldout: str | None) -> tuple[dict, dict]:
    """The round's training pipeline and the label ids each of its models is trained on."""
    exclude = set(cfg.exclude_annotators)
    so_far = store.of_pairs(set().union(*rounds_pairs[:r + 1]), exclude)
    rm_rows, new_rows = preference_rows(so_far, ties=True), preference_rows(
        [x for x in so_far if x["pair_id"] in rounds_pairs[r]], ties=False)
    from posttrain.errors import ConfigError

    if not rm_rows or (cfg.policy_command == "dpo" and not new_rows):
        raise ConfigError(f"round {r} has no usable labels ({len(so_far)} labels so far, {len(new_rows)} non-tie "
                          f"labels this round after excluding {sorted(exclude) or 'nobody'})", where="labels_per_round",
                          fix="raise labels_per_round, or check the sources' labels (labels.jsonl)")
    data_dir = rd.parent / "data" / rd.name  # outside the round's pipeline directory, so the pipeline
    data_dir.mkdir(parents=True, exist_ok=True)  # fingerprints these files: new labels re-train
    _write_jsonl(data_dir / "rm_train.jsonl", rm_rows)
    used = {"reward": [x["label_id"] for x in rm_rows]}
    stages = []
    members = cfg.selection.ensemble if cfg.selection.rule == "rm_uncertainty" else 1
    for m in range(members):
        name = "reward" if m == 0 else f"reward_e{m}"
        data = str(data_dir / "rm_train.jsonl")
        if m:  # a bootstrap resample of the same labels: the ensemble's disagreement is its uncertainty
            rng = random.Random(f"{cfg.seed}:{r}:{m}")
            boot = [rm_rows[rng.randrange(len(rm_rows))] for _ in rm_rows]
            data = str(data_dir / f"rm_boot{m}.jsonl")
            _write_jsonl(Path(data), boot)
            used[name] = [x["label_id"] for x in boot]
        warm = prev_rd / name / "final" if prev_rd is not None else None
        init = str(warm) if warm is not None and warm.exists() else cfg.sft
        stages.append({"name": name, "command": "reward", "config": merge_tree(cfg.reward, {
            "model": {"name_or_path": init}, "data": {"train": data, "eval": heldout},
            "train": {"seed": cfg.seed + r * 31 + m}})})
    if cfg.policy_command == "dpo":  # iterative DPO: this round's pairs, this round's policy as reference
        _write_jsonl(data_dir / "dpo_train.jsonl", new_rows)
        used["policy"] = [x["label_id"] for x in new_rows]
        pol = merge_tree({"data": {"train": str(data_dir / "dpo_train.jsonl"), "eval": None}}, cfg.policy)
    else:
        used["policy"] = used["reward"]  # through the reward model trained on them
        pol = merge_tree({"reward": ["rm:${reward.final}"], "rollout": {"prompts": cfg.prompts}}, cfg.policy)
    pol = merge_tree(pol, {"model": {"name_or_path": policy}, "train": {"seed": cfg.seed + r}})
    stages.append({"name": "policy", "command": cfg.policy_command, "config": pol})
    if cfg.eval is not None:
        stages.append({"name": "eval", "command": "eval", "config": merge_tree(
            {"best_of_n": [], "seed": cfg.seed + r}, merge_tree(cfg.eval, {
                "policies": {"sft": cfg.sft, "policy": "${policy.final}"}, "baseline": "sft",
                "reward_model": "${reward.final}"}))})
    return {"name": f"{cfg.name}-round-{r}", "stages": stages}, used


def round_result(rd: Path, r: int, store: LabelStore, chosen: set[str]) -> dict:
    out: dict = {"round": r, "labels": {}}
    for lab in store.rows.values():
        if lab["pair_id"] in chosen:
            out["labels"][lab["source"]] = out["labels"].get(lab["source"], 0) + 1
    cal = (lineage.read_json(rd / "labelled.json") or {}).get("calibration")
    if cal:
        out["calibration"] = cal
    rs = lineage.read_json(rd / "reward" / "summary.json")
    if rs and "final" in rs and "accuracy" in rs["final"]:
        out["rm_accuracy"] = rs["final"]["accuracy"]
    ev = lineage.read_json(rd / "eval" / "eval.json")
    pol = (ev or {}).get("policies", {}).get("policy", {})
    if "gold_reward" in pol:
        out["gold_reward"], out["gold_ci"] = pol["gold_reward"], pol.get("gold_ci")
        out["gold_vs_sft"] = pol.get("vs_baseline", {}).get("gold_paired")
    return out


def run(cfg: LoopConfig) -> dict:
    from posttrain.data.formats import load_records
    from posttrain.data.records import ReadOptions

    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    from posttrain.config import to_dict

    lineage.write_json(root / "loop.json", {"config": to_dict(cfg)})
    prompts = [row["prompt"] for row in load_records(cfg.prompts, "prompt", options=ReadOptions(prefix=None))]
    store = LabelStore(root / "labels.jsonl")
    sources = [make_source(s, root / "sources" / s.get("name", s["kind"]), cfg.seed) for s in cfg.sources]
    heldout = heldout_pairs(cfg, root)
    policy, policy_id, prev_rd, rounds_pairs, results = cfg.sft, "sft", None, [], []
    for r in range(cfg.rounds):
        rd = root / f"round-{r}"
        lineage.supersede_if_stale(rd, policy_id)
        print(f"loop round {r}: candidates from {policy}", flush=True)
        pairs = candidates(cfg, rd, r, policy, policy_id, prompts)
        rms = [str(prev_rd / n / "final") for n in ["reward", *(f"reward_e{m}" for m in range(1, cfg.selection.ensemble))]
               if prev_rd is not None and (prev_rd / n / "final").exists()]
        chosen = select(cfg, rd, r, pairs, policy, rms)
        label(cfg, rd, r, pairs, chosen, store, sources)
        rounds_pairs.append(set(chosen))
        spec, used = round_spec(cfg, rd, r, policy, prev_rd, store, rounds_pairs, heldout)
        run_spec(spec, rd, f"{cfg.name} round {r}")
        for record in lineage.record_round(cfg, rd, r, policy, policy_id, used, store):
            for src in sources:  # the labeling app keeps which of its labels trained which model
                if hasattr(src, "record_model"):
                    src.record_model(record)
        policy, prev_rd = str(rd / "policy" / "final"), rd
        policy_id = lineage.run_id(rd / "policy")
        results.append(round_result(rd, r, store, set(chosen)))
        print(f"loop round {r}: {json.dumps(results[-1])}", flush=True)
    summary = {"run_dir": str(root), "rounds": results, "labels": len(store.rows)}
    lineage.write_json(root / "summary.json", summary)
    return summary
