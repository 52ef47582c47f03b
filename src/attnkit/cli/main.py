"""``attnkit`` command-line entry point: demo, show, bench, ..."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "demo": ("attnkit.cli.demo", "run every implemented variant on a default workload and check it against float64"),
    "show": ("attnkit.cli.show", "draw a mask spec (ASCII and PNG) or a positional bias (heat map)"),
    "bench": ("attnkit.cli.bench", "benchmark backends and peers: time, peak memory, GFLOP/s"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnkit", description="Every common self-attention variant behind one API.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (shows which backend ran)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_module=mod)
        importlib.import_module(mod).add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, TypeError) as e:  # bad input: a clear message, not a traceback
        if args.verbose:
            raise
        print(f"attnkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
