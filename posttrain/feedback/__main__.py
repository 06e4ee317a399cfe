"""``python -m posttrain.feedback <sub> [--config FILE] key=value ...``: the ``posttrain label`` commands.

An entry point, not a dependency: it hands its arguments to the main CLI's ``label`` group.
"""

import runpy
import sys

if __name__ == "__main__":
    sys.argv[1:1] = ["label"]
    runpy.run_module("posttrain.cli", run_name="__main__", alter_sys=True)
