"""The correctness gate: before anyone times B against A, B must compute what A computes.

Two modes:
- ``identical`` — A and B run the same kernels (a prefetch patch, PGO, other compiler flags): the greedy
  llama-completion output for a fixed prompt and seed must be byte-identical and llama-perplexity must
  print the same values (every chunk and the final estimate) on a fixed text.
- ``tolerance`` — A and B run different kernels by design (no repacking, another thread split): floating
  point sums in another order, so tokens may legitimately differ; perplexity must agree within a stated
  relative tolerance.

A crash of A is the environment's problem (e.g. AMX tiles that fault on this machine: run with ``-ub 1``)
and is raised as a SubprocessError naming the signal, never blamed on B. A crash or difference of B is a
CorrectnessError.
"""

from __future__ import annotations

import random
import re
import shlex
import signal
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from amppatch.errors import CorrectnessError, SubprocessError, UsageError
from amppatch.inputs import check_gguf
from amppatch.proc import describe_returncode, progress, run

if TYPE_CHECKING:
    from amppatch.build import Build

MODES = ("identical", "tolerance")
DEFAULT_PROMPT = "The history of the city begins with a small market by the river, where"

# Words for the perplexity text. Any fixed text works (the models are random); ordinary words keep the
# token count close to the word count for every tokenizer.
_WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his",
    "her", "which", "or", "an", "be", "this", "are", "were", "had", "have", "not", "but", "it", "they", "one",
    "all", "their", "has", "been", "its", "new", "more", "when", "who", "would", "there", "first", "after",
    "also", "two", "into", "other", "time", "can", "only", "many", "some", "these", "may", "over", "years",
    "city", "river", "market", "people", "school", "north", "south", "water", "house", "small", "large",
    "early", "later", "state", "world", "music", "light", "stone", "road",
)


@dataclass(frozen=True)
class GateOptions:
    model: Path
    mode: str = "identical"
    prompt: str = DEFAULT_PROMPT
    n_predict: int = 24
    seed: int = 42
    threads: int = 1
    ctx: int = 128
    ppl_chunks: int = 2
    ppl_rel_tolerance: float = 0.01
    extra_args: tuple[str, ...] = ()
    timeout: float = 900.0


@dataclass(frozen=True)
class GateResult:
    mode: str
    passed: bool
    tokens_a: str
    tokens_b: str
    ppl_a: float
    ppl_b: float
    detail: str
    commands: tuple[tuple[str, ...], ...] = field(default_factory=tuple)
    chunks_a: tuple[float, ...] = ()
    chunks_b: tuple[float, ...] = ()

    def to_json(self) -> dict:
        data = asdict(self)
        data["commands"] = [list(c) for c in self.commands]
        return data


def perplexity_text(seed: int, n_words: int) -> str:
    """A deterministic pseudo-text of `n_words` words (same seed, same text, on every machine)."""
    rng = random.Random(seed)
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    lines = [" ".join(words[i : i + 12]).capitalize() + "." for i in range(0, len(words), 12)]
    return "\n".join(lines) + "\n"


_FINAL_RE = re.compile(r"Final estimate: PPL = ([0-9.eE+-]+|nan|inf)")
_CHUNK_RE = re.compile(r"\[(\d+)\]([0-9.eE+-]+|nan|inf|-nan)")


def parse_perplexity(output: str) -> tuple[float, tuple[str, ...]]:
    """The final PPL and the per-chunk values as printed (strings, so `identical` compares digits)."""
    m = _FINAL_RE.search(output)
    if not m:
        raise ValueError("no 'Final estimate: PPL' line in llama-perplexity output")
    chunks = tuple(v for _, v in _CHUNK_RE.findall(output))
    return float(m.group(1)), chunks


def _completion_argv(binary: Path, options: GateOptions, side_args: Sequence[str]) -> list[str]:
    return [
        str(binary), "-m", str(options.model), "-p", options.prompt, "-n", str(options.n_predict),
        "--temp", "0", "--seed", str(options.seed), "-t", str(options.threads), "-c", str(options.ctx * 2),
        "-no-cnv", "--no-display-prompt", "--ignore-eos", "--no-warmup", "--simple-io",
        *options.extra_args, *side_args,
    ]  # fmt: skip


def _perplexity_argv(binary: Path, options: GateOptions, text: Path, side_args: Sequence[str]) -> list[str]:
    return [
        str(binary), "-m", str(options.model), "-f", str(text), "-c", str(options.ctx),
        "--chunks", str(options.ppl_chunks), "-t", str(options.threads), "--seed", str(options.seed),
        "--no-warmup", *options.extra_args, *side_args,
    ]  # fmt: skip


