"""Parse + plan + render over every ggml CPU backend source (goal: <= 5 s).

    python bench/parse_bench.py [LLAMA_TREE]     (default: the pinned tree from `amppatch llama fetch`)

Pure work only: tree-sitter parses (with macro blanking) of every .c/.cpp/.h file under ggml/src/ggml-cpu,
loop/stream analysis of every function, one planned site per loop that walks a stream, and its rendered
prefetch. (Preprocessing and the sizeof probe are one compiler run per patched file, timed separately by
`amppatch apply`; they are not part of this number.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from amppatch.patch import PlannedSite, SiteRequest, environment, render_site
from amppatch.source import SOURCE_SUFFIXES, default_stream
from amppatch.source.loops import analyze_loops
from amppatch.source.parse import default_grammar, function_definitions, function_name, parse_bytes


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        repo = Path(argv[1])
    else:
        from amppatch.workspace import FetchOptions, fetch_llama

        repo = fetch_llama(FetchOptions())
    root = repo / "ggml" / "src" / "ggml-cpu"
    files = sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES)
    env = environment()
    start = time.perf_counter()
    functions = loops = sites = rendered_bytes = 0
    for path in files:
        parsed = parse_bytes(path.read_bytes(), default_grammar(path), path)
        for fn in function_definitions(parsed.root):
            name = function_name(fn) or "?"
            functions += 1
            for loop in analyze_loops(parsed, fn):
                loops += 1
                stream = default_stream(loop)
                if stream is None or loop.parse_error:
                    continue
                site = PlannedSite(SiteRequest(name), name, loop, stream, str(path.relative_to(repo)),
                                   f"{name}#{loop.ordinal} {stream.expression}", f"{name}_l{loop.ordinal}", 1, ())
                rendered_bytes += len(render_site(site, tunable=False, line_size=64, env=env))
                sites += 1
    seconds = time.perf_counter() - start
    print(f"{len(files)} files, {functions} functions, {loops} loops, {sites} sites planned+rendered "
          f"({rendered_bytes} bytes) in {seconds:.2f} s (goal <= 5 s)")
    return 0 if seconds <= 5.0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
