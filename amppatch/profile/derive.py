"""Pure derivation for `amppatch profile`: a site's prefetch distance and locality hint from machine numbers,
per-token statistics, bandwidth against the measured ceiling, and the naming rules that tie a sampled symbol
to a kernel and its weight type. No subprocess, no file (unit-tested in tests/unit/test_derive.py).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

LINE = 64  # cache line bytes
MIN_DISTANCE = 2 * LINE  # closer than two lines ahead the prefetch is late by construction
MAX_DISTANCE = 64 * LINE  # beyond 4 KiB a stream's prefetch crosses a page per line and outruns the L1/L2
HOT_FUNCTIONS = 30  # shared by the sampler's hot-function table and cachegrind's: the same cut for both
# Kernels that stream weight rows: their names tell which tensor type they read.
WEIGHT_KERNEL_RE = re.compile(r"vec_dot|gemv|gemm|mul_mat|tinygemm|amx|qgemm", re.IGNORECASE)


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


def matrix_ops(hot_functions: list[dict], type_bytes: dict[str, int],
               experts_by_type: dict[str, int]) -> list[dict]:
    """Which matrix products drive each hot kernel of a mixture-of-experts model (pure).

    The CPU backend computes every matrix of a weight type with that type's kernel, through `mul_mat` for dense
    matrices and `mul_mat_id` for the per-expert ones (only the routed experts' slices). So a kernel whose name
    says its weight type is driven by `mul_mat_id` in proportion to that type's expert bytes per token. Returns
    the hot functions, each kernel of a type with expert tensors gaining `ops` {type, mul_mat_bytes,
    mul_mat_id_bytes, mul_mat_id_share}; unchanged when the model has no experts.
    """
    if not experts_by_type:
        return hot_functions
    out: list[dict] = []
    for entry in hot_functions:
        types = tensor_type_of_kernel(str(entry.get("name", "")), list(type_bytes))  # one of type_bytes, or none
        if not types:
            out.append(entry)
            continue
        t = types[0]
        total = type_bytes[t]
        expert = min(experts_by_type.get(t, 0), total)
        out.append({**entry, "ops": {"type": t, "mul_mat_bytes": total - expert, "mul_mat_id_bytes": expert,
                                     "mul_mat_id_share": round(expert / total, 4) if total else 0.0}})
    return out


def ops_label(entry: dict) -> str:
    """How a hot kernel's line names the products that drive it: 'mul_mat_id 74 % · mul_mat 26 % of q4_k'."""
    ops = entry.get("ops")
    if not isinstance(ops, dict):
        return ""
    share = float(ops.get("mul_mat_id_share") or 0.0)
    if share >= 1.0:
        return f"mul_mat_id (all {ops['type']} bytes are experts)"
    if share <= 0.0:
        return f"mul_mat (no {ops['type']} expert tensors)"
    return f"mul_mat_id {100 * share:.0f} % · mul_mat {100 * (1 - share):.0f} % of the {ops['type']} bytes"


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


def bandwidth(weights_bytes_per_token: int, p50_ms: float | None, ceiling_gbps: float | None,
              threads: int) -> dict:
    """Achieved weight bandwidth (bytes per token / p50 token time) and its share of the machine's ceiling."""
    achieved = (weights_bytes_per_token / (p50_ms * 1e6)) if (p50_ms and weights_bytes_per_token) else None
    return {
        "achieved_gbps": round(achieved, 3) if achieved else None,
        "ceiling_gbps": ceiling_gbps,
        "ceiling_threads": threads,
        "share_of_ceiling": round(achieved / ceiling_gbps, 4) if (achieved and ceiling_gbps) else None,
        "how": "weight bytes per token / p50 token time; ceiling = best stream-read of the machine probe",
    }
