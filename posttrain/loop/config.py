"""The loop's typed config (``posttrain loop FILE.yaml``; docs/loop.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from posttrain.config import opt
from posttrain.errors import ConfigError

RULES = ("random", "rm_uncertainty", "policy_margin", "diversity")
POLICY_COMMANDS = ("dpo", "grpo", "ppo")


@dataclass
class SelectionConfig:
    rule: Literal["random", "rm_uncertainty", "policy_margin", "diversity"] = opt(
        "random", "Which candidate pairs to label: random (baseline); rm_uncertainty (disagreement of a "
        "bootstrap ensemble of reward models on P(a ≻ b)); policy_margin (the policy's own preference, its "
        "per-token log-likelihood difference, nearest zero); diversity (one pair per prompt, prompts in a "
        "seeded order). Before a reward model exists rm_uncertainty falls back to random (recorded).",
        "active learning for RLHF: Christiano et al. 2017 (ensemble disagreement), Mehta et al. 2023")
    ensemble: int = opt(3, "rm_uncertainty: reward models in the ensemble, each trained on a bootstrap "
                        "resample of the labels (1 = the round's reward model alone, its |P − 1/2|).")
    max_per_prompt: int | None = opt(None, "At most this many pairs of one prompt are chosen (null = no cap).")

    def validate(self) -> None:
        if self.ensemble < 1:
            raise ConfigError("selection.ensemble must be >= 1", where="selection.ensemble")
        if self.max_per_prompt is not None and self.max_per_prompt < 1:
            raise ConfigError("selection.max_per_prompt must be >= 1 or null", where="selection.max_per_prompt")


@dataclass
class LoopConfig:
    name: str = opt("loop", "The loop's name (shown in the lineage and the report).")
    run_dir: str = opt("runs/loop", "Where rounds, labels and lineage go (round-N/ per round).")
    rounds: int = opt(2, "Rounds to run (a later run with more rounds continues).")
    sft: str = opt("", "The starting policy (round 0 samples from it); the reward model's first backbone and "
                   "the evaluation baseline.")
    prompts: str = opt("builtin:prompts", "Prompt pool; round r takes the next prompts_per_round of it.")
    prompts_per_round: int = opt(64, "Prompts sampled each round.")
    k: int = opt(2, "Responses per prompt; every distinct pair is a candidate.")
    max_new_tokens: int = opt(24, "Longest candidate response.")
    temperature: float = opt(1.0, "Candidate sampling temperature.")
    labels_per_round: int = opt(32, "Pairs chosen for labelling each round (the labelling budget).")
    selection: SelectionConfig = opt(factory=SelectionConfig, help="Active selection of the pairs to label.")
    sources: list[dict[str, Any]] = opt(
        [{"kind": "simulated", "share": 1.0}],
        "Feedback sources with their share of each round's pairs: kind simulated (the built-in task's "
        "annotators; per_pair), judge (reward: a scorer spec), app (the labeling app: url, token or "
        "username/password, project, annotators, overlap, quota, deadline_s). Shares are normalised.")
    calibrate: float = opt(0.0, "Share of the pairs dealt to people (app, simulated) that every judge labels "
                           "too, to measure each judge's agreement with people per round (0 = none).")
    route_unsure: float | None = opt(None, "Pairs a judge called a tie, judged differently in the two orders, or "
                                     "gave P(a) within this of 1/2 go to people as well (null = off).")
    reward: dict[str, Any] = opt({"train": {"epochs": 3}}, "Overrides of the `reward` command, trained every "
                                 "round on all labels so far, warm-started from the previous round's model.")
    policy_command: Literal["dpo", "grpo", "ppo"] = opt(
        "dpo", "Policy update each round: dpo (iterative DPO on the round's new pairs, the round's policy as "
        "reference), or grpo / ppo against the round's reward model.", "Xiong et al. 2024 (iterative DPO)")
    policy: dict[str, Any] = opt({}, "Overrides of the policy command's config.")
    eval: dict[str, Any] | None = opt({"n_prompts": 64, "samples": 4},
                                      "Overrides of the `eval` command run each round against the SFT model "
                                      "(null = no evaluation).")
    heldout_prompts: int = opt(100, "Built-in task: held-out prompts whose gold-labelled pairs measure each "
                               "round's reward model (0 = none).")
    exclude_annotators: list[str] = opt([], "Labels of these annotators are left out of every training set; "
                                        "the rounds they touched re-train, later rounds re-sample.")
    seed: int = opt(0, "Seed of sampling, selection and simulated annotators.")

    def validate(self) -> None:
        if not self.sft:
            raise ConfigError("the loop needs a starting policy", where="sft", fix="sft: runs/sft/final")
        for key in ("rounds", "prompts_per_round", "labels_per_round"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1", where=key)
        if self.k < 2:
            raise ConfigError("k must be >= 2 (a pair needs two responses)", where="k")
        if not self.sources:
            raise ConfigError("no feedback source", where="sources", fix="sources: [{kind: simulated}]")
        for i, s in enumerate(self.sources):
            if not isinstance(s, dict) or s.get("kind") not in ("simulated", "judge", "llm_judge", "app"):
                raise ConfigError(f"sources[{i}] needs kind: simulated | judge | llm_judge | app, got {s!r}",
                                  where=f"sources[{i}]")
            if s["kind"] == "llm_judge" and not s.get("backend"):
                raise ConfigError(f"sources[{i}] (llm_judge) needs backend: hf:<model> or openai:<url>#<model>",
                                  where=f"sources[{i}].backend")
            if float(s.get("share", 1.0)) <= 0:
                raise ConfigError(f"sources[{i}].share must be > 0", where=f"sources[{i}].share")
            if s["kind"] == "judge" and not s.get("reward"):
                raise ConfigError(f"sources[{i}] (judge) needs reward: a scorer spec (rm:<path>, builtin_gold, "
                                  "module:function)", where=f"sources[{i}].reward")
        if not 0 <= self.calibrate <= 1:
            raise ConfigError("calibrate must be in [0, 1]", where="calibrate")
        kinds = {s["kind"] for s in self.sources}
        if (self.calibrate or self.route_unsure is not None) and not (
                kinds & {"judge", "llm_judge"} and kinds & {"app", "simulated"}):
            raise ConfigError("calibrate and route_unsure need a judge source and a people source (app or "
                              "simulated)", where="calibrate" if self.calibrate else "route_unsure")
        names = [s.get("name", s["kind"]) for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"two sources share a name ({names}); labels are attributed by source name",
                              where="sources", fix="give each a distinct name: ...")
