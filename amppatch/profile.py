"""amppatch profile: run a workload under the tracer, find the hot kernels and loops, and derive for each
hot streaming loop a prefetch distance (bytes) and locality hint from measured numbers.

Stages: resolve options → run (LD_PRELOAD tracer, or perf / cachegrind) → read trace → symbolize →
aggregate by function and line → map hot lines onto loops (amppatch.source) → derive → profile.json.
The derivation functions at the top are pure (unit-tested in tests/unit/test_derive.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from amppatch import proc
from amppatch.errors import AmppatchError, SubprocessError, ToolMissingError, UsageError
from amppatch.paths import write_text_atomic

SCHEMA_VERSION = 1
LINE = 64  # cache line bytes
MIN_DISTANCE = 2 * LINE  # closer than two lines ahead the prefetch is late by construction
MAX_DISTANCE = 64 * LINE  # beyond 4 KiB a stream's prefetch crosses a page per line and outruns the L1/L2
SITE_MIN_SHARE = 0.02  # a loop with less of the in-token CPU time is not worth a site
HOT_FUNCTIONS = 30
HOT_LINES = 40
GGML_CPU_DIR = "ggml/src/ggml-cpu"
# Kernels that stream weight rows: their names tell which tensor type they read.
WEIGHT_KERNEL_RE = re.compile(r"vec_dot|gemv|gemm|mul_mat|tinygemm|amx|qgemm", re.IGNORECASE)


# --------------------------------------------------------------------------------------------------
# Pure derivation
# --------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list (numpy's default method)."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def bare_name(function: str) -> str:
    """'void ns::gemv<block_q4_0x8>(int, float*)' -> 'gemv'; 'ggml_vec_dot_f16' -> 'ggml_vec_dot_f16'."""
    text = function.strip()
    depth = 0
    cut = len(text)
    for i, ch in enumerate(text):  # the first '<' or '(' at template/paren depth 0 ends the qualified name
        if ch in "<(" and depth == 0:
            cut = i
            break
    head = text[:cut].strip()
    head = head.split()[-1] if head.split() else head
    return head.split("::")[-1]


def site_function_name(function: str) -> str:
    """How a site names a symbol: the bare name, plus the template arguments of a specialization.
    'void gemv<block_q4_0x8>(int, float*)' -> 'gemv<block_q4_0x8>'; 'ggml_vec_dot_f16' unchanged."""
    from amppatch.source import closing_angle, split_specialization

    name = bare_name(function)
    text = function.strip()
    start = text.find(name + "<") if name else -1
    close = closing_angle(text, start + len(name)) if start >= 0 else -1
    if close < 0:
        return name
    _, args = split_specialization(text[start : close + 1])
    return f"{name}<{', '.join(args)}>" if any(args) else name


def tensor_type_of_kernel(function: str, types: list[str]) -> list[str]:
    """Tensor types (lower-case ggml names, e.g. 'q8_0', 'f16') a kernel's name says it reads as weights.

    ggml names kernels after their weight type first (ggml_vec_dot_q4_0_q8_0 reads Q4_0 weights and Q8_0
    activations; gemv_q4_0_8x8_q8_0 likewise; AMX kernels carry block_q8_0 / block_q4_0 template
    arguments), so the first type mentioned counts.
    """
    name = function.lower()
    found: list[tuple[int, int, str]] = []
    for t in types:
        # a template argument block_<type> names the weight blocks exactly; otherwise the first mention counts
        m = re.search(rf"block_{re.escape(t)}(?![0-9])", name)
        if m:
            found.append((0, m.start(), t))
            continue
        m = re.search(rf"(?<![a-z0-9]){re.escape(t)}(?![0-9])", name)
        if m:
            found.append((1, m.start(), t))
    return [sorted(found)[0][2]] if found else []


@dataclass(frozen=True)
class SiteInputs:
    """Everything a site's distance and hint are computed from (kept in profile.json)."""

    latency_ns: float  # memory latency a miss costs (pointer chase, 4 KiB pages)
    stream_bytes_per_token: int  # bytes this loop's weight stream reads per token
    cpu_ns_per_token: float  # sampled CPU time per token, all threads
    loop_share: float  # share of in-token CPU samples inside this loop
    threads: int  # threads that ran the loop
    bytes_per_iteration: int | None  # from source analysis (None: unknown)
    working_set_bytes: int  # bytes streamed once per token (all weights)
    llc_bytes: int
    reused_across_rows: bool  # activations (reused) vs weights (streamed once)


@dataclass(frozen=True)
class Derived:
    distance_bytes: int
    distance_lines: int
    distance_iterations: int | None
    hint: int
    consumption_gbps: float  # per-thread bytes per ns while in the loop
    raw_distance_bytes: float  # before rounding and clamping
    clamped: bool
    time_per_iteration_ns: float | None
    hint_reason: str


