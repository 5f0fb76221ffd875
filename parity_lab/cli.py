"""What the command-line tools share before any heavy import: ``--help`` and usage errors answer
in a fraction of a second, before ``import torch`` (seconds) runs."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with every default worth showing (not ``None``, empty or off) after its
    argument's description, and the description's own line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, [], False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with ``HelpFormatter`` and a usage error on one line."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(formatter_class=HelpFormatter, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def positive(text: str) -> int:
    """An argparse type: an integer >= 1 (a count, a length or a size)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust MODULE`` of the tools that rebuild a run's model (predict, analyze, certify)."""
    parser.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module of your own whose classes the run's config may name (repeatable; or "
        "PARITY_LAB_TRUST=MODULE,...)",
    )
