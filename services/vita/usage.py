"""argparse with the CLI's usage errors: one line that names the command and where to read its flags, exit status 2
(`vita --help`), for `vita` itself and every `vita serve SERVICE` parser, instead of argparse's usage block."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

EXIT_USAGE = 2


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, and an option's help ends with `(default: X)` when its default says something (not None, False,
    empty or suppressed) and the help does not mention its default already (`vita serve llm --help`)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help
        if (not help_text or not action.option_strings or "default" in help_text.lower()
                or action.default in (None, False, "", [], (), argparse.SUPPRESS)):
            return help_text
        return f"{help_text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose `error` prints `PROG: error: MESSAGE (see `PROG --help`)` and exits 2.
    Subparsers made with `add_subparsers` are `Subcommand`s: this class, refusing what they do not know themselves.

    Every parser sets the default `command_name` to its `prog`; a subcommand's default overrides its parent's, so
    the parsed namespace names the command that ran (`vita eval mme`), for the one-line errors that come later.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.set_defaults(command_name=self.prog)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", Subcommand)
        return super().add_subparsers(**kwargs)


class Subcommand(ArgumentParser):
    """A subcommand's parser (`vita ask`, `vita eval mme`). argparse hands the arguments a subcommand does not know
    back to the top parser, whose error would then name `vita`; this one refuses them itself, so the error names
    the subcommand: `vita ask: error: unrecognized arguments: --bogus`."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse `type` for an integer in [low, high]: anything else is a usage error naming the flag and the
    range (`argument --port: 99999 is outside [1, 65535]`), exit 2."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{number} is outside [{low}, {high}]")
        return number

    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float, *, open_low: bool = False) -> Callable[[str], float]:
    """An argparse `type` for a number in [low, high] ((low, high] with `open_low`): anything else is a usage error
    naming the flag and the range, exit 2."""
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not (low < number if open_low else low <= number) or not number <= high:
            raise argparse.ArgumentTypeError(f"{number} is outside {'(' if open_low else '['}{low}, {high}]")
        return number

    parse.__name__ = "number"
    return parse