def derive_site(inp: SiteInputs) -> Derived:
    """distance ≈ latency × per-thread consumption rate, in whole cache lines, clamped; hint from reuse.

    The loop's CPU time per token is loop_share × cpu_ns_per_token, spread over `threads` threads that each
    stream a disjoint part of the weights, so per thread it consumes stream_bytes_per_token / (that time)
    bytes per ns (= GB/s) — independent of the thread count, because both bytes and time are per thread
    once divided. A miss issued `distance` bytes ahead arrives in time when distance / rate ≥ latency.
    """
    loop_ns = inp.loop_share * inp.cpu_ns_per_token
    if loop_ns <= 0 or inp.stream_bytes_per_token <= 0:
        raise ValueError("a site needs CPU time and streamed bytes to derive a distance")
    rate = inp.stream_bytes_per_token / loop_ns  # bytes per ns per thread (CPU time is summed over threads)
    raw = inp.latency_ns * rate
    time_per_iter: float | None = None
    iters: int | None = None
    if inp.bytes_per_iteration:
        time_per_iter = inp.bytes_per_iteration / rate
        iters = max(1, math.ceil(inp.latency_ns / time_per_iter))
    lines = max(1, math.ceil(raw / LINE))
    distance = lines * LINE
    clamped_distance = min(max(distance, MIN_DISTANCE), MAX_DISTANCE)
    if inp.reused_across_rows:
        hint, reason = 3, "reused across rows (activations): keep in all cache levels"
    elif inp.working_set_bytes > inp.llc_bytes:
        hint, reason = 0, (
            f"streamed once per token and {inp.working_set_bytes / inp.llc_bytes:.1f}× the LLC: "
            "non-temporal, do not evict reused data"
        )
    else:
        hint, reason = 3, "working set fits in the LLC: later tokens hit, keep it (locality 3)"
    return Derived(
        distance_bytes=clamped_distance,
        distance_lines=clamped_distance // LINE,
        distance_iterations=iters,
        hint=hint,
        consumption_gbps=rate,
        raw_distance_bytes=raw,
        clamped=clamped_distance != distance,
        time_per_iteration_ns=time_per_iter,
        hint_reason=reason,
    )


def token_stats(token_ns: list[int]) -> dict:
    if not token_ns:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None}
    ms = [t / 1e6 for t in token_ns]
    return {
        "count": len(ms),
        "p50_ms": round(percentile(ms, 50), 4),
        "p99_ms": round(percentile(ms, 99), 4),
        "mean_ms": round(sum(ms) / len(ms), 4),
        "min_ms": round(min(ms), 4),
        "max_ms": round(max(ms), 4),
    }


