"""``python -m posttrain``: the same command line as ``posttrain``."""

from posttrain.cli import main

if __name__ == "__main__":
    main(prog_name="posttrain")
