"""``attnkit`` command-line entry point: demo, show, bench, ... (also ``python -m attnkit``).

Error contract: a user error (bad option value, bad spec, a file that cannot be written, no
backend for the request) ends as ONE line on stderr, ``attnkit COMMAND: error: ...``, and exit
status 2. Anything else is a bug: one line naming the exception and asking for ``-v``, exit 1.
``-v`` shows the traceback of either.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "demo": ("attnkit.cli.demo", "run every implemented variant on a default workload and check it against float64"),
    "show": ("attnkit.cli.show", "draw a mask spec (ASCII, PNG with --out) or a positional bias (heat map)"),
    "bench": ("attnkit.cli.bench", "benchmark backends and peers: time, peak memory, GFLOP/s"),
    "train": ("attnkit.cli.train", "train a small model with one attention variant on a learning task"),
    "compare": ("attnkit.cli.compare", "train several variants / position schemes on a task and tabulate them"),
}

USAGE_ERROR = 2  # bad input: argparse's status too
INTERNAL_ERROR = 1


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a parse error is one line on stderr (``attnkit show: error: ...``), exit 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def _version() -> str:
    from .._version import __version__

    return f"attnkit {__version__}"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="attnkit", description="Every common self-attention variant behind one API.")
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (shows which backend ran); tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (mod, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_module=mod)
        importlib.import_module(mod).add_arguments(sp)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..dispatch import NoBackendError

    # ValueError/TypeError: bad values (the library's argument checks); OSError: a path that cannot
    # be read or written; NoBackendError: no backend fits the request.
    return (ValueError, TypeError, OSError, NoBackendError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USAGE_ERROR
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print(f"attnkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's one error boundary
        if args.verbose:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message holds
        if isinstance(e, _user_errors()):
            print(f"attnkit {args.command}: error: {msg}", file=sys.stderr)
            return USAGE_ERROR
        print(f"attnkit {args.command}: internal error ({type(e).__name__}): {msg}; "
              "rerun with -v for the traceback and report it", file=sys.stderr)
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
