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

import click

from posttrain.commands import COMMANDS, GROUPS, Command, load_command
from posttrain.errors import PosttrainError


USAGE = "[--config FILE.yaml] [--resume] [--print-config] [--debug] [--help] [key=value ...]"
OPTIONS = ("--config", "--resume", "--print-config", "--debug", "--help", "--quick")


def _print_config_help(name: str, cmd: Command, config_file: str | None, overrides: tuple[str, ...]) -> None:
    """Every key with its help and the source of its default; with ``--config`` (or overrides) the
    values that config resolves to, those that differ from the default marked."""
    from posttrain.config import load_config
    from posttrain.config_view import changed_keys, describe

    cls, _ = load_command(cmd)
    cfg = load_config(cls, config_file, list(overrides), command=name, check=False) if config_file or overrides else None
    changed = changed_keys(cfg, cls()) if cfg is not None else {}
    click.echo(f"Usage: posttrain {name} {USAGE}\n")
    click.echo(f"  {cmd.help}\n")
    if cfg is not None:
        click.echo(f"Config keys with the values of {config_file or 'these overrides'} (* = differs from the "
                   "default; then help and [source of the default]):\n")
    else:
        click.echo("Config keys (dotted; default, then help and [source of the default]):\n")
    for key, tname, value, help_text, source in describe(cls, instance=cfg):
        mark = f"   * default {changed[key][1]!r}" if key in changed else ""
        click.echo(f"  {key} ({tname}) = {value}{mark}")
        if help_text:
            click.echo(f"      {help_text}" + (f" [{source}]" if source and source != "posttrain" else ""))


def _run(name: str, cmd: Command, config_file: str | None, overrides: tuple[str, ...], debug: bool,
         print_config: bool = False) -> None:
    from posttrain.config import load_config
    from posttrain.config_view import resolved_yaml

    try:
        cls, run = load_command(cmd)
        cfg = load_config(cls, config_file, list(overrides), command=name)
        if print_config:  # the dry run: nothing loaded but the config
            click.echo(resolved_yaml(cfg, command=name), nl=False)
            return
        if getattr(cfg, "launcher", None) == "ray" and cfg.ray.learners > 1:
            from posttrain.engines.ray_learners import launch_learners  # the learners are Ray actors

            result = launch_learners(cfg, run)
        else:
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
    @click.option("--print-config", "print_config", is_flag=True,
                  help="Print the fully resolved config as YAML (changes from the defaults marked) and exit.")
    @click.option("--help", "show_help", is_flag=True, help="Show config keys (with --config: its values) and exit.")
    @click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
    def command(config_file, debug, resume, quick, print_config, show_help, overrides):
        for o in overrides:
            if o.startswith("-") and "=" not in o:  # not key=value: a misspelled option
                import difflib

                near = difflib.get_close_matches(o, OPTIONS, n=1)
                raise click.UsageError(f"no option '{o}'." + (f" Did you mean '{near[0]}'?" if near else "")
                                       + f" Usage: posttrain {full_name} {USAGE}")
        if show_help:
            try:
                _print_config_help(full_name, cmd, config_file, overrides)
            except PosttrainError as e:
                click.echo(f"error: {e}", err=True)
                sys.exit(2)
            return
        if resume:
            overrides = (*overrides, "train.resume=true")
        if quick:
            overrides = (*overrides, "quick=true")
        if cmd.positional == "--config" and overrides and "=" not in overrides[0] and config_file is None:
            config_file, overrides = overrides[0], overrides[1:]
        elif cmd.positional and overrides and "=" not in overrides[0]:
            overrides = (f"{cmd.positional}={overrides[0]}", *overrides[1:])
        _run(full_name, cmd, config_file, overrides, debug, print_config)

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