@dataclass(frozen=True)
class _SideRun:
    tokens: str
    ppl: float
    chunks: tuple[str, ...]
    commands: tuple[tuple[str, ...], ...]


class _Crash(Exception):
    def __init__(self, what: str, returncode: int, tail: str, argv: Sequence[str]) -> None:
        super().__init__(what)
        self.what = what
        self.returncode = returncode
        self.tail = tail
        self.argv = tuple(argv)


# llama.cpp's tools print through an asynchronous logger whose singleton is deliberately never destroyed
# (llama.cpp issue 22142), so the last queued lines — the end of the generated text — are sometimes lost
# when the process exits (seen here: ~1 run in 20 on a tiny model, once the whole output). Both tools log a
# known last line after their result through the same ordered queue; a run without it is repeated.
_COMPLETE_MARKERS = {"llama-completion": "total time =", "llama-perplexity": "Final estimate: PPL"}
_ATTEMPTS = 6


def _run_complete(tool: str, argv: list[str], env: Mapping[str, str], timeout: float, label: str) -> str:
    """Run a gate tool until its output is complete; returns stdout + a separator + stderr."""
    marker = _COMPLETE_MARKERS[tool]
    tail = ""
    for _ in range(_ATTEMPTS):
        done = run(argv, env=env, timeout=timeout, check=False, what=f"{tool} ({label})")
        tail = "\n".join(done.stderr.splitlines()[-15:])
        if done.returncode != 0:
            raise _Crash(tool, done.returncode, tail, argv)
        if marker in done.stderr or marker in done.stdout:
            return done.stdout + _STREAM_SEPARATOR + done.stderr
    raise _Crash(
        tool, 0, f"output incomplete in {_ATTEMPTS} runs (no {marker!r} line: llama.cpp's logger lost its last "
        f"lines at exit every time)\n{tail}", argv,
    )


_STREAM_SEPARATOR = "\n\x00amppatch-stderr\x00\n"


def _run_side(
    build: Build, label: str, options: GateOptions, text: Path, side_args: Sequence[str], env: Mapping[str, str]
) -> _SideRun:
    from amppatch.build import runtime_args

    # What the build itself needs (-ub 1 for an --amx-batch1 build), unless the side already sets it.
    needed = runtime_args(build, (*options.extra_args, *side_args))
    flags = {a.split("=", 1)[0] for a in (*options.extra_args, *side_args)}
    side_args = (*side_args, *needed)
    completion = _completion_argv(build.binary("llama-completion"), options, side_args)
    ppl_args = side_args
    if needed and not flags & {"-b", "--batch-size"}:
        # llama-perplexity batches several sequences when the batch holds several contexts; a micro-batch
        # then carries one token per sequence, not one in all: one context per batch keeps it at one.
        ppl_args = (*side_args, "-b", str(options.ctx))
    perplexity = _perplexity_argv(build.binary("llama-perplexity"), options, text, ppl_args)
    progress(f"gate: {label}: greedy completion ({options.n_predict} tokens) ...")
    tokens = _run_complete("llama-completion", completion, env, options.timeout, label).split(_STREAM_SEPARATOR)[0]
    progress(f"gate: {label}: perplexity ({options.ppl_chunks} chunks of {options.ctx}) ...")
    output = _run_complete("llama-perplexity", perplexity, env, options.timeout, label)
    try:
        ppl, chunks = parse_perplexity(output.replace(_STREAM_SEPARATOR, "\n"))
    except ValueError as exc:
        raise _Crash("llama-perplexity", 0, str(exc), perplexity) from None
    return _SideRun(tokens, ppl, chunks, (tuple(completion), tuple(perplexity)))


def _first_difference(a: str, b: str) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            lo = max(0, i - 20)
            return f"first difference at character {i}: A {a[lo : i + 20]!r} vs B {b[lo : i + 20]!r}"
    return f"one output is a prefix of the other (A {len(a)} characters, B {len(b)})"


