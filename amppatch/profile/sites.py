"""Site mapping for `amppatch profile`: sampled program counters → hot functions and lines → the loops the
source analysis finds in the kernels → sites, each with the weight bytes its stream reads per token and the
distance and hint `derive_site` computes from them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from amppatch.errors import AmppatchError
from amppatch.profile.derive import (
    HOT_FUNCTIONS,
    WEIGHT_KERNEL_RE,
    SiteInputs,
    attribute_weight_bytes,
    bare_name,
    derive_site,
    site_function_name,
    tensor_type_of_kernel,
)

if TYPE_CHECKING:
    from amppatch.build import Build
    from amppatch.machine import MachineInfo
    from amppatch.profile.workload import ProfileOptions
    from amppatch.source import FunctionAnalysis, Stream
    from amppatch.tracer import Trace

SITE_MIN_SHARE = 0.02  # a loop with less of the in-token CPU time is not worth a site
HOT_LINES = 40
GGML_CPU_DIR = "ggml/src/ggml-cpu"


def _aggregate(trace: Trace, mask_in_tokens: np.ndarray, locations: dict,
               period_ns: float) -> tuple[list, list, dict, dict]:
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


class _Analyses:
    """Source analyses of the hot kernels, one per site name, computed on first use; a kernel the analysis
    cannot find is remembered as None with a note (it is sampled once per frame, so once is enough)."""

    def __init__(self, repo: Path, compile_db: Path | None, notes: list[str]) -> None:
        from amppatch.source import analyze_function

        self._analyze = analyze_function
        self.repo, self.compile_db, self.notes = repo, compile_db, notes
        self.found: dict[str, FunctionAnalysis | None] = {}

    def __call__(self, name: str) -> FunctionAnalysis | None:
        if name not in self.found:
            try:
                self.found[name] = self._analyze(self.repo, name, self.compile_db)
            except AmppatchError as exc:
                self.found[name] = None
                self.notes.append(f"{name}: not analyzed ({exc.message})")
        return self.found[name]


def _loop_shares(
    repo: Path, source_dir: Path | None, chains: dict[tuple, float],
    analysis: Callable[[str], FunctionAnalysis | None]
) -> tuple[dict[tuple[str, int], float], dict[tuple[str, int], set[int]], dict[str, set[str]]]:
    """CPU share, sampled lines and calling kernels of each streaming loop, from the inline chains.

    A sample counts for the innermost frame of its inline chain that lies inside a loop of its own
    function (an inlined helper's line is outside any loop of the helper, so the kernel's loop gets it).
    """
    from amppatch.source import IN_LAMBDA, member_site_at

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
            member = member_site_at(Path(repo) / rel, frame.line)
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
    return loop_share, loop_lines, outer_names


def _kernel_bytes(
    candidates: list[tuple[tuple[str, int], float]],
    analyses: dict[str, FunctionAnalysis | None],
    outer_names: dict[str, set[str]],
    type_bytes: dict[str, int],
    weights_bytes_per_token: int,
    notes: list[str],
) -> tuple[dict[tuple[str, int], Stream], dict[str, tuple[list[str], bool, float]], dict[str, tuple[int, str]]]:
    """Each candidate loop's default stream, and the weight bytes per token each kernel reads (by the
    tensor type its name says, or — without a model file — by CPU share of the tracer's weight buffers)."""
    from amppatch.source import default_stream

    types = sorted(type_bytes, key=len, reverse=True)
    kernels: dict[str, tuple[list[str], bool, float]] = {}
    streams: dict[tuple[str, int], Stream] = {}
    for (name, ordinal), share in candidates:
        fa = analyses[name]
        assert fa is not None  # a candidate loop was found in this analysis
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
    return streams, kernels, bytes_of


def _sites(
    options: ProfileOptions,
    build: Build | None,
    chains: dict[tuple, float],
    cpu_ns_per_token: float,
    threads_in_tokens: int,
    machine: MachineInfo,
    type_bytes: dict[str, int],
    weights_bytes_per_token: int,
    notes: list[str],
) -> list[dict]:
    """Map sampled inline chains onto loops of the kernels and derive each loop's distance and hint."""
    if options.repo is None:
        notes.append("no --repo: hot lines were not mapped onto loops (no sites)")
        return []
    try:
        import amppatch.source  # noqa: F401
    except ImportError as exc:  # the source analysis is a separate stage; say plainly what is missing
        notes.append(f"source analysis unavailable ({exc}); only function-level results")
        return []
    compile_db = (build.dir / "compile_commands.json") if build is not None else None
    if compile_db is not None and not compile_db.is_file():
        compile_db = None
    source_dir = build.source_dir if build is not None else options.repo
    analysis = _Analyses(options.repo, compile_db, notes)
    loop_share, loop_lines, outer_names = _loop_shares(options.repo, source_dir, chains, analysis)
    candidates = [(k, v) for k, v in sorted(loop_share.items(), key=lambda kv: -kv[1]) if v >= SITE_MIN_SHARE]
    streams, kernels, bytes_of = _kernel_bytes(candidates, analysis.found, outer_names, type_bytes,
                                               weights_bytes_per_token, notes)

    sites: list[dict] = []
    for (name, ordinal), share in candidates:
        if (name, ordinal) not in streams:
            continue
        fa = analysis.found[name]
        assert fa is not None  # a candidate loop was found in this analysis
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
        **({"experts_by_type": {name.lower(): n for name, n in tb.experts_by_type.items()}}
           if tb.experts_by_type else {}),
    }
