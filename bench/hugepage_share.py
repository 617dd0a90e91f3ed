"""How much of a model's weights sits on huge pages once llama.cpp has loaded it — stock against the build
carrying amppatch's huge-page lever — for each state the file's page cache can be in: cold (not cached),
cached in small pages (4 KiB reads in random order, as a backup or a checksum tool leaves it) and cached by
the previous run. Each run is `llama-bench -p 0 -n 4` watched through /proc/PID/smaps (`pages.measure_share`).

    python -m bench.hugepage_share --model M --stock BUILD --lever BUILD
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

from amppatch.build import load_build
from amppatch.pages import measure_share


def drop_cache(model: Path) -> None:
    """Evict the file's clean pages (the next reader starts cold)."""
    fd = os.open(model, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cache_small(model: Path, seed: int = 0) -> None:
    """Cache the whole file in 4 KiB pages: one-byte reads of every page in random order defeat readahead,
    which would otherwise allocate large folios."""
    drop_cache(model)
    fd = os.open(model, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        offsets = list(range(0, os.fstat(fd).st_size, 4096))
        random.Random(seed).shuffle(offsets)
        for offset in offsets:
            os.pread(fd, 1, offset)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--stock", type=Path, required=True, help="build directory of stock llama.cpp")
    parser.add_argument("--lever", type=Path, required=True, help="build directory carrying the huge-page lever")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    builds = {"stock": load_build(args.stock), "lever": load_build(args.lever)}
    steps = [("cold", "stock", drop_cache), ("cold", "lever", drop_cache),
             ("cached small", "stock", cache_small), ("cached small", "lever", cache_small),
             ("after the lever's run", "stock", None)]
    print("| page cache before the run | build | weights on huge pages | FilePmdMapped | seconds |")
    print("|---|---|---|---|---|")
    for state, name, prepare in steps:
        if prepare is not None:
            prepare(args.model)
        start = time.monotonic()
        share, _ = measure_share(builds[name], args.model, threads=args.threads, tokens=4)
        print(f"| {state} | {name} | {share.share:.1%} | {share.file_pmd_bytes >> 20} MiB | "
              f"{time.monotonic() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