def in_spans(times: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Boolean mask: which timestamps fall inside any (begin, end) span (spans sorted, non-overlapping)."""
    if not spans or times.size == 0:
        return np.zeros(times.shape, dtype=bool)
    begins = np.array([s[0] for s in spans], dtype=np.uint64)
    ends = np.array([s[1] for s in spans], dtype=np.uint64)
    idx = np.searchsorted(begins, times, side="right") - 1
    ok = idx >= 0
    mask = np.zeros(times.shape, dtype=bool)
    mask[ok] = times[ok] <= ends[idx[ok]]
    return mask


def summarize_regions(regions: list) -> dict:
    """Weight buffers (by ggml buffer name), model file mappings, KV/cleared buffers, other large blocks."""
    weights = [
        {"name": r.name, "addr": hex(r.addr), "size": r.size}
        for r in regions
        if r.kind == "buffer_usage" and r.a == 1
    ]
    cleared = [{"name": r.name, "addr": hex(r.addr), "size": r.size} for r in regions if r.kind == "buffer_clear"]
    mappings = [
        {"path": r.name, "addr": hex(r.addr), "size": r.size}
        for r in regions
        if r.kind == "mmap" and r.name.endswith(".gguf")
    ]
    big = [r for r in regions if r.kind in ("mmap", "posix_memalign") and not r.name.endswith(".gguf")]
    by_name: dict[str, int] = defaultdict(int)
    for w in weights:
        by_name[w["name"] or "?"] += w["size"]
    return {
        "weights": weights,
        "weights_bytes_by_buffer": dict(by_name),
        "weights_bytes": sum(w["size"] for w in weights),
        "model_mappings": mappings,
        "cleared_buffers": cleared,
        "other_large_allocations": {"count": len(big), "bytes": sum(r.size for r in big)},
    }


# --------------------------------------------------------------------------------------------------
# Options and running
# --------------------------------------------------------------------------------------------------

BACKENDS = ("sampler", "perf", "cachegrind")


@dataclass(frozen=True)
class ProfileOptions:
    repo: Path | None = None  # llama.cpp tree (for source analysis and building); None: sites skipped
    model: Path | None = None
    build: Path | None = None  # a build dir or manifest; None: the default native build of `repo`
    threads: int = 1
    tokens: int = 64
    repack: int | None = None  # llama-bench --repack 0|1 (None: its default)
    hz: int = 1000
    backend: str = "sampler"
    out: Path | None = None
    command: tuple[str, ...] = ()  # a workload to run instead of llama-bench
    timeout: float = 3600.0

    def to_json(self) -> dict:
        data = asdict(self)
        for key in ("repo", "model", "build", "out"):
            data[key] = str(data[key]) if data[key] is not None else None
        data["command"] = list(self.command)
        return data


def resolve_options(options: ProfileOptions) -> ProfileOptions:
    """Check and complete options in one place (paths resolved, defaults filled)."""
    if options.backend not in BACKENDS:
        raise UsageError(f"unknown backend {options.backend!r}", next_step=f"use one of {', '.join(BACKENDS)}")
    if options.threads < 1 or options.tokens < 1:
        raise UsageError("--threads and --tokens must be at least 1")
    if options.hz < 0 or options.hz > 10000:
        raise UsageError("--hz must be between 0 and 10000")
    model = Path(options.model).expanduser().resolve() if options.model else None
    if not options.command:
        if model is None:
            raise UsageError("profile needs --model (or a command after --)", next_step="e.g. amppatch model synth")
        if not model.is_file():
            raise UsageError(f"model {model} does not exist", next_step="check the path or run `amppatch model synth`")
        if options.repo is None and options.build is None:
            raise UsageError("profile needs --repo or --build to find llama-bench", next_step="pass --repo DIR")
    repo = Path(options.repo).expanduser().resolve() if options.repo else None
    if repo is not None:
        from amppatch.workspace import check_llama_tree

        repo = check_llama_tree(repo)
    out = Path(options.out).expanduser().resolve() if options.out else Path.cwd() / "profile.json"
    build = Path(options.build).expanduser().resolve() if options.build else None
    return ProfileOptions(
        repo=repo, model=model, build=build, threads=options.threads, tokens=options.tokens, repack=options.repack,
        hz=options.hz, backend=options.backend, out=out, command=tuple(options.command), timeout=options.timeout,
    )


def _load_or_build(options: ProfileOptions):  # -> amppatch.build.Build | None
    from amppatch.build import BuildOptions, build, load_build

    if options.build is not None:
        return load_build(options.build)
    if options.repo is not None and not options.command:
        return build(BuildOptions(repo=options.repo))
    return None


def workload_argv(options: ProfileOptions, bench: Path | None) -> list[str]:
    if options.command:
        return list(options.command)
    assert bench is not None and options.model is not None
    argv = [str(bench), "-m", str(options.model), "-p", "0", "-n", str(options.tokens), "-t", str(options.threads),
            "-r", "1", "-o", "jsonl"]
    if options.repack is not None:
        argv += ["--repack", str(options.repack)]
    return argv


def elf_linkage(path: Path) -> str:
    """'dynamic', 'static' (no interpreter: LD_PRELOAD cannot load the tracer) or 'not-elf'."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            has_interp = any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments())
            return "dynamic" if has_interp else "static"
    except (OSError, ELFError):
        return "not-elf"


def _which(argv0: str) -> Path | None:
    import shutil

    found = shutil.which(argv0)
    return Path(found).resolve() if found else None


# --------------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------------


@dataclass
class ProfileResult:
    path: Path
    data: dict
    summary: str = field(default="")


def _bench_jsonl(stdout: str) -> list[dict]:
    rows = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _aggregate(trace, mask_in_tokens: np.ndarray, locations: dict, period_ns: float) -> tuple[list, list, dict, dict]:
    """Hot functions, hot lines and inline chains by sample weight (in-token samples when there are
    tokens, else all samples)."""
    samples = trace.all_samples()
    use = mask_in_tokens if mask_in_tokens.any() else np.ones(samples.shape, dtype=bool)
    pcs = samples["pc"][use].tolist()
    weights = samples["weight"][use].tolist()
    total = float(sum(weights)) or 1.0
    funcs: dict[str, float] = defaultdict(float)
    func_module: dict[str, str] = {}
    lines: dict[tuple[str, str, int, str], float] = defaultdict(float)
    chains: dict[tuple, float] = defaultdict(float)
    for pc, w in zip(pcs, weights, strict=True):
        loc = locations[pc]
        funcs[loc.function] += w
        func_module.setdefault(loc.function, loc.module)
        lines[(loc.function, loc.file, loc.line, loc.line_function)] += w
        chains[(loc.function, loc.chain)] += w / total
    hot_functions = [
        {"name": name, "share": round(w / total, 5), "cpu_ms": round(w * period_ns / 1e6, 3),
         "module": func_module[name]}
        for name, w in sorted(funcs.items(), key=lambda kv: -kv[1])
    ][:HOT_FUNCTIONS]
    hot_lines = [
        {"function": f, "line_function": lf, "file": file, "line": ln, "share": round(w / total, 5)}
        for (f, file, ln, lf), w in sorted(lines.items(), key=lambda kv: -kv[1])
    ][:HOT_LINES]
    return hot_functions, hot_lines, {"weight_total": total, "samples": len(pcs)}, dict(chains)


def _relpath_in(file: str, source_dir: Path | None) -> str | None:
    """'…/ggml/src/ggml-cpu/arch/x86/quants.c' -> 'ggml/src/ggml-cpu/arch/x86/quants.c'."""
    if source_dir is not None:
        try:
            return str(Path(file).resolve().relative_to(source_dir.resolve()))
        except ValueError:
            pass
    i = file.find(GGML_CPU_DIR)
    return file[i:] if i >= 0 else None


def attribute_weight_bytes(
    kernels: dict[str, tuple[list[str], bool, float]], type_bytes: dict[str, int]
) -> dict[str, tuple[int, str]]:
    """Split the weight bytes streamed per token among hot kernels (pure).

    kernels: name -> (types its name/stream element type says it reads, looks like a weight kernel, share).
    A recognized kernel gets the bytes of its type (split by share when several read that type); kernels
    whose type is not recognizable but that look like weight kernels share the bytes of the types no
    recognized kernel claims, by CPU share. Returns name -> (bytes per token, how it was decided).
    """
    out: dict[str, tuple[int, str]] = {}
    claimed: dict[str, list[str]] = defaultdict(list)
    for name, (types, _weighty, _share) in kernels.items():
        if types and types[0] in type_bytes:
            claimed[types[0]].append(name)
    for t, names in claimed.items():
        total_share = sum(kernels[n][2] for n in names) or 1.0
        for n in names:
            part = int(type_bytes[t] * kernels[n][2] / total_share)
            split = "" if len(names) == 1 else f" (split by CPU share among {len(names)} kernels)"
            out[n] = (part, f"model tensors of type {t}{split}")
    unclaimed_types = [t for t in type_bytes if t not in claimed and t not in ("f32",)]
    unclaimed = sum(type_bytes[t] for t in unclaimed_types)
    rest = [n for n, (types, weighty, _s) in kernels.items() if n not in out and weighty]
    if rest and unclaimed:
        total_share = sum(kernels[n][2] for n in rest) or 1.0
        for n in rest:
            out[n] = (int(unclaimed * kernels[n][2] / total_share),
                      f"tensors of types no named kernel reads ({', '.join(unclaimed_types)}), by CPU share")
    return out


def _sites(
    options: ProfileOptions,
    build,
    chains: dict[tuple, float],
    cpu_ns_per_token: float,
    threads_in_tokens: int,
    machine,
    type_bytes: dict[str, int],
    weights_bytes_per_token: int,
    notes: list[str],
) -> list[dict]:
    """Map sampled inline chains onto loops of the kernels and derive each loop's distance and hint.

    A sample counts for the innermost frame of its inline chain that lies inside a loop of its own
    function (an inlined helper's line is outside any loop of the helper, so the kernel's loop gets it).
    """
    if options.repo is None:
        notes.append("no --repo: hot lines were not mapped onto loops (no sites)")
        return []
    try:
        from amppatch.source import IN_LAMBDA, analyze_function, default_stream, member_site_at
    except ImportError as exc:  # the source analysis is a separate stage; say plainly what is missing
        notes.append(f"source analysis unavailable ({exc}); only function-level results")
        return []
    compile_db = (build.dir / "compile_commands.json") if build is not None else None
    if compile_db is not None and not compile_db.is_file():
        compile_db = None
    source_dir = build.source_dir if build is not None else options.repo
    analyses: dict[str, object] = {}

    def analysis(name: str):
        if name not in analyses:
            try:
                analyses[name] = analyze_function(options.repo, name, compile_db)
            except AmppatchError as exc:
                analyses[name] = None
                notes.append(f"{name}: not analyzed ({exc.message})")
        return analyses[name]

    loop_share: dict[tuple[str, int], float] = defaultdict(float)
    loop_lines: dict[tuple[str, int], set[int]] = defaultdict(set)
    outer_names: dict[str, set[str]] = defaultdict(set)
    for (outer_function, chain), share in sorted(chains.items(), key=lambda kv: -kv[1]):
        if share < 0.002:
            continue
        for frame in chain:
            rel = _relpath_in(frame.file, source_dir)
            if rel is None or not rel.startswith(GGML_CPU_DIR):
                continue
            # A method (the AMX kernels' X<pattern>::apply) is named by the definition its line is in:
            # DWARF gives inlined methods their bare name. Lines in lambdas count for the calling loop.
            member = member_site_at(Path(options.repo) / rel, frame.line)
            if member == IN_LAMBDA or (member is None and bare_name(frame.function).startswith("operator")):
                continue  # a lambda's or functor's body: the loop that calls it names the site
            name = member or site_function_name(frame.function)  # a template's loops: per specialization
            fa = analysis(name)
            if fa is None or not (rel.endswith(fa.relpath) or fa.relpath.endswith(rel)):
                continue
            loop = fa.loop_for_line(frame.line)
            if loop is None:
                continue
            outer = loop  # the innermost enclosing loop that walks a stream
            while outer.parent is not None and not outer.streams:
                outer = fa.loop(outer.parent)
            loop_share[(name, outer.ordinal)] += share
            loop_lines[(name, outer.ordinal)].add(frame.line)
            outer_names[name].add(outer_function)
            break

    candidates = [(k, v) for k, v in sorted(loop_share.items(), key=lambda kv: -kv[1]) if v >= SITE_MIN_SHARE]
    types = sorted(type_bytes, key=len, reverse=True)
    kernels: dict[str, tuple[list[str], bool, float]] = {}
    streams: dict[tuple[str, int], object] = {}
    for (name, ordinal), share in candidates:
        fa = analyses[name]
        loop = fa.loop(ordinal)
        stream = default_stream(loop)
        if stream is None:
            notes.append(f"{name} loop {ordinal} (line {loop.start_line}): no stream found")
            continue
        streams[(name, ordinal)] = stream
        text = " ".join([stream.element_type or "", name, *sorted(outer_names[name])])
        prev = kernels.get(name, ([], False, 0.0))
        kernels[name] = (tensor_type_of_kernel(text, types), bool(WEIGHT_KERNEL_RE.search(text)), prev[2] + share)
    if type_bytes:
        bytes_of = attribute_weight_bytes(kernels, type_bytes)
    else:
        weighty = {n: k for n, k in kernels.items() if k[1]}
        total = sum(k[2] for k in weighty.values()) or 1.0
        bytes_of = {n: (int(weights_bytes_per_token * k[2] / total),
                        "weight buffers seen by the tracer, by CPU share (no model file)") for n, k in weighty.items()}

    sites: list[dict] = []
    for (name, ordinal), share in candidates:
        if (name, ordinal) not in streams:
            continue
        fa = analyses[name]
        loop = fa.loop(ordinal)
        stream = streams[(name, ordinal)]
        if name not in bytes_of or bytes_of[name][0] <= 0:
            notes.append(f"{name} loop {ordinal} (line {loop.start_line}, {100 * share:.0f}% of CPU): "
                         "not a weight-streaming kernel; no site")
            continue
        kernel_bytes, bytes_source = bytes_of[name]
        # a kernel with several hot loops: each loop streams its share of the kernel's bytes
        kernel_share = kernels[name][2]
        stream_bytes = int(kernel_bytes * share / kernel_share) if kernel_share else kernel_bytes
        inputs = SiteInputs(
            latency_ns=machine.latency_ns_4k,
            stream_bytes_per_token=stream_bytes,
            cpu_ns_per_token=cpu_ns_per_token,
            loop_share=share,
            threads=threads_in_tokens,
            bytes_per_iteration=stream.bytes_per_iteration,
            working_set_bytes=weights_bytes_per_token,
            llc_bytes=machine.llc_bytes,
            reused_across_rows=False,
        )
        try:
            d = derive_site(inputs)
        except ValueError as exc:
            notes.append(f"{name} loop {ordinal}: {exc}")
            continue
        best = machine.stream_best.get(threads_in_tokens) or {}
        sites.append(
            {
                "function": name,
                "loop": ordinal,
                "stream": stream.expression,
                "distance_bytes": d.distance_bytes,
                "hint": d.hint,
                "file": fa.relpath,
                "loop_line": loop.start_line,
                "hot_lines": sorted(loop_lines[(name, ordinal)]),
                "share": round(share, 5),
                "element_type": stream.element_type,
                "derived": asdict(d),
                "inputs": {
                    **asdict(inputs),
                    "stream_bytes_source": bytes_source,
                    "latency_source": "machine probe pointer chase over a random cycle, 4 KiB pages",
                    "cpu_ns_per_token_source": "in-token samples × sampling period / tokens",
                    "machine_best_stream_prefetch": best,
                },
            }
        )
    return sites


def _model_bytes(model: Path | None) -> tuple[dict[str, int], int, dict]:
    """Bytes per tensor type streamed per token, and the total (from the GGUF), with provenance."""
    if model is None:
        return {}, 0, {}
    from amppatch.gguf_info import bytes_per_token, read_gguf

    info = read_gguf(model)
    tb = bytes_per_token(info)
    # per type what a token reads: gathered tables excluded, per-expert tensors only the routed experts' share
    by_type = {name.lower(): n for name, n in tb.by_type.items()}
    return by_type, tb.weights, {
        "weights_whole": tb.weights_whole, "experts_read": tb.experts_read, "n_expert": tb.n_expert,
        "n_expert_used": tb.n_expert_used, "gathered_rows": tb.gathered_rows, "excluded": list(tb.excluded),
        "file_size": info.file_size,
    }


def _check_backend(backend: str) -> str:
    """Why a counter/simulator backend cannot run here, or '' when it can."""
    if backend == "perf":
        import shutil

        if shutil.which("perf") is None:
            return "`perf` is not installed"
        done = proc.run(["perf", "stat", "-x,", "-e", "cache-misses", "true"], check=False, what="perf stat")
        text = done.stderr + done.stdout
        if done.returncode != 0 or "<not supported>" in text or "not supported" in text.lower():
            return "this machine exposes no hardware performance counters (`perf stat -e cache-misses` says: " + (
                text.strip().splitlines()[0] if text.strip() else f"exit {done.returncode}") + ")"
    if backend == "cachegrind":
        import shutil

        if shutil.which("valgrind") is None:
            return "`valgrind` is not installed"
    return ""


def _run_perf(argv: list[str], env: dict[str, str], workdir: Path, timeout: float) -> dict:
    data = workdir / "perf.data"
    proc.run(["perf", "record", "-e", "cache-misses", "-o", str(data), "--", *argv], env=env, timeout=timeout,
             what="perf record")
    rep = proc.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "symbol", "--percent-limit", "0.5"],
                   timeout=600, what="perf report")
    rows = []
    for line in rep.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+\[\.\]\s+(.+)$", line)
        if m:
            rows.append({"function": m.group(2).strip(), "cache_miss_share": float(m.group(1)) / 100})
    return {"event": "cache-misses", "functions": rows}


