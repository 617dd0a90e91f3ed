"""The gate of a patch: which synthetic model makes each patched kernel run, and proof (gdb breakpoint
counts) that it ran in the patched build while B computed exactly what A computed (`amppatch.gate`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from amppatch.errors import CorrectnessError, UsageError
from amppatch.gate import GateOptions, kernel_test, run_gate
from amppatch.proc import progress
from amppatch.source import split_member

if TYPE_CHECKING:
    from amppatch.build import Build
    from amppatch.patch.plan import PlannedSite
    from amppatch.patch.render import FileChange


# ggml weight types whose kernels amppatch gates on a tiny synthetic model of that type, by the lower-case
# name kernels carry (ggml_vec_dot_q5_K_q8_K → q5_k), which is also the `model synth --type` name: q3_k, q4_k
# and q5_k are llama-quantize's _M mixes, whose layers hold that type (their output matrix is Q6_K).
GATE_TYPES = ("f16", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0", "q3_k", "iq4_xs", "iq4_nl")
# The synthetic type for sites of no weight type (flash attention) when nothing better is known.
DEFAULT_GATE_TYPE = "q8_0"
DENSE_SHAPE, EXPERT_SHAPE = "tiny", "tiny-moe"


def kernel_weight_type(function: str) -> str | None:
    """The weight type `function` streams, lower case, whether or not amppatch can synthesize it:
    ggml_vec_dot_<type>_..., a repack ggml_gemv_<type>_..., a specialization over block_<type>x<N>
    (gemv_..._lut_avx<block_q4_0x8>), or a GEMM micro-kernel class X<activation, weight, ...>.
    None: the function has no weight type of its own (flash attention, a generic loop)."""
    text = function.lower()
    owner, _ = split_member(text)
    if owner is not None:
        # a GEMM micro-kernel class X<activation, weight, ...>: the weight type is the last block type
        # (tinygemm_kernel_vnni<block_q8_0, block_q4_0, ...>), F16 weights are ggml_fp16_t
        blocks = re.findall(r"\bblock_([a-z0-9]+_[0-9a-z]+)\b", owner)
        if blocks:
            return blocks[-1]
        return "f16" if re.search(r"\bggml_fp16_t\b", owner) else None
    m = (re.match(r"ggml_(?:vec_dot|gemv|gemm)_([a-z0-9]+(?:_[0-9a-z]+)?)", text)
         or re.search(r"<\s*(?:const\s+)?block_([a-z0-9]+_[0-9a-z]+?)x\d+\b", text))
    if not m:
        return None
    name = m.group(1)
    if name.startswith(("f16", "bf16", "f32")):
        name = name.split("_")[0]
    # ggml_vec_dot_f32 serves many ops on activations (a model's F32 tensors are norms): no weight type
    return None if name == "f32" else name


def model_type_for(function: str) -> str | None:
    """The synthetic model type whose weights run `function` (None: no weight type, or one amppatch cannot
    synthesize)."""
    t = kernel_weight_type(function)
    return t if t in GATE_TYPES else None


def expert_kernel(function: str) -> bool:
    """Whether only mul_mat_id runs `function` (a mixture-of-experts model's expert matrices): the generic
    ggml_compute_forward_mul_mat_id loops and a repack buffer's tensor_traits<...>::forward_mul_mat_id."""
    return "mul_mat_id" in function


def gate_runtime_args(functions: list[str]) -> tuple[str, ...]:
    """vec_dot kernels and the generic mul_mat loops that call them run only for weights in the plain CPU
    buffer: turn extra buffers (repack, AMX) off."""
    plain = any(re.match(r"ggml_(?:vec_dot_|compute_forward_mul_mat)", f) for f in functions)
    return ("-nr",) if plain else ()


@dataclass(frozen=True)
class GateGroup:
    """One gate run: a model (`model`, or the synthetic one of `type` and `shape`), the functions it must
    run, and the llama.cpp flags that route weights to them."""

    type: str | None
    shape: str | None
    model: Path | None
    functions: tuple[str, ...]
    args: tuple[str, ...]


def gate_groups(functions: list[str], *, model: Path | None = None,
                default_type: str | None = None) -> list[GateGroup]:
    """The gate runs that prove every function of `functions` (pure).

    Without `model`, a kernel runs on the tiny synthetic model of its own weight type, a mul_mat_id kernel
    (MoE experts) on the tiny MoE model of that type. A function of no weight type runs on a model of
    `default_type` (the user model's dominant type; else the first typed run's, else Q8_0). Functions that
    need extra buffers off (vec_dot) and those that need them on (repack GEMVs) get separate runs; one that
    needs neither (flash attention) joins the first run of its shape. With `model`, every run uses it.
    """
    if model is None:
        for f in functions:
            t = kernel_weight_type(f)
            if t is not None and t not in GATE_TYPES:
                raise UsageError(f"{f} runs on {t.upper()} weights, a type amppatch has no synthetic gate model "
                                 f"of (it has {', '.join(x.upper() for x in GATE_TYPES)})",
                                 next_step=f"pass --gate-model M (a model with {t.upper()} weights)")
    Key = tuple[str | None, str | None, tuple[str, ...]]
    keyed: dict[Key, list[str]] = {}

    def order(key: Key) -> tuple[str, str, tuple[str, ...]]:
        return key[0] or "", key[1] or "", key[2]

    untyped: list[str] = []
    for f in sorted(set(functions)):
        t = None if model is not None else model_type_for(f)
        if model is None and t is None:
            untyped.append(f)
            continue
        shape = None if model is not None else EXPERT_SHAPE if expert_kernel(f) else DENSE_SHAPE
        keyed.setdefault((t, shape, gate_runtime_args([f])), []).append(f)
    fallback = default_type or next((t for t, _, _ in sorted(keyed, key=order)), None) or DEFAULT_GATE_TYPE
    for f in untyped:
        shape = EXPERT_SHAPE if expert_kernel(f) else DENSE_SHAPE
        args = gate_runtime_args([f])
        key: Key = (fallback, shape, args)
        if not args and key not in keyed:  # no buffer of its own to route to: any run of its shape shows it
            same_shape = [k for k in sorted(keyed, key=order) if k[1] == shape]
            key = next((k for k in same_shape if k[0] == fallback), same_shape[0] if same_shape else key)
        keyed.setdefault(key, []).append(f)
    return [GateGroup(t, shape, model, tuple(keyed[(t, shape, args)]), args)
            for t, shape, args in sorted(keyed, key=order)]


def _tree_supported(build: Build, flags: tuple[str, ...]) -> tuple[str, ...]:
    """The runtime flags both gate programs of this tree accept: older llama.cpp has no -nr (nor extra
    buffers for most types); the breakpoint count still proves the kernel ran."""
    from amppatch.build.accepted import accepted_flags, supported

    kept = supported(flags, accepted_flags(build, "completion"), accepted_flags(build, "perplexity"))
    for flag in flags:
        if flag not in kept:
            progress(f"apply: this llama.cpp's programs take no {flag}; the gate runs without it")
    return kept


def count_function_hits(build: object, function: str, model: Path, args: tuple[str, ...] = (),
                        n_predict: int = 2, lines: tuple[str, ...] = ()) -> int:
    """How often `function` ran in the greedy completion program of `build` (gdb breakpoint hit count) — or, given
    `lines` (FILE:LINE of code amppatch inserted), how often the most-run of those lines ran."""
    from amppatch.build import Build, run_env, runtime_args
    from amppatch.build.accepted import accepted_flags, supported
    from amppatch.proc import require_tool, run

    assert isinstance(build, Build)
    args = (*args, *runtime_args(build, args))
    gdb = require_tool("gdb", install_hint="install gdb (apt-get install -y gdb) to prove the patched kernel ran")
    binary = build.program("completion")
    quiet = supported(("-no-cnv", "--no-warmup"), accepted_flags(build, "completion"))
    specs = list(lines) or [gdb_function_name(function)]
    breaks: list[str] = []
    for n, spec in enumerate(specs, 1):
        breaks += ["-ex", f"break {spec}", "-ex", f"ignore {n} 100000000"]
    argv = [gdb, "-nx", "-batch", "-ex", "set breakpoint pending on", "-ex", "set pagination off",
            "-ex", "set confirm off", *breaks, "-ex", "run",
            "-ex", "info breakpoints", "--args", str(binary), "-m", str(model), "-p", "hello", "-n", str(n_predict),
            "-t", "1", "-c", "64", "--temp", "0", "--seed", "1", *quiet, *args]
    done = run(argv, env=run_env(build), timeout=900, check=False, what=f"gdb breakpoint count on {function}")
    if not lines:
        m = re.search(r"breakpoint already hit (\d+) time", done.stdout)
        return int(m.group(1)) if m else 0
    return max(line_breakpoint_hits(done.stdout, specs).values(), default=0)


def gdb_function_name(function: str) -> str:
    """How gdb's linespec parser finds a function template's specialization: closing angle brackets apart
    ('gemv<block<4, 8>>' -> 'gemv<block<4, 8> >'); with '>>' the breakpoint stays pending and never hits."""
    return re.sub(r">(?=>)", "> ", function)


def line_breakpoint_hits(info: str, specs: list[str]) -> dict[str, int]:
    """Hit counts of gdb's `info breakpoints` for breakpoints 1..N on `specs` (pure). A FILE:LINE counts
    only if every location it resolved to is the line asked for: on a line without code gdb moves it to
    the next line that has some, which may be another function's. A function name counts once resolved."""
    blocks: dict[int, list[str]] = {}
    current = None
    for line in info.splitlines():
        m = re.match(r"^(\d+)\s+breakpoint\s", line)
        if m:
            current = int(m.group(1))
            blocks[current] = [line]
        elif current is not None and (line.startswith(("\t", " ")) or re.match(r"^\d+\.\d+\s", line)):
            blocks[current].append(line)
        else:
            current = None
    out: dict[str, int] = {}
    for n, spec in enumerate(specs, 1):
        text = "\n".join(blocks.get(n, []))
        at = re.findall(r" at \S+:(\d+)\s*$", text, re.MULTILINE)
        hit = re.search(r"breakpoint already hit (\d+) time", text)
        wanted = re.search(r":(\d+)$", spec)
        # a FILE:LINE must have resolved to that line; a function name (an inlined helper) to anything
        if at and (wanted is None or all(a == wanted.group(1) for a in at)):
            out[spec] = int(hit.group(1)) if hit else 0
    return out


def breakpoint_locations(sites: list[PlannedSite], changes: list[FileChange]) -> dict[str, tuple[str, ...]]:
    """FILE:LINE of the inserted code lines of each site whose function gdb cannot name: a method of a
    class template's partial specialization (`X<pattern>::m`) has no symbol of that spelling, and a
    breakpoint on the inserted lines also proves the prefetch code itself executed. (Several lines:
    which of them carry a statement boundary in the line table is the compiler's choice.)"""
    from amppatch.patch.render import marker  # lazily: amppatch.patch re-exports this module's helpers

    out: dict[str, tuple[str, ...]] = {}
    by_file = {c.relpath: c for c in changes}
    for site in sites:
        if split_member(site.function)[0] is None or site.function in out or site.file not in by_file:
            continue
        change = by_file[site.file]
        lines = change.after.decode(errors="replace").splitlines()
        found = []
        for n in change.inserted_lines:
            code = lines[n - 1].split("/*", 1)[0].strip()
            if f"/* {marker(site)}" in lines[n - 1] and code and not code.startswith(("#", "}", "{")):
                found.append(f"{site.file}:{n}")
                if f"amppatch_prefetch_{site.slug}(" in code:  # tunable: the inlined helper is the prefetch
                    found.append(f"amppatch_prefetch_{site.slug}")
        if found:
            out[site.function] = tuple(found)
    return out


def gate_sites(build_a: Build, build_b: Build, sites: list[PlannedSite], *, model: Path | None = None,
               extra_args: tuple[str, ...] = (), locations: dict[str, tuple[str, ...]] | None = None,
               also_ran: tuple[str, ...] = (), default_type: str | None = None) -> dict:
    """B computes exactly what A computes, and every patched function ran in B.

    Sites on kernels of different weight types (a Q4_0 GEMV and a Q4_K GEMV patched at once) cannot all
    run on one synthetic model: each gets its own gate run (`gate_groups`). The first run's fields stay at
    the top level (scripts read `passed`, `tokens_a`, ...); every run is in `runs`.

    `model` (apply's --gate-model) replaces the synthetic models; `extra_args` (--gate-arg) go to every run;
    `default_type` is the synthetic type for sites of no weight type (run --model: the dominant one).
    `also_ran`: functions besides the sites' that must run in B, on any model (a lever's entry point); with
    no sites the gate runs on a tiny model of `default_type` (else Q8_0).
    """
    functions = sorted({s.function for s in sites})
    runs = []
    hits: dict[str, int] = {}
    for group in gate_groups(functions + [f for f in also_ran if f not in functions], model=model,
                             default_type=default_type):
        if group.model is not None:
            gate_model = Path(group.model)
        else:
            from amppatch.model import SynthOptions, synth_model

            assert group.type is not None and group.shape is not None
            gate_model = Path(synth_model(SynthOptions(shape=group.shape, type=group.type, build=build_a)))
        fs = list(group.functions)
        # a vec_dot site needs extra buffers off (-nr), a repack GEMV needs them on; older trees have no -nr
        args = tuple(dict.fromkeys((*_tree_supported(build_a, group.args), *extra_args)))
        progress(f"apply: correctness gate on {gate_model.name} (args: {' '.join(args) or 'none'}) ...")
        gate = run_gate(build_a, build_b, GateOptions(model=gate_model, mode="identical", extra_args=args))
        for f in fs:
            progress(f"apply: checking that {f} runs in B (gdb breakpoint count) ...")
            hits[f] = count_function_hits(build_b, f, gate_model, args, lines=(locations or {}).get(f, ()))
            if hits[f] == 0:
                raise CorrectnessError(
                    f"{f} never ran in B on {gate_model.name} with {' '.join(args) or 'no extra args'}: the gate "
                    "compared builds without exercising the patch, so it proves nothing",
                    next_step="pass --gate-model with weights of the kernel's type, or --gate-arg flags that "
                              "route them to it")
        runs.append({**gate.to_json(), "model": str(gate_model), "functions": fs, "args": list(args),
                     "weight_type": group.type, "shape": group.shape})
    # llama.cpp's own check of every vec_dot against its reference, for the patched kernels it covers
    return {**runs[0], "function_hits": hits, "runs": runs, "kernel_test": kernel_test(build_a, build_b, functions)}
