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
from typing import TYPE_CHECKING, Any

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


# Flags that make a run plain and quiet, passed where the program accepts them (older llama.cpp lacks some:
# llama-perplexity took --no-warmup only later).
COMPLETION_FLAGS = ("-no-cnv", "--no-display-prompt", "--ignore-eos", "--no-warmup", "--simple-io")
PERPLEXITY_FLAGS = ("--no-warmup",)


def _completion_argv(binary: Path, options: GateOptions, side_args: Sequence[str],
                     accepted: frozenset[str] | None = None) -> list[str]:
    from amppatch.build.accepted import supported

    return [
        str(binary), "-m", str(options.model), "-p", options.prompt, "-n", str(options.n_predict),
        "--temp", "0", "--seed", str(options.seed), "-t", str(options.threads), "-c", str(options.ctx * 2),
        *supported(COMPLETION_FLAGS, accepted), *options.extra_args, *side_args,
    ]  # fmt: skip


def _perplexity_argv(binary: Path, options: GateOptions, text: Path, side_args: Sequence[str],
                     accepted: frozenset[str] | None = None) -> list[str]:
    from amppatch.build.accepted import supported

    return [
        str(binary), "-m", str(options.model), "-f", str(text), "-c", str(options.ctx),
        "--chunks", str(options.ppl_chunks), "-t", str(options.threads), "--seed", str(options.seed),
        *supported(PERPLEXITY_FLAGS, accepted), *options.extra_args, *side_args,
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
_COMPLETE_MARKERS = {"completion": "total time =", "perplexity": "Final estimate: PPL"}
_ATTEMPTS = 6


def _run_complete(role: str, argv: list[str], env: Mapping[str, str], timeout: float, label: str) -> str:
    """Run a gate tool until its output is complete; returns stdout + a separator + stderr."""
    marker = _COMPLETE_MARKERS[role]
    tool = Path(argv[0]).name
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
    from amppatch.build.accepted import accepted_flags

    # What the build itself needs (-ub 1 for an --amx-batch1 build), unless the side already sets it.
    needed = runtime_args(build, (*options.extra_args, *side_args))
    flags = {a.split("=", 1)[0] for a in (*options.extra_args, *side_args)}
    side_args = (*side_args, *needed)
    completion = _completion_argv(build.program("completion"), options, side_args, accepted_flags(build, "completion"))
    ppl_args = side_args
    if needed and not flags & {"-b", "--batch-size"}:
        # llama-perplexity batches several sequences when the batch holds several contexts; a micro-batch
        # then carries one token per sequence, not one in all: one context per batch keeps it at one.
        ppl_args = (*side_args, "-b", str(options.ctx))
    perplexity = _perplexity_argv(build.program("perplexity"), options, text, ppl_args,
                                  accepted_flags(build, "perplexity"))
    progress(f"gate: {label}: greedy completion ({options.n_predict} tokens) ...")
    tokens = _run_complete("completion", completion, env, options.timeout, label).split(_STREAM_SEPARATOR)[0]
    progress(f"gate: {label}: perplexity ({options.ppl_chunks} chunks of {options.ctx}) ...")
    output = _run_complete("perplexity", perplexity, env, options.timeout, label)
    try:
        ppl, chunks = parse_perplexity(output.replace(_STREAM_SEPARATOR, "\n"))
    except ValueError as exc:
        raise _Crash(Path(perplexity[0]).name, 0, str(exc), perplexity) from None
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
    passed, detail = _verdict(options, ra, rb)
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


def _verdict(options: GateOptions, ra: _SideRun, rb: _SideRun) -> tuple[bool, str]:
    """Whether B passes against A in the gate's mode, and the sentence that says why."""
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
    return passed, detail


# ----------------------------------------------------------------------------------------------------------
# llama.cpp's own kernel test: test-quantize-fns checks every type's vec_dot (and quantizer) against its
# reference implementation on fixed data. The identical gate compares B with A on one model; this test
# covers inputs and row lengths that model does not reach.

QUANTIZE_FNS = "test-quantize-fns"
QUANTIZE_FNS_SOURCE = "tests/test-quantize-fns.cpp"
CPU_TRAITS_SOURCE = "ggml/src/ggml-cpu/ggml-cpu.c"


@dataclass(frozen=True)
class TraitsFunction:
    """A function named in ggml-cpu's type-traits table: the type it serves, its role there, and whether
    test-quantize-fns calls it (it tests only types that have a CPU quantizer, `from_float`)."""

    type: str
    role: str  # "vec_dot" or "from_float"
    tested: bool


_TRAITS_TABLE_RE = re.compile(r"type_traits_cpu\s*\[\s*GGML_TYPE_COUNT\s*\]\s*=\s*\{")
_TRAITS_ENTRY_RE = re.compile(r"\[\s*GGML_TYPE_([A-Z0-9_]+)\s*\]\s*=\s*\{(.*?)\}", re.DOTALL)
_TRAITS_FIELD_RE = re.compile(r"\.(vec_dot|from_float)\s*=\s*(?:\([A-Za-z_0-9 ]+\)\s*)?([A-Za-z_][A-Za-z_0-9]*)")


def cpu_type_traits(source: str) -> dict[str, TraitsFunction]:
    """Function name -> TraitsFunction, from the text of ggml-cpu.c's `type_traits_cpu` table (pure).

    Commented-out fields (`//.from_float = quantize_row_iq3_xxs,`) and NULL do not count: for such a type
    the test prints "Testing <type>" and checks nothing. Type names are ggml's (`q8_0`, `q4_K`, `f16`)
    lower-cased as the test prints them, except K types keep ggml's capital K."""
    m = _TRAITS_TABLE_RE.search(source)
    if not m:
        return {}
    body = re.sub(r"/\*.*?\*/", "", re.sub(r"//[^\n]*", "", source[m.end():]), flags=re.DOTALL)
    depth, end = 1, len(body)
    for i, ch in enumerate(body):  # the table ends at its own closing brace; later tables are not it
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            end = i
            break
    out: dict[str, TraitsFunction] = {}
    for entry in _TRAITS_ENTRY_RE.finditer(body[:end]):
        name = entry.group(1).lower().replace("_k", "_K")
        fields_ = {k: v for k, v in _TRAITS_FIELD_RE.findall(entry.group(2)) if v != "NULL"}
        tested = "from_float" in fields_
        for role, function in fields_.items():
            out.setdefault(function, TraitsFunction(name, role, tested))
    return out


def quantize_fns_applicability(function: str, traits: Mapping[str, TraitsFunction]) -> tuple[str | None, str]:
    """Whether test-quantize-fns exercises a patched function: (its type, how) when it does, else (None,
    why not). Pure; `traits` is cpu_type_traits() of the tree."""
    base = function.split("<", 1)[0].split("::", 1)[0]
    known = traits.get(base)
    if known is not None and known.tested:
        how = "dot product against the float reference" if known.role == "vec_dot" else "quantization error"
        return known.type, f"{known.role} of {known.type}: checked by its {how}"
    if known is not None:
        return None, (f"{known.role} of {known.type}, a type test-quantize-fns skips (no CPU quantizer, "
                      "from_float, to make its test data)")
    if "tinygemm" in base:
        return None, ("AMX buffer kernel (tinygemm_*): not a type-traits function, test-quantize-fns never "
                      "calls it")
    if re.search(r"(^|_)gem[mv](_|$)", base):
        return None, ("repack GEMV/GEMM kernel (CPU_REPACK buffer): not a type-traits function, "
                      "test-quantize-fns never calls it")
    if "flash_attn" in base:
        return None, "flash attention: test-quantize-fns checks no attention code"
    return None, "not a type's vec_dot or quantizer in ggml-cpu's type-traits table: test-quantize-fns never calls it"


_CHECK_RE = re.compile(r"^\s*(\S+) (.+?):\s+(ok|FAILED) \((.*)\)\s*$")


@dataclass(frozen=True)
class QuantizeFnsRun:
    types: tuple[str, ...]  # every "Testing <type>" line
    checks: dict[str, list[tuple[str, bool]]]  # type -> (check, passed) as printed with -v
    returncode: int

    @property
    def failed_types(self) -> list[str]:
        return sorted(t for t, cs in self.checks.items() if not all(ok for _, ok in cs))

    def passed_checks(self) -> int:
        return sum(ok for cs in self.checks.values() for _, ok in cs)

    def failed_checks(self) -> int:
        return sum(not ok for cs in self.checks.values() for _, ok in cs)


def parse_quantize_fns(output: str, returncode: int) -> QuantizeFnsRun:
    """test-quantize-fns -v output: `Testing q8_0` per type, then one `<type> <check>: ok|FAILED (<value>)`
    line per check (f32's vec_dot lines are `f32 vec_dot n=  17: ok (...)`)."""
    types: list[str] = []
    checks: dict[str, list[tuple[str, bool]]] = {}
    for line in output.splitlines():
        if line.startswith("Testing "):
            types.append(line.split(None, 1)[1].strip())
            continue
        m = _CHECK_RE.match(line)
        if m:
            name, check, verdict = m.group(1), " ".join(m.group(2).split()), m.group(3)
            checks.setdefault(name, []).append((check, verdict == "ok"))
    return QuantizeFnsRun(tuple(types), checks, returncode)


def _run_quantize_fns(parent: Build, timeout: float) -> tuple[QuantizeFnsRun, list[str], str]:
    from amppatch.build import build_side_target, run_env

    binary = build_side_target(parent, QUANTIZE_FNS, {"LLAMA_BUILD_TESTS": "ON"}, suffix="tests")
    argv = [str(binary), "-v"]
    # The parent's own libraries come first (run_env puts them there): the test then checks the very
    # libggml-cpu.so the gate compared, not just an identically compiled copy; the side build's libraries
    # only fill in what the parent did not build.
    env = run_env(parent)
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [env.get("LD_LIBRARY_PATH", ""), str(binary.parent)]))
    done = run(argv, env=env, timeout=timeout, check=False, what=QUANTIZE_FNS)
    if done.returncode < 0:
        raise _Crash(QUANTIZE_FNS, done.returncode, "\n".join(done.stderr.splitlines()[-15:]), argv)
    return parse_quantize_fns(done.stdout, done.returncode), argv, str(binary.parent.parent)