def parse_cg_annotate(text: str) -> list[dict]:
    """Per-function event counts (Ir, D1mr, DLmr, ...) from `cg_annotate` output, old and new styles (pure)."""
    header: list[str] = []
    rows: list[dict] = []
    for line in text.splitlines():
        if line.strip().startswith("Ir") and "file:function" in line:
            header = line.split()[:-1]
            continue
        if not header:
            continue
        if line.startswith("-- ") and rows:
            break  # the per-function table is over (auto-annotated sources follow)
        parts = re.sub(r"\(\s*[\d.]+%\)", " ", line).split()  # newer versions add "(12.3%)" after each count
        if len(parts) <= len(header) or not all(re.fullmatch(r"[\d,]+|\.", p) for p in parts[: len(header)]):
            continue
        counts = [int(p.replace(",", "")) if p != "." else 0 for p in parts[: len(header)]]
        rows.append({"function": " ".join(parts[len(header) :]), **dict(zip(header, counts, strict=True))})
    return rows


def _run_cachegrind(argv: list[str], env: dict[str, str], workdir: Path, timeout: float) -> dict:
    out = workdir / "cachegrind.out"
    done = proc.run(["valgrind", "--tool=cachegrind", "--cache-sim=yes", f"--cachegrind-out-file={out}", "--", *argv],
                    env=env, timeout=timeout, check=False, what="valgrind --tool=cachegrind")
    if done.returncode != 0 or not out.exists():
        tail = done.stderr[-2000:]
        why = ""
        if "unhandled instruction" in tail or "SIGILL" in tail:
            why = " (valgrind cannot execute this build's instructions, e.g. AVX-512: profile a build with " \
                  "GGML_NATIVE=OFF / AVX2, or a smaller program)"
        raise SubprocessError(f"cachegrind run failed: {proc.describe_returncode(done.returncode)}{why}",
                              returncode=done.returncode, output_tail=tail)
    ann = proc.run(["cg_annotate", str(out)], timeout=600, what="cg_annotate")
    rows = parse_cg_annotate(ann.stdout)
    key = "DLmr" if rows and "DLmr" in rows[0] else None
    if key:
        rows.sort(key=lambda r: -r[key])
    return {"simulated": True, "functions": rows[:HOT_FUNCTIONS], "ll_read_miss_column": key}


