"""`amppatch apply`: insert prefetches at sites (and/or the huge-page lever), commit them on a branch, build A
and B, run the gate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from amppatch.cli import add_flag_argument
from amppatch.cli.cmd_build import add_build_arguments, build_options_from_args, load_like
from amppatch.errors import UsageError
from amppatch.patch import DEFAULT_DISTANCE, DEFAULT_HINT, ApplyOptions, apply, format_summary
from amppatch.proc import progress

NAME = "apply"
HELP = ("insert __builtin_prefetch at kernel loops (from a profile or --site) and/or the huge-page lever, commit on "
        "a branch, build A/B, gate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, required=True, help="llama.cpp source tree (a clean git repository)")
    source = parser.add_argument_group("sites")
    source.add_argument("--profile", type=Path, help="profile.json from `amppatch profile` (its `sites`)")
    source.add_argument("--site", action="append", default=[], metavar="SPEC",
                        help="FUNCTION[:LOOP[:STREAM]], repeatable; LOOP is an ordinal (0, 1, ...) or L<line>, "
                             "STREAM an address expression (x[ib]), a base pointer (x) or '*' for all; "
                             "defaults: the first live streaming loop, the stream of the first pointer argument")
    source.add_argument("--learned", type=Path, action="append", default=[], metavar="JSON",
                        help="learned.json from `amppatch tune`: bake its kept sites' tuned distance and hint "
                             "in as constants; repeatable (tune results of different kernels in one build)")
    source.add_argument("--distance", type=int, metavar="BYTES",
                        help=f"bytes ahead along the stream (default {DEFAULT_DISTANCE}; overrides the profile)")
    source.add_argument("--hint", type=int, choices=(0, 1, 2, 3),
                        help=f"__builtin_prefetch locality 0-3 (default {DEFAULT_HINT}; overrides the profile)")
    source.add_argument("--tunable", action="store_true",
                        help="read each site's distance and hint once from the environment (for `amppatch tune`)")
    source.add_argument("--hugepages", action="store_true",
                        help="also (or, without sites, only) map the model's weights on file-backed transparent huge "
                             "pages (the huge-page lever, same commit); the gate measures the share on huge pages")
    parser.add_argument("--dry-run", action="store_true", help="print the unified diff; change nothing")
    parser.add_argument("--no-build", action="store_true", help="commit and export only; do not build A and B")
    parser.add_argument("--like", type=Path, metavar="BUILD",
                        help="build both arms with the options of this existing build (its dir or manifest)")
    parser.add_argument("--compile-db", type=Path, metavar="PATH",
                        help="compile_commands.json (or its build dir) that decides live #if branches; default: "
                             "the baseline build's (without building: a cached build with the same options, "
                             "else a CMake configure-only run)")
    parser.add_argument("--no-gate", action="store_true", help="skip the correctness gate (not recommended)")
    parser.add_argument("--gate-model", type=Path, metavar="GGUF",
                        help="model for the gate (default: a tiny synthetic model of the kernel's weight type)")
    add_flag_argument(parser, "--gate-arg", action="append", default=[], metavar="ARG",
                      help="extra llama-completion/llama-perplexity argument for the gate, repeatable "
                           "(e.g. --gate-arg -ub --gate-arg 1 where AMX tiles fault)")
    parser.add_argument("-o", "--out", type=Path, metavar="DIR",
                        help="where <id>.patch and <id>.json go (default ./amppatch-out)")
    add_build_arguments(parser)


def run(args: argparse.Namespace) -> Path | str | None:
    from amppatch.build import with_options
    from amppatch.inputs import check_gguf, check_out_dir, creating_dir
    from amppatch.source.compiledb import load_compile_db

    # Checked before anything is committed or built: a bad -o or input file would otherwise surface only
    # after the branch exists and A and B were built. The default ./amppatch-out is shared by every apply.
    if not args.dry_run:
        args.out = check_out_dir(args.out or Path.cwd() / "amppatch-out")
    if args.gate_model is not None:
        check_gguf(args.gate_model, what="gate model")
    if args.compile_db is not None:
        load_compile_db(args.compile_db)

    if args.like is not None and (args.cflags or args.kernel_cflags or args.define or args.pgo or args.amx_batch1):
        raise UsageError("--like copies an existing build's options; it cannot be combined with build flags",
                         next_step="drop --like or the --cflags/--define/--pgo options")
    # Also without building: the options decide which #if branches are live (through their compile commands).
    if args.like is not None:
        build_options = with_options(load_like(args.like), repo=args.repo)
    else:
        build_options = build_options_from_args(args)
    options = ApplyOptions(
        repo=args.repo,
        sites=tuple(args.site),
        profile=args.profile,
        learned=tuple(args.learned),
        distance=args.distance,
        hint=args.hint,
        tunable=args.tunable,
        dry_run=args.dry_run,
        build=not args.no_build,
        build_options=build_options,
        like=load_like(args.like).dir if args.like is not None else None,
        out=args.out,
        compile_db=args.compile_db,
        gate=not args.no_gate,
        gate_model=args.gate_model,
        gate_args=tuple(args.gate_arg),
        hugepages=args.hugepages,
    )
    if args.dry_run:
        result = apply(options)
    else:
        # A failed apply (disk full while writing the manifest, a patch that does not build, Ctrl-C) removes its
        # branch and files; the -o directory it needed is removed too when it created it and it stayed empty,
        # and so it is after an apply that found nothing to do.
        with creating_dir(args.out, keep_empty=False):
            result = apply(options)
    summary = format_summary(result)
    if summary:
        progress(summary)
    if args.dry_run:
        sys.stdout.write(result.diff)
        return None
    if result.manifest_path is None:
        return None
    progress(f"apply: branch {result.branch} ({result.commit[:12] if result.commit else '?'}), "
             f"patch {result.patch_path}")
    if result.builds:
        progress(f"apply: A (baseline) {result.builds['a']}")
        progress(f"apply: B (patched)  {result.builds['b']}")
        if result.gate:
            hits = ", ".join(f"{f} ran {n} times" for f, n in result.gate.get("function_hits", {}).items())
            progress(f"apply: gate passed: {result.gate.get('detail')}; {hits}")
        pages = result.manifest.hugepages if result.manifest is not None else None
        if pages:
            progress(f"apply: huge pages: {pages['status']}: {pages['note']}")
        repack = "::--repack 0" if repack_off_keeps_sites_running([s.function for s in result.sites]) else ""
        model = (result.gate or {}).get("model", "MODEL.gguf")
        progress(f"next: amppatch ab-test --a '{result.builds['a']}{repack}' --b '{result.builds['b']}{repack}' "
                 f"-m {model}   (use a 1B model for timing, e.g. `amppatch model synth --shape 1b`)")
    return result.manifest_path


def repack_off_keeps_sites_running(functions: list[str]) -> bool:
    """Whether the suggested race may add `--repack 0`: it makes the vec_dot kernels run where the CPU would
    repack the weights, but it switches the repack GEMVs/GEMMs off — so never when a patched site is one."""
    repacked = any("gemv" in f or "gemm" in f for f in functions)
    return not repacked and any(f.startswith("ggml_vec_dot_") for f in functions)