def kernel_test(a: Build, b: Build, functions: Sequence[str], *, timeout: float = 900.0) -> dict:
    """Run test-quantize-fns on B for the patched functions it covers; the gate section's record.

    status: "passed" (it ran; every covered type's checks passed in B), "not applicable" (no patched
    function is one it calls; each site says why) or "not available" (the tree has no such test). A type
    that fails in B but passes in A is a CorrectnessError naming it; a type that fails in A too is this
    llama.cpp's (or this CPU's) problem, recorded, not blamed on the patch."""
    from amppatch.build import source_text

    record: dict = {"test": QUANTIZE_FNS}
    programs = b.manifest.get("programs")
    if isinstance(programs, dict) and "kernel_test" in programs and programs["kernel_test"] != QUANTIZE_FNS:
        return {**record, "status": "not available",
                "reason": f"this llama.cpp tree declares no {QUANTIZE_FNS} target in tests/CMakeLists.txt"}
    if source_text(b, QUANTIZE_FNS_SOURCE) is None:
        return {**record, "status": "not available",
                "reason": f"this llama.cpp tree has no {QUANTIZE_FNS_SOURCE}"}
    traits = cpu_type_traits(source_text(b, CPU_TRAITS_SOURCE) or "")
    sites: dict[str, dict[str, Any]] = {}
    covered: dict[str, str] = {}
    for f in functions:
        type_, why = quantize_fns_applicability(f, traits)
        sites[f] = {"type": type_, "covered": type_ is not None, "reason": why}
        if type_ is not None:
            covered[f] = type_
    if not covered:
        return {**record, "status": "not applicable", "reason": "no patched function is one test-quantize-fns "
                "calls (see sites)", "sites": sites}
    progress(f"gate: {QUANTIZE_FNS} on B (covers {', '.join(sorted(covered))}) ...")
    try:
        run_b, argv, side_dir = _run_quantize_fns(b, timeout)
    except _Crash as crash:
        raise CorrectnessError(f"{QUANTIZE_FNS} crashed in B: {describe_returncode(crash.returncode)}\n{crash.tail}",
                               next_step=f"reproduce with: {shlex.join(crash.argv)}") from None
    wanted = {t.lower() for t in covered.values()}
    failed_b = {t.lower() for t in run_b.failed_types}
    if run_b.returncode != 0 and not failed_b:
        failed_b = {"(exit status without a FAILED line)"}
    preexisting: set[str] = set()
    if failed_b:
        progress(f"gate: {QUANTIZE_FNS} fails in B for {', '.join(sorted(failed_b))}; running it on A to see "
                 "whether the patch caused it ...")
        try:
            run_a, _, _ = _run_quantize_fns(a, timeout)
            preexisting = {t.lower() for t in run_a.failed_types}
            if run_a.returncode != 0 and not preexisting:
                preexisting = {"(exit status without a FAILED line)"}
        except _Crash:
            preexisting = set()
        new = sorted(failed_b - preexisting)
        if new:
            lines = [f"{t} {c}: FAILED" for t, cs in run_b.checks.items() if t.lower() in new for c, ok in cs
                     if not ok]
            raise CorrectnessError(
                f"{QUANTIZE_FNS} fails in B for type {', '.join(new)} (passes in A): "
                + "; ".join(lines[:6]),
                next_step=f"the patched vec_dot no longer matches its reference; reproduce with: {shlex.join(argv)}")
    by_type = {t.lower(): cs for t, cs in run_b.checks.items()}
    for f, t in covered.items():
        checks = by_type.get(t.lower(), [])
        site = sites[f]
        site["checks"] = [f"{c}: {'ok' if ok else 'FAILED'}" for c, ok in checks]
        if not checks:
            site.update(covered=False, reason=f"{QUANTIZE_FNS} printed no check for {t} on this tree")
        elif t.lower() in preexisting:
            site["status"] = "fails in A too (not caused by the patch)"
        else:
            site["status"] = "passed"
    summary = (f"{len(run_b.types)} types tested, {run_b.passed_checks()} checks ok, {run_b.failed_checks()} "
               f"failed; patched types {', '.join(sorted(wanted))}: "
               + "; ".join(f"{f}: {', '.join(sites[f].get('checks', [])) or sites[f]['reason']}" for f in covered))
    if not any(s.get("status") == "passed" for s in sites.values()):
        status, reason = "not applicable", "no patched function's checks ran and passed (see sites)"
    else:
        status, reason = "passed", None
    progress(f"gate: {QUANTIZE_FNS}: {status} ({summary})")
    out = {**record, "status": status, "summary": summary, "command": argv, "side_build": side_dir,
           "libraries": str(b.bin_dir), "sites": sites}
    if reason:
        out["reason"] = reason
    if preexisting:
        out["failing_in_a_too"] = sorted(preexisting)
    return out
