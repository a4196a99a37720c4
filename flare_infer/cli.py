"""What the inference commands share: one help style, and one line instead of a traceback.

    python -m flare_infer {predict,evaluate,preview,profile} --help

Help: every option shows its default and its choices as `a|b|c` (`HelpFormatter`). Errors: a command that
fails prints `error: <what was expected, what was found, what to do>` on one line and exits 2 for a usage
error (`UsageError`: a missing folder, a file given on the command line that cannot be used) or 1 for anything
else; with `--debug`, or the environment variable FLARE_DEBUG=1, the traceback is shown instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

DEBUG_ENV = "FLARE_DEBUG"
EXIT_FAILED, EXIT_USAGE = 1, 2


class UsageError(Exception):
    """Bad arguments or input named on the command line: one line, exit status 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; each option's default appended as ` (default: X)` unless its help says it;
    choices shown as `a|b|c`."""

    def _metavar_formatter(self, action: argparse.Action, default_metavar: str):
        if action.metavar is None and action.choices is not None:
            shown = choices([str(c) for c in action.choices])
            return lambda size: (shown,) * size
        return super()._metavar_formatter(action, default_metavar)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if isinstance(action, argparse.BooleanOptionalAction):  # python < 3.13 appends "%(default)s" itself
            text = text.replace(" (default: %(default)s)", "")
            if action.default is not None and "default" not in text:
                flag = action.option_strings[0] if action.default else action.option_strings[-1]
                text += f" (default: {flag})"
            return text
        hidden = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        shown = not hidden and action.option_strings
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def choices(values: Sequence[str]) -> str:
    """`("auto", "cuda", "cpu")` -> `auto|cuda|cpu`: choices as help and metavars show them."""
    return "|".join(values)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """--debug on the command line or FLARE_DEBUG set to anything but '' or 0."""
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (or set {DEBUG_ENV}=1)")  # fmt: skip


def one_line_errors(run: Callable[[], int], *, debug: bool) -> int:
    """run()'s exit status; an exception becomes one `error: ...` line on stderr (2 for UsageError, else 1).

    With debug the exception propagates (its traceback is the point). KeyboardInterrupt always propagates.
    """
    try:
        return run()
    except Exception as e:
        if debug:
            raise
        usage = isinstance(e, UsageError)
        reason = str(e).strip().splitlines()
        text = " ".join(line.strip() for line in reason if line.strip()) or type(e).__name__
        if not usage and not isinstance(e, (OSError, ValueError)):
            text = f"{type(e).__name__}: {text}"
        hint = "" if usage else f" (run with --debug or {DEBUG_ENV}=1 for the traceback)"
        print(f"error: {text}{hint}", file=sys.stderr)
        return EXIT_USAGE if usage else EXIT_FAILED


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, else argparse's usage error naming the option."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, found {value}")
        return value

    return parse
