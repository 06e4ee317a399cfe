"""``python -m posttrain.feedback <sub> [--config FILE] key=value ...``: the ``posttrain label`` commands,
usable before (and besides) the main CLI's ``label`` group."""

from posttrain.cli import LazyGroup
from posttrain.feedback.commands import COMMANDS

main = LazyGroup(name="label", commands=COMMANDS, groups={}, help="Human-feedback labeling app.")

if __name__ == "__main__":
    main()