def run_gate(
    a: Build,
    b: Build,
    options: GateOptions,
    *,
    args_a: Sequence[str] = (),
    args_b: Sequence[str] = (),
    env_a: Mapping[str, str] | None = None,
    env_b: Mapping[str, str] | None = None,
) -> GateResult:
    """Check that B computes what A computes; returns the evidence or raises.

    `args_a`/`args_b` are extra llama-completion/llama-perplexity flags for one side only (an arm that runs
    e.g. without repacking); `env_a`/`env_b` extra environment variables for one side.
    """
    from amppatch.build import run_env

    if options.mode not in MODES:
        raise UsageError(f"unknown gate mode {options.mode!r}", next_step=f"use one of {', '.join(MODES)}")
    check_gguf(options.model, what="gate model")
    if options.ppl_rel_tolerance < 0:
        raise UsageError("the perplexity tolerance must not be negative", next_step="e.g. 0.01 for 1 %")
    chunks = max(2, options.ppl_chunks)  # llama-perplexity wants at least 2 * ctx tokens
    options = replace(options, ppl_chunks=chunks, model=Path(options.model))
    with tempfile.TemporaryDirectory(prefix="amppatch-gate-") as tmp:
        text = Path(tmp) / "gate-text.txt"
        # Every word is at least one token, so this many words always covers ctx * chunks tokens.
        text.write_text(perplexity_text(options.seed, options.ctx * chunks + 64))
        env_for_a = {**run_env(a), **(env_a or {})}
        env_for_b = {**run_env(b), **(env_b or {})}
        try:
            ra = _run_side(a, "A", options, text, args_a, env_for_a)
        except _Crash as crash:
            raise SubprocessError(
                f"the correctness gate could not run the baseline (A): {crash.what} "
                f"{describe_returncode(crash.returncode) if crash.returncode else 'gave no result'}; "
                "this is a problem of the environment or the baseline build, not of B",
                next_step=(
                    "on a CPU whose AMX tiles fault run the gate with `-ub 1` (gate extra args); "
                    if crash.returncode == -signal.SIGILL
                    else "run the command by hand to see why; "
                )
                + f"command: {shlex.join(crash.argv)}",
                returncode=crash.returncode,
                output_tail=crash.tail,
            ) from None
        try:
            rb = _run_side(b, "B", options, text, args_b, env_for_b)
        except _Crash as crash:
            raise CorrectnessError(
                f"B failed where A ran: {crash.what} "
                f"{describe_returncode(crash.returncode) if crash.returncode else 'gave no result'}\n{crash.tail}",
                next_step=f"reproduce with: {shlex.join(crash.argv)}",
            ) from None
    commands = ra.commands + rb.commands
    rel = abs(rb.ppl - ra.ppl) / abs(ra.ppl) if ra.ppl else float("inf")
    if options.mode == "identical":
        same_tokens = ra.tokens == rb.tokens
        same_ppl = ra.chunks == rb.chunks and ra.ppl == rb.ppl
        passed = same_tokens and same_ppl
        if passed:
            detail = (
                f"identical: {options.n_predict} greedy tokens equal, perplexity {ra.ppl:.4f} equal "
                f"in all {len(ra.chunks)} chunks"
            )
        else:
            parts = []
            if not same_tokens:
                parts.append("greedy tokens differ (" + _first_difference(ra.tokens, rb.tokens) + ")")
            if not same_ppl:
                parts.append(
                    f"perplexity differs: A {ra.ppl:.4f} {list(ra.chunks)} vs B {rb.ppl:.4f} {list(rb.chunks)}"
                )
            detail = "; ".join(parts)
    else:
        passed = rel <= options.ppl_rel_tolerance
        tokens_note = "greedy tokens equal" if ra.tokens == rb.tokens else "greedy tokens differ (allowed)"
        detail = (
            f"tolerance: perplexity A {ra.ppl:.4f} vs B {rb.ppl:.4f}, relative difference {rel:.2e} "
            f"{'<=' if passed else '>'} {options.ppl_rel_tolerance:g}; {tokens_note}"
        )
    result = GateResult(
        mode=options.mode,
        passed=passed,
        tokens_a=ra.tokens,
        tokens_b=rb.tokens,
        ppl_a=ra.ppl,
        ppl_b=rb.ppl,
        detail=detail,
        commands=commands,
        chunks_a=tuple(float(c) for c in ra.chunks),
        chunks_b=tuple(float(c) for c in rb.chunks),
    )
    if not passed:
        error = CorrectnessError(
            f"correctness gate ({options.mode}) failed: {detail}",
            next_step="B does not compute what A computes; fix the patch (or, for arms that run different "
            "kernels by design, use the tolerance mode)",
        )
        error.gate_result = result  # type: ignore[attr-defined]  # the evidence, for callers that record it
        raise error
    progress(f"gate: passed ({detail})")
    return result
