"""`amppatch build`: an out-of-tree, cached CMake build of llama.cpp's tools."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from amppatch.build import DEFAULT_TARGETS, Build, BuildOptions, build
from amppatch.cli import add_flag_argument
from amppatch.errors import UsageError

NAME = "build"
HELP = ("build llama-bench, llama-completion (llama-cli in older trees), llama-quantize and llama-perplexity "
        "(cached by commit + flags)")


def parse_define(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--define {text!r} is not KEY=VALUE", next_step="e.g. --define GGML_NATIVE=OFF")
    return key, value


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Build options shared by every command that builds (build, apply)."""
    add_flag_argument(parser, "--cflags", default="", help="extra C/C++ flags for every target")
    add_flag_argument(parser, "--kernel-cflags", default="",
                        help="extra flags for the ggml CPU backend only (e.g. -fprefetch-loop-arrays)")
    parser.add_argument("--define", action="append", default=[], metavar="KEY=VALUE",
                        help="extra CMake option, repeatable (e.g. GGML_NATIVE=OFF GGML_AVX512=ON)")
    parser.add_argument("--pgo", action="store_true",
                        help="profile-guided build of the CPU backend: instrument, train, rebuild")
    parser.add_argument("--pgo-model", type=Path, action="append", default=[],
                        help="model for the PGO training run, repeatable: one run per model (default: the tiny "
                             "synthetic q8_0 model)")
    parser.add_argument("--allow-faulting-isa", action="store_true",
                        help="keep ISA features that the probe saw fault (default: build without them)")
    parser.add_argument("--amx-batch1", action="store_true",
                        help="compile the AMX buffer (amx/mmq.cpp) for a CPU without AMX: its batch-1 kernels "
                             "need AVX512-VNNI only; runs preload a shim granting the AMX permission request "
                             "and use -ub 1 (the tile kernels would fault)")


def build_options_from_args(args: argparse.Namespace, **overrides: object) -> BuildOptions:
    pgo_models = tuple(args.pgo_model)
    if pgo_models and not args.pgo:
        raise UsageError("--pgo-model is the training model of a PGO build",
                         next_step="add --pgo (or drop --pgo-model)")
    if args.pgo and not pgo_models:
        from amppatch.model import SynthOptions, synth_model

        pgo_models = (synth_model(SynthOptions(shape="tiny", type="q8_0", repo=args.repo)),)
    values: dict[str, Any] = dict(  # Any: argparse values are untyped
        repo=args.repo,
        cflags=args.cflags,
        kernel_cflags=args.kernel_cflags,
        defines=tuple(parse_define(d) for d in args.define),
        pgo=args.pgo,
        pgo_models=pgo_models,
        allow_faulting_isa=args.allow_faulting_isa,
        amx_batch1=args.amx_batch1,
    )
    values.update(overrides)
    return BuildOptions(**values)


def load_like(path: Path) -> Build:
    """The build `--like BUILD` names, with the manifest keys its options are copied from (a manifest that
    passes load_build's check but lacks them was a KeyError/AttributeError traceback deep in the build)."""
    from amppatch.build import load_build
    from amppatch.inputs import BUILD_MANIFEST, check_json

    bld = load_build(path)
    where = bld.dir / "manifest.json"
    check_json(bld.manifest, where, BUILD_MANIFEST, require=("repo", "cmake_options{}"))
    for key in ("cflags", "kernel_cflags"):
        if not isinstance(bld.manifest.get(key, ""), str):
            raise UsageError(f"{where}: `{key}` is not a string of compiler flags",
                             next_step="pass a build made by `amppatch build` as --like")
    return bld


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, required=True, help="llama.cpp source tree (a git repository)")
    parser.add_argument("--ref", help="build this commit or branch (from amppatch's worktree) instead of HEAD")
    parser.add_argument("--name", help="a label for progress and the manifest (not part of the cache key)")
    parser.add_argument("--target", action="append", dest="targets", metavar="TARGET",
                        help=f"CMake target, repeatable (default: {' '.join(DEFAULT_TARGETS)}; each stands for "
                             "the program the tree declares for its role, e.g. llama-cli for llama-completion)")
    add_build_arguments(parser)


def run(args: argparse.Namespace) -> Path:
    options = build_options_from_args(args, ref=args.ref, name=args.name,
                                      targets=tuple(args.targets) if args.targets else DEFAULT_TARGETS)
    return build(options).dir
