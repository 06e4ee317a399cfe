"""Lineage: which labels trained which model, and which model sampled those labels' candidates.

Each model the loop trains has ``lineage.json`` beside its ``final/``: its kind and round, the model it
started from, the ids of the labels it was trained on (``labels.jsonl`` holds each label with its
annotator, source, round and the model that sampled the pair), counts per annotator and source, and
the model that sampled the round's candidates. ``posttrain lineage RUN_OR_MODEL`` prints the chain
model ← labels ← candidates ← model … back to the starting (SFT) model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import opt
from posttrain.errors import ConfigError

FILE = "lineage.json"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj) -> None:
    """``obj`` as JSON at ``path``, atomically (a temporary file renamed over it)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def run_id(stage_dir: Path) -> str:
    """The identity of a stage's trained model: the pipeline's run id, new every time it trains."""
    return (read_json(stage_dir / "stage.json") or {}).get("run_id") or "unknown"


def supersede_if_stale(rd: Path, policy_id: str) -> None:
    """Set round directory ``rd`` aside when its candidates came from another model than ``policy_id``
    (the policy before it was trained again): the round runs again from new candidates."""
    pairs = rd / "pairs.jsonl"
    if not pairs.exists():
        return
    first = next((json.loads(x) for x in pairs.read_text().splitlines() if x.strip()), None)
    if first is None or first.get("model_id") == policy_id:
        return
    n = 1
    while rd.with_name(f"{rd.name}.superseded-{n}").exists():
        n += 1
    print(f"loop: {rd.name}'s candidates came from a policy that has been trained again since; set aside as "
          f"{rd.name}.superseded-{n}", flush=True)
    shutil.move(str(rd), str(rd.with_name(f"{rd.name}.superseded-{n}")))


def record_round(cfg, rd: Path, r: int, policy: str, policy_id: str, used: dict[str, list[str]],
                 store) -> list[dict]:
    """``lineage.json`` beside every model round ``r`` trained (``used``: stage -> label ids); returns
    the records."""
    records = []
    for stage, ids in used.items():
        d = rd / stage
        if not (d / "final").exists():
            continue
        labs = [store.rows[i] for i in ids if i in store.rows]
        stage_cfg = (read_json(d / "stage.json") or {}).get("config", {})
        record = {"kind": "reward" if stage.startswith("reward") else "policy", "stage": stage, "round": r,
                  "loop": cfg.name, "loop_dir": str(Path(cfg.run_dir)), "model": str(d / "final"),
                  "run_id": run_id(d), "started_from": stage_cfg.get("model.name_or_path"),
                  "command": (read_json(d / "stage.json") or {}).get("command"),
                  "candidates_model": policy, "candidates_model_id": policy_id,
                  "labels": len(ids), "distinct_labels": len(set(ids)), "label_ids": ids,
                  "per_annotator": dict(Counter(x["annotator"] for x in labs)),
                  "per_source": dict(Counter(x["source"] for x in labs)),
                  "per_round": {str(k): v for k, v in sorted(Counter(x["round"] for x in labs).items())},
                  "source_versions": sorted({str(x.get("source_version")) for x in labs}),
                  "excluded_annotators": list(cfg.exclude_annotators)}
        write_json(d / FILE, record)
        records.append(record)
    return records


def find(path: str | Path) -> tuple[Path, dict] | None:
    p = Path(path)
    for d in (p, p.parent):
        rec = read_json(d / FILE)
        if rec is not None:
            return d, rec
    return None


def chain(path: str | Path) -> list[dict]:
    """[the model's record, the record of the model that sampled its candidates, ...]; the last entry
    is ``{"model": path}`` of the starting model (no lineage)."""
    out, seen = [], set()
    cur: str | None = str(path)
    while cur is not None and cur not in seen:
        seen.add(cur)
        hit = find(cur)
        if hit is None:
            out.append({"model": cur})
            break
        _, rec = hit
        out.append(rec)
        cur = rec.get("candidates_model")
    return out


def format_chain(records: list[dict]) -> str:
    lines = []
    for rec in records:
        if "kind" not in rec:
            lines.append(f"{rec['model']}  (the starting model: no lineage)")
            break
        how = {"dpo": "iterative DPO", "grpo": "GRPO against the reward model", "ppo": "PPO against the reward "
               "model", "reward": "reward model"}.get(rec.get("command"), rec.get("command"))
        lines.append(f"{rec['kind']} of round {rec['round']} ({how}): {rec['model']}")
        ann = ", ".join(f"{k} {v}" for k, v in sorted(rec["per_annotator"].items()))
        src = ", ".join(f"{k} {v}" for k, v in sorted(rec["per_source"].items()))
        rounds = ", ".join(f"round {k}: {v}" for k, v in rec["per_round"].items())
        lines.append(f"  ← {rec['labels']} labels ({rounds}; annotators: {ann}; sources: {src})"
                     + (f"; excluded: {', '.join(rec['excluded_annotators'])}" if rec["excluded_annotators"] else ""))
        lines.append(f"  ← candidates sampled by {rec['candidates_model']}; started from {rec['started_from']}")
    return "\n".join(lines)


@dataclass
class LineageConfig:
    path: str = opt("", "A model the loop trained (its final/ or its run directory).")
    ids: bool = opt(False, "Also print the label ids each model was trained on.")

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("no model given", where="path", fix="posttrain lineage runs/loop/round-1/policy")


def run(cfg: LineageConfig) -> dict:
    if find(cfg.path) is None:
        raise ConfigError(f"{cfg.path} has no {FILE} (nor its parent): it was not trained by `posttrain loop`",
                          where="path", fix="give a round's model, e.g. runs/loop/round-1/policy/final")
    records = chain(cfg.path)
    print(format_chain(records), flush=True)
    if cfg.ids:
        for rec in records:
            if "label_ids" in rec:
                print(f"{rec['model']}: " + " ".join(rec["label_ids"]), flush=True)
    return {"chain": [{k: v for k, v in r.items() if k != "label_ids"} for r in records]}
