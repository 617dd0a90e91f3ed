"""Command line: parses, dispatches, prints. Each command lives in its own ``cmd_*`` module with
``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args)``; ``run`` returns the main result path,
which is printed as the last line of stdout so scripts can use it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from amppatch import __version__
from amppatch.errors import AmppatchError


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
    parser = argparse.ArgumentParser(
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args._run(args)
    except AmppatchError as error:
        print(f"amppatch: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("amppatch: interrupted", file=sys.stderr)
        return 130
    if result is not None:
        print(result)
    return 0