def profile(options: ProfileOptions) -> ProfileResult:
    """Run the workload under the chosen backend and write profile.json (the path is returned)."""
    from amppatch.machine import probe_machine
    from amppatch.symbolize import symbolize
    from amppatch.tracer import read_trace, trace_files, tracer_env

    options = resolve_options(options)
    assert options.out is not None
    if options.backend != "sampler":
        why = _check_backend(options.backend)
        if why:
            raise ToolMissingError(
                f"backend {options.backend} is unavailable: {why}",
                next_step="use --backend sampler (the default; it needs no counters)",
            )
    build = _load_or_build(options)
    bench = build.binary("llama-bench") if (build is not None and not options.command) else None
    argv = workload_argv(options, bench)
    exe = Path(argv[0]) if "/" in argv[0] else _which(argv[0])
    if exe is None or not exe.exists():
        raise UsageError(f"cannot find the program {argv[0]!r}", next_step="give a path or a program on PATH")
    linkage = elf_linkage(exe)
    machine = probe_machine()
    env = dict(os.environ)
    if build is not None:
        from amppatch.build import run_env

        env.update(run_env(build))
    workdir = options.out.parent / (options.out.stem + ".trace")
    workdir.mkdir(parents=True, exist_ok=True)
    trace_path = workdir / "trace.bin"
    env.update(tracer_env(trace_path, sample_hz=options.hz, base_env=env))  # keeps the build's own preload

    notes: list[str] = []
    extra: dict = {}
    proc.progress(f"profile: running {shlex.join(argv)} under the {options.backend} backend")
    t0 = time.monotonic()
    if options.backend == "sampler":
        done = proc.run(argv, env=env, timeout=options.timeout, check=False, what=Path(argv[0]).name)
    else:
        # counters/simulation do not mix with the tracer's timers: run plain under the tool, then once traced
        plain_env = {k: v for k, v in env.items() if not k.startswith("AMPTRACE_") and k != "LD_PRELOAD"}
        runner = _run_perf if options.backend == "perf" else _run_cachegrind
        extra[options.backend] = runner(argv, plain_env, workdir, options.timeout)
        done = proc.run(argv, env=env, timeout=options.timeout, check=False, what=Path(argv[0]).name)
    wall = time.monotonic() - t0
    workload = {
        "argv": argv, "returncode": done.returncode, "ended": proc.describe_returncode(done.returncode),
        "wall_seconds": round(wall, 3), "linkage": linkage, "bench": _bench_jsonl(done.stdout),
        "stderr_tail": done.stderr[-2000:] if done.returncode != 0 else "",
    }
    files = trace_files(trace_path)
    seen: dict = {"tracer_loaded": bool(files)}
    data: dict = {
        "schema_version": SCHEMA_VERSION,
        "options": options.to_json(),
        "machine": machine.to_json(),
        "build": build.manifest if build is not None else None,
        "workload": workload,
        "visibility": seen,
        "notes": notes,
        **extra,
    }
    if not files:
        seen["could_not_see"] = (
            ["anything inside the process: the binary is statically linked, so LD_PRELOAD cannot load the tracer"]
            if linkage == "static"
            else ["anything inside the process: the tracer wrote no file (it did not load, or the process was killed "
                  "with SIGKILL before it could write)"]
        )
        seen["could_see"] = ["exit status and wall time"]
        data.update({"regions": {}, "tokens": token_stats([]), "hot_functions": [], "hot_lines": [], "sites": []})
        write_text_atomic(options.out, json.dumps(data, indent=2, default=str))
        _raise_if_crashed(done.returncode, options.out)
        return ProfileResult(options.out, data, _summary(data))

    # The root trace is the workload itself; children (if any) are listed.
    trace = read_trace(files[0])
    children = [str(p) for p in files[1:]]
    period_ns = 1e9 / options.hz if options.hz else 0.0
    spans = trace.token_spans
    samples = trace.all_samples()
    mask = in_spans(samples["t_ns"], spans)
    locations = symbolize(trace, samples["pc"]) if samples.size else {}
    hot_functions, hot_lines, agg, chains = (
        _aggregate(trace, mask, locations, period_ns) if samples.size else ([], [], {}, {})
    )
    token = token_stats(trace.token_ns)
    in_token_weight = float(samples["weight"][mask].sum()) if samples.size else 0.0
    cpu_ns_per_token = in_token_weight * period_ns / len(spans) if spans else 0.0
    tids_in_tokens = {t.tid for t in trace.threads if t.samples.size and in_spans(t.samples["t_ns"], spans).any()}
    regions = summarize_regions(trace.regions)
    type_bytes, weights_bpt, bytes_provenance = _model_bytes(options.model if not options.command else None)
    if not weights_bpt:
        weights_bpt = regions["weights_bytes"]
        bytes_provenance = {"source": "weight buffers seen by the tracer (ggml_backend_buffer_set_usage)"}
    else:
        bytes_provenance["source"] = "GGUF tensors (gathered tables count one row)"

    calls = trace.calls()
    seen.update(
        {
            "token_boundaries": bool(spans),
            "weight_buffers": bool(regions["weights"]),
            "samples": int(samples.size),
            "sampled_threads": len(trace.threads),
            "children_traces": children,
            "trace_complete": trace.complete,
            "trace_reason": trace.meta.get("reason", ""),
            "calls": calls,
        }
    )
    could_not: list[str] = []
    if not spans:
        could_not.append("token boundaries: no llama_decode/llama_process calls crossed a library boundary "
                         "(not a llama program, or llama is linked statically) — no per-token latency")
    if not regions["weights"]:
        could_not.append("weight buffers: ggml_backend_buffer_set_usage was never called through the PLT — "
                         "weight regions unknown")
    if samples.size and all(loc.file == "??" for loc in locations.values()):
        could_not.append("source lines: no debug info (-g) in the sampled code")
    seen["could_not_see"] = could_not
    seen["could_see"] = [s for s, ok in (
        ("program counters of every thread", samples.size > 0),
        ("per-token latency", bool(spans)),
        ("weight buffers", bool(regions["weights"])),
    ) if ok]

    sites: list[dict] = []
    if chains and spans and weights_bpt:
        sites = _sites(options, build, chains, cpu_ns_per_token, max(1, len(tids_in_tokens)), machine,
                       type_bytes, weights_bpt, notes)
    elif not spans:
        notes.append("no token boundaries: no per-token rates, so no sites were derived")
    p50 = token["p50_ms"]
    achieved = (weights_bpt / (p50 * 1e6)) if (p50 and weights_bpt) else None
    ceiling = machine.ceiling_for(options.threads)
    data.update(
        {
            "regions": regions,
            "tokens": token,
            "bytes_per_token": {"weights": weights_bpt, **bytes_provenance},
            "bandwidth": {
                "achieved_gbps": round(achieved, 3) if achieved else None,
                "ceiling_gbps": ceiling,
                "ceiling_threads": options.threads,
                "share_of_ceiling": round(achieved / ceiling, 4) if (achieved and ceiling) else None,
                "how": "weight bytes per token / p50 token time; ceiling = best stream-read of the machine probe",
            },
            "sampling": {
                "hz": options.hz, "period_ns": period_ns, "samples": int(samples.size),
                "in_token_samples": int(mask.sum()) if samples.size else 0,
                "cpu_ns_per_token": round(cpu_ns_per_token, 1), "threads_in_tokens": len(tids_in_tokens),
                "dropped": sum(t.dropped for t in trace.threads), **agg,
            },
            "hot_functions": hot_functions,
            "hot_lines": hot_lines,
            "sites": sites,
            "trace": str(files[0]),
        }
    )
    data["machine"]["cpu_model"] = machine.cpu_model
    write_text_atomic(options.out, json.dumps(data, indent=2, default=str))
    _raise_if_crashed(done.returncode, options.out, trace.crash_signal)
    return ProfileResult(options.out, data, _summary(data))


