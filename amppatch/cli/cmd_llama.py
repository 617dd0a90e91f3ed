"""`amppatch llama fetch`: llama.cpp's source as a git repository, from the package index."""

from __future__ import annotations

import argparse
from pathlib import Path

from amppatch.workspace import OLDEST_SUPPORTED_VERSION, PINNED_VERSION, FetchOptions, fetch_llama

NAME = "llama"
HELP = "get llama.cpp's source tree (from the llama-cpp-python source distribution)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="llama_command", metavar="ACTION", required=True)
    fetch = sub.add_parser("fetch", help="fetch (or reuse the cached) llama.cpp tree and print its path")
    fetch.add_argument("--version", default=PINNED_VERSION,
                       help=f"llama-cpp-python version whose vendor/llama.cpp to use (default {PINNED_VERSION}; "
                            f"the oldest supported is {OLDEST_SUPPORTED_VERSION})")
    fetch.add_argument("--dest", type=Path, help="also clone the tree there (default: use the cached tree)")


def run(args: argparse.Namespace) -> Path:
    from amppatch.inputs import check_out_dir

    if args.dest is not None:  # a file, a read-only or full filesystem: refused before the download and clone
        args.dest = check_out_dir(args.dest, flag="--dest")
    return fetch_llama(FetchOptions(version=args.version, dest=args.dest))
