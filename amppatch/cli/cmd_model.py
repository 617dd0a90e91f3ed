"""`amppatch model synth`: a synthetic llama GGUF of a real shape."""

from __future__ import annotations

import argparse
from pathlib import Path

from amppatch.build import load_build
from amppatch.model import ALIASES, PRESETS, SHAPES, SynthOptions, synth_model

NAME = "model"
HELP = "make synthetic llama-architecture GGUF models (random weights, real shapes and tokenizer)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    synth = sub.add_parser("synth", help="write (or reuse) a synthetic model and print its path")
    synth.add_argument("--shape", choices=list(SHAPES), default="tiny",
                       help="tiny (tests, ~1 s), tiny-moe (tiny with 4 experts, 2 active), 1b (TinyLlama 1.1B "
                       "shape), 3b (Llama-3.2-3B-like), 8b (Llama-3-8B), moe (Mixtral's layout at 1B active "
                       "of 3.5B: 8 experts, 2 active) (default tiny)")
    synth.add_argument("--type", default="q8_0", metavar="TYPE",
                       help=f"llama-quantize preset, any case: {', '.join(p for p in PRESETS.values())} "
                       f"({', '.join(a.upper() for a in ALIASES)} are the _M mixes) (default q8_0)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same file (default 0)")
    synth.add_argument("-o", "--output", type=Path, help="also copy the model to this path")
    synth.add_argument("--repo", type=Path, help="llama.cpp tree for the tokenizer and llama-quantize "
                       "(default: the pinned fetched tree)")
    synth.add_argument("--build", type=Path, help="build whose llama-quantize to use (default: build --repo)")


def run(args: argparse.Namespace) -> Path:
    from amppatch.inputs import check_out_file

    if args.output is not None:
        args.output = check_out_file(args.output, example="model.gguf")
    bld = load_build(args.build) if args.build else None
    return synth_model(SynthOptions(shape=args.shape, type=args.type, seed=args.seed, out=args.output,
                                    build=bld, repo=args.repo))
