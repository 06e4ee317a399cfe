"""``posttrain <command> [--config FILE.yaml] [key=value ...]``.

Commands are looked up lazily, so ``posttrain --help`` imports no torch. Each command has a typed
config class; the CLI loads the YAML preset, applies dotted overrides, validates, and calls the
command's ``run(config)``. Errors print one paragraph and exit with status 2; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

import click

from posttrain.errors import PosttrainError


@dataclass(frozen=True)
class Command:
    module: str
    config: str
    help: str
    run: str = "run"
    positional: str | None = None  # config key a bare first argument fills (posttrain pipeline FILE)


COMMANDS: dict[str, Command] = {
    "sft": Command("posttrain.algorithms.sft", "SFTConfig",
                   "Supervised fine-tuning on chat/prompt-completion/text data."),
    "collect": Command("posttrain.algorithms.collect", "CollectConfig",
                       "Sample response pairs from a policy and label them (simulated annotators or people)."),
    "reward": Command("posttrain.algorithms.reward", "RewardConfig",
                      "Train a reward model (Bradley-Terry, margins, K-wise, Plackett-Luce) on preferences."),
    "eval-reward": Command("posttrain.algorithms.eval_reward", "EvalRewardConfig",
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
                      "Rebuild report.html / report.md / summary.json of a pipeline run directory.",
                      positional="run_dir"),
    "demo": Command("posttrain.demo", "DemoConfig",
                    "The whole RLHF pipeline on the built-in task and tiny model, evaluated, with a report."),
    "pipeline": Command("posttrain.pipeline", "PipelineConfig",
                        "Run the named stages of a pipeline file in order; finished stages are skipped.",
                        positional="file"),
}

# sub-command groups (e.g. `posttrain label serve`): name -> (module with a COMMANDS dict, help)
GROUPS: dict[str, tuple[str, str]] = {
    "label": ("posttrain.feedback.commands", "Human-feedback labeling app: serve, import, export, generate, users."),
    "data": ("posttrain.data.commands", "Check a data file the way the commands read it: posttrain data inspect FILE."),
}


def _load(cmd: Command):
    module = importlib.import_module(cmd.module)
    return getattr(module, cmd.config), getattr(module, cmd.run)


def _print_config_help(name: str, cmd: Command) -> None:
    from posttrain.config import describe

    cls, _ = _load(cmd)
    click.echo(f"Usage: posttrain {name} [--config FILE.yaml] [--debug] [key=value ...]\n")
    click.echo(f"  {cmd.help}\n\nConfig keys (dotted; default, then help and [source of the default]):\n")
    for key, tname, default, help_text, source in describe(cls):
        click.echo(f"  {key} ({tname}) = {default}")
        if help_text:
            click.echo(f"      {help_text}" + (f" [{source}]" if source and source != "posttrain" else ""))


def _run(name: str, cmd: Command, config_file: str | None, overrides: tuple[str, ...], debug: bool) -> None:
    from posttrain.config import load_config

    try:
        cls, run = _load(cmd)
        cfg = load_config(cls, config_file, list(overrides))
        result = run(cfg)
        if isinstance(result, dict) and result.get("run_dir") and os.environ.get("RANK", "0") == "0":
            click.echo(f"done: {result['run_dir']}")
    except PosttrainError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # an internal error: say so, and how to see more
        if debug:
            raise
        click.echo(f"internal error in '{name}': {type(e).__name__}: {e}. Re-run with --debug for the "
                   f"traceback and report it.", err=True)
        sys.exit(1)


def _make_command(name: str, cmd: Command, full_name: str | None = None) -> click.Command:
    full_name = full_name or name
    @click.command(name=name, help=cmd.help, add_help_option=False,
                   context_settings={"ignore_unknown_options": True})
    @click.option("--config", "config_file", type=click.Path(), default=None, help="YAML preset.")
    @click.option("--debug", is_flag=True, help="Show tracebacks.")
    @click.option("--resume", is_flag=True, help="Shorthand for train.resume=true.")
    @click.option("--quick", is_flag=True, help="Shorthand for quick=true (posttrain demo).")
    @click.option("--help", "show_help", is_flag=True, help="Show config keys and exit.")
    @click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
    def command(config_file, debug, resume, quick, show_help, overrides):
        if show_help:
            _print_config_help(full_name, cmd)
            return
        if resume:
            overrides = (*overrides, "train.resume=true")
        if quick:
            overrides = (*overrides, "quick=true")
        if cmd.positional and overrides and "=" not in overrides[0]:
            overrides = (f"{cmd.positional}={overrides[0]}", *overrides[1:])
        _run(full_name, cmd, config_file, overrides, debug)

    return command


class LazyGroup(click.Group):
    """Lists commands with one line each; builds a command only when it is invoked."""

    def __init__(self, *args, commands: dict[str, Command], groups: dict[str, tuple[str, str]], prefix: str = "",
                 **kw):
        super().__init__(*args, **kw)
        self._lazy, self._groups, self._prefix = commands, groups, prefix

    def list_commands(self, ctx):
        return sorted([*self._lazy, *self._groups])

    def get_command(self, ctx, name):
        if name in self._lazy:
            return _make_command(name, self._lazy[name], self._prefix + name)
        if name in self._groups:
            module, help_text = self._groups[name]
            mod = importlib.import_module(module)
            if isinstance(getattr(mod, "group", None), click.Group):  # a group with its own options
                return mod.group
            sub = mod.COMMANDS
            return LazyGroup(name=name, help=help_text, commands=sub, groups={}, prefix=f"{name} ")
        return None

    def format_commands(self, ctx, formatter):
        rows = [(n, self._lazy[n].help if n in self._lazy else self._groups[n][1]) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError:
            import difflib

            near = difflib.get_close_matches(args[0], self.list_commands(ctx), n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise click.UsageError(f"no command '{args[0]}'.{hint} See 'posttrain --help'.") from None


main = LazyGroup(name="posttrain", commands=COMMANDS, groups=GROUPS,
                 help="Post-train language models from human and AI feedback.")
main = click.version_option(package_name="posttrain")(main)


if __name__ == "__main__":
    main()
