"""Run the benchmark suite (same as ``worldflow bench``): ``python -m benchmarks.run [--run RUN_DIR]``."""

import argparse
import sys

from worldflow.cli.bench import add_parser


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.run")
    sub = parser.add_subparsers(dest="cmd")
    add_parser(sub)
    args = parser.parse_args(["bench", *sys.argv[1:]])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
