"""`semu-fast` (also `python -m semu_fast`): SEMU from the command line.

Commands: unlearn, eval, report (classification, semu_fast.cli.classification); unlearn-llm (cli.llm);
unlearn-ddpm, unlearn-sd (cli.diffusion); info (which backend serves each op). Each command module adds its
subcommands with register(sub); the run-folder files come from semu_fast.workflows.results."""
from __future__ import annotations

import argparse
import logging
import sys

from . import classification, diffusion, llm

log = logging.getLogger("semu_fast")


def _run_info(args, parser) -> int:
    from ..ops import describe

    print(describe())
    return 0


class _Parser(argparse.ArgumentParser):
    """semu-fast's parser: parse_args also records the dests the command line set (args.given), which
    --preset official keeps over the preset's values."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        parsed.given = _given(args)
        return parsed


def build_parser(record_given: bool = True) -> argparse.ArgumentParser:
    parser = (_Parser if record_given else argparse.ArgumentParser)(
        prog="semu-fast", description="SEMU machine unlearning from the command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    classification.register(sub)
    llm.register(sub)
    diffusion.register(sub)
    info = sub.add_parser("info", help="which backend serves each op here, and why the others do not")
    info.set_defaults(func=_run_info, parser=info)
    return parser


def _given(argv) -> set:
    """The dests the command line sets, whatever their values (a flag given with its default value overrides a
    preset too): argv parsed again with every default (the flags' and set_defaults') suppressed."""
    parser = build_parser(record_given=False)
    parsers = [parser, *next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices.values()]
    for each in parsers:
        each._defaults.clear()
        for action in each._actions:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(name)s: %(message)s")
    if quiet:  # also where the calling program set up logging already (basicConfig then does nothing)
        log.setLevel(logging.WARNING)
    return args.func(args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