def _raise_if_crashed(returncode: int, out: Path, crash_signal: int = 0) -> None:
    if returncode == 0:
        return
    extra = f" (the tracer recorded signal {crash_signal})" if crash_signal else ""
    raise SubprocessError(
        f"the profiled program failed: {proc.describe_returncode(returncode)}{extra}",
        next_step=f"what was recorded up to the failure is in {out}",
        returncode=returncode,
    )


def _summary(data: dict) -> str:
    """Terminal summary: top kernels with % CPU, bytes per token, achieved GB/s vs the measured ceiling."""
    lines: list[str] = []
    tok = data.get("tokens", {})
    bw = data.get("bandwidth", {})
    bpt = data.get("bytes_per_token", {}).get("weights")
    if tok.get("count"):
        lines.append(f"tokens: {tok['count']}  p50 {tok['p50_ms']:.2f} ms  p99 {tok['p99_ms']:.2f} ms")
    if bpt:
        lines.append(f"weights read per token: {bpt / 1e6:.1f} MB")
    if bw.get("achieved_gbps"):
        ceil = bw.get("ceiling_gbps")
        pct = f" = {100 * bw['share_of_ceiling']:.0f}% of the measured ceiling {ceil:.1f} GB/s" if ceil else ""
        lines.append(f"achieved: {bw['achieved_gbps']:.1f} GB/s{pct} ({bw.get('ceiling_threads')} thread(s))")
    hf = data.get("hot_functions", [])
    if hf:
        scope = "during tokens" if tok.get("count") else "whole run"
        lines.append(f"hot functions (% of sampled CPU time, {scope}):")
        for f in hf[:8]:
            lines.append(f"  {100 * f['share']:5.1f}%  {f['name'][:100]}")
    for s in data.get("sites", [])[:6]:
        lines.append(
            f"site {s['function']} loop {s['loop']} (line {s['loop_line']}) stream {s['stream']}: "
            f"distance {s['distance_bytes']} B, hint {s['hint']} ({100 * s['share']:.0f}% of CPU)"
        )
    vis = data.get("visibility", {})
    for item in vis.get("could_not_see", []):
        lines.append(f"could not see: {item}")
    for note in data.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
