"""`amppatch clean`: show and remove amppatch's caches, worktrees and branches."""

from __future__ import annotations

import argparse
from pathlib import Path

from amppatch.clean import CleanOptions, execute_clean, plan_clean
from amppatch.paths import CACHE_KINDS, cache_root

NAME = "clean"
HELP = "remove amppatch's builds, models, trees, worktrees, caches and branches (sizes are shown first)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", action="append", choices=sorted(CACHE_KINDS), dest="kinds",
                        help="only this kind, repeatable (default: all kinds)")
    parser.add_argument("--repo", type=Path, help="also delete this repository's amppatch/* branches")
    parser.add_argument("--dry-run", action="store_true", help="only show what would be removed")


def run(args: argparse.Namespace) -> Path:
    options = CleanOptions(kinds=tuple(args.kinds) if args.kinds else tuple(CACHE_KINDS), repo=args.repo,
                           dry_run=args.dry_run)
    items = plan_clean(options)
    total = sum(i.bytes for i in items)
    for item in items:
        print(f"{item.bytes / 2**20:10.1f} MiB  {item.kind:<9}  {item.path}")
    verb = "would remove" if options.dry_run else "removing"
    print(f"{verb} {len(items)} item(s), {total / 2**20:.1f} MiB")
    if not options.dry_run:
        execute_clean(items)
    return cache_root()
