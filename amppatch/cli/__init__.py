"""Command line: parses, dispatches, prints. Each command lives in its own ``cmd_*`` module with
``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args)``; ``run`` returns the main result path,
which is printed as the last line of stdout so scripts can use it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from amppatch import __version__
from amppatch.errors import AmppatchError

_FLAG_VALUE = "amppatch_flag_value"  # marks an option whose value is compiler or llama-bench flags


def add_flag_argument(parser: argparse.ArgumentParser, *names: str, **kwargs: Any) -> argparse.Action:
    """Declare an option whose value is compiler or llama-bench flags (`--kernel-cflags`, `--gate-arg`, ...).
    argparse takes a value that starts with '-' for an option of its own and stops with "expected one
    argument", so `--kernel-cflags -O2` would only work spelled `--kernel-cflags=-O2`; a parser of class
    `FlagParser` joins the two words of such an option before parsing, so both spellings work."""
    action = parser.add_argument(*names, **kwargs)
    setattr(action, _FLAG_VALUE, True)
    return action


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser that reads `--OPT VALUE` as `--OPT=VALUE` for the options declared with
    `add_flag_argument`. Subcommand parsers are of the same class (argparse's default), and each rewrites
    the words it is given, so the rewrite is in one place for every command."""

    # typeshed overloads parse_known_args on the namespace's class; amppatch only ever passes a Namespace
    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._join_flag_values(words), namespace)

    def _join_flag_values(self, words: list[str]) -> list[str]:
        takes_flags = {name for action in self._actions if getattr(action, _FLAG_VALUE, False)
                       for name in action.option_strings}
        if not takes_flags:
            return words
        out: list[str] = []
        i = 0
        while i < len(words):
            word = words[i]
            if word == "--":  # everything after it is positional (a command to run), kept as given
                out.extend(words[i:])
                break
            if word in takes_flags and i + 1 < len(words):
                value = words[i + 1]
                if value in self._option_string_actions:
                    # `--cflags --pgo` more likely lost its value than means the flag "--pgo": say so
                    self.error(f"{word} {value}: {value} is an option of this command; to pass it as the value "
                               f"of {word}, write {word}={value}")
                out.append(f"{word}={value}")
                i += 2
                continue
            out.append(word)
            i += 1
        return out


def _command_modules() -> list[ModuleType]:
    # Imported here so `amppatch --help` lists exactly the commands that exist.
    from amppatch.cli import (
        cmd_abtest,
        cmd_apply,
        cmd_build,
        cmd_clean,
        cmd_doctor,
        cmd_llama,
        cmd_model,
        cmd_profile,
        cmd_report,
        cmd_roofline,
        cmd_run,
        cmd_tune,
    )

    return [cmd_run, cmd_llama, cmd_build, cmd_model, cmd_profile, cmd_apply, cmd_tune, cmd_abtest, cmd_report,
            cmd_roofline, cmd_doctor, cmd_clean]


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="amppatch",
        description="Measured, reproducible software prefetching for llama.cpp's CPU kernels.",
    )
    parser.add_argument("--version", action="version", version=f"amppatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _command_modules():
        text = module.HELP.replace("%", "%%")  # argparse %-formats help strings ("95% CI")
        command = sub.add_parser(module.NAME, help=text, description=text)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def _is_symlink_loop(exc: BaseException) -> bool:
    import errno

    if isinstance(exc, OSError):
        return exc.errno == errno.ELOOP
    return str(exc).startswith("Symlink loop")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        # Ctrl-C while the command modules are still importing (a second or more on a loaded machine) is an
        # interruption like any other, not a KeyboardInterrupt traceback from inside an import.
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("amppatch: interrupted", file=sys.stderr)
        return 130
    try:
        result = args._run(args)
    except AmppatchError as error:
        print(f"amppatch: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("amppatch: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:
        # A path argument that is a symlink loop fails in Path.resolve() wherever a stage resolves it
        # (RuntimeError before Python 3.13, OSError ELOOP after): a usage error, not a traceback.
        if not _is_symlink_loop(exc):
            raise
        print(f"amppatch: error: {exc} — a path given on the command line is a symlink that points to itself; "
              "pass another path", file=sys.stderr)
        return 2
    if result is not None:
        print(result)
    return 0
