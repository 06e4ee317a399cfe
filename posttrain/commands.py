"""The command registry: every ``posttrain <command>`` with its module, config class and run function.

Looked up lazily (importing this module imports no torch). The CLI (``cli.py``), the pipeline runner
and commands that run another command (``best-of-n`` fine-tuning with ``sft``) use it, so none of them
imports another's module directly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str
    config: str
    help: str
    run: str = "run"
    positional: str | None = None  # config key a bare first argument fills (posttrain pipeline FILE);
    #                                "--config": the bare first argument is the config file (posttrain loop FILE)


COMMANDS: dict[str, Command] = {
    "sft": Command("posttrain.algorithms.sft", "SFTConfig",
                   "Supervised fine-tuning on chat/prompt-completion/text data."),
    "collect": Command("posttrain.algorithms.collect", "CollectConfig",
                       "Sample response pairs from a policy and label them (simulated annotators or people)."),
    "reward": Command("posttrain.algorithms.reward", "RewardConfig",
                      "Train a reward model (Bradley-Terry, margins, K-wise, Plackett-Luce) on preferences."),
    "eval-reward": Command("posttrain.evaluation.eval_reward", "EvalRewardConfig",
                           "Reward-model accuracy, margin, calibration, per-subset and length-baseline accuracy."),
    "dpo": Command("posttrain.algorithms.dpo", "DPOConfig",
                   "Direct alignment on preference pairs: DPO, cDPO, robust DPO, IPO, hinge, SimPO, ORPO."),
    "kto": Command("posttrain.algorithms.kto", "KTOConfig",
                   "KTO on unpaired desirable/undesirable data (paired data is unpaired automatically)."),
    "ppo": Command("posttrain.algorithms.ppo", "PPOConfig",
                   "PPO with a value model and GAE against a reward model or verifier, KL to the reference."),
    "grpo": Command("posttrain.algorithms.grpo", "GRPOConfig",
                    "GRPO and its variants (Dr.GRPO, DAPO, GSPO, CISPO) with verifiable or learned rewards."),
    "rloo": Command("posttrain.algorithms.rloo", "RLOOConfig", "REINFORCE leave-one-out (RLOO)."),
    "reinforce": Command("posttrain.algorithms.reinforce", "ReinforceConfig", "REINFORCE with a baseline."),
    "distill": Command("posttrain.algorithms.distill", "DistillConfig",
                       "On-policy distillation: the student samples, the teacher's per-token reverse KL is the reward."),
    "online-dpo": Command("posttrain.algorithms.online_dpo", "OnlineDPOConfig",
                          "Online DPO: the policy samples two responses per prompt, a labeler orders them, DPO at once."),
    "loop": Command("posttrain.loop.rounds", "LoopConfig",
                    "The closed loop: sample, select, label (people, judges, simulated), retrain RM and policy, per round.",
                    positional="--config"),
    "lineage": Command("posttrain.loop.lineage", "LineageConfig",
                       "Which labels (annotators, sources, rounds) trained a loop's model, back to the SFT model.",
                       positional="path"),
    "best-of-n": Command("posttrain.algorithms.best_of_n", "BestOfNConfig",
                         "Best-of-N: rejection-sampling SFT data, or an inference-time baseline with its KL."),
    "serve": Command("posttrain.serving.openai_server", "ServeConfig",
                     "Serve a local model over the OpenAI-compatible chat-completions protocol."),
    "judge": Command("posttrain.judges.commands", "JudgeConfig",
                     "LLM-as-judge: pairwise labels in both orders, or rubric grades; agreement with humans.",
                     run="run_judge"),
    "cai": Command("posttrain.judges.commands", "CAIConfig",
                   "Constitutional AI: critique and revision chains -> SFT data and AI-labeled pairs.",
                   run="run_cai"),
    "eval": Command("posttrain.evaluation.evaluate", "EvalConfig",
                    "Compare policies: gold reward, win rates with CIs, paired tests, KL, over-optimization."),
    "report": Command("posttrain.evaluation.pipeline_report", "ReportConfig",
                      "Build report.html / report.md / summary.json of a run directory (pipeline, eval or a single run).",
                      positional="run_dir"),
    "demo": Command("posttrain.demo", "DemoConfig",
                    "The whole RLHF pipeline on the built-in task and tiny model, evaluated, with a report."),
    "recipes": Command("posttrain.recipes", "RecipesConfig", "List the presets in recipes/ (file, command, what it is)."),
    "pipeline": Command("posttrain.pipeline", "PipelineConfig",
                        "Run the stages of a pipeline file in order; a finished stage whose config and inputs are unchanged is skipped.",
                        positional="file"),
}

# sub-command groups (e.g. `posttrain label serve`): name -> (module with a COMMANDS dict, help)
GROUPS: dict[str, tuple[str, str]] = {
    "label": ("posttrain.feedback.commands", "Human-feedback labeling app: serve, import, export, generate, users."),
    "data": ("posttrain.inspect_data", "Check a data file the way the commands read it: posttrain data inspect FILE."),
}


def load_command(cmd: Command | str):
    """(config class, run function) of a command (a ``Command`` or a top-level command's name)."""
    if isinstance(cmd, str):
        cmd = COMMANDS[cmd]
    module = importlib.import_module(cmd.module)
    return getattr(module, cmd.config), getattr(module, cmd.run)
