"""The output of `amppatch profile`: the profile.json document (schema, what the tracer could and could not
see) and the terminal summary printed after a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from amppatch.limit import ModelRoofline, kernel_lines, summary_lines
from amppatch.paths import write_text_atomic
from amppatch.profile.derive import ops_label, token_stats
from amppatch.profiledoc import Profile
from amppatch.weightpages import WeightPages

if TYPE_CHECKING:
    import numpy as np

    from amppatch.machine import MachineInfo
    from amppatch.profile.workload import ProfileOptions, Workload
    from amppatch.tracer import Trace

SCHEMA_VERSION = 1


@dataclass
class ProfileResult:
    """What `profile()` returns: the file, its document as the typed `Profile`, and the terminal summary."""

    path: Path
    profile: Profile
    summary: str = field(default="")


def new_document(options: ProfileOptions, machine: MachineInfo, run: Workload, *, tracer_loaded: bool) -> dict:
    """profile.json's head: what ran, on what, with what build; `notes` and `visibility` fill in later."""
    return {
        "schema_version": SCHEMA_VERSION,
        "options": options.to_json(),
        "machine": machine.to_json(),
        "build": run.build.manifest if run.build is not None else None,
        "workload": run.record,
        "visibility": {"tracer_loaded": tracer_loaded},
        "notes": [],
        **run.extra,
    }


def mark_blind(data: dict, linkage: str) -> None:
    """The document of a run the tracer saw nothing of: why, and empty results in every section."""
    seen = data["visibility"]
    seen["could_not_see"] = (
        ["anything inside the process: the binary is statically linked, so LD_PRELOAD cannot load the tracer"]
        if linkage == "static"
        else ["anything inside the process: the tracer wrote no file (it did not load, or the process was killed "
              "with SIGKILL before it could write)"]
    )
    seen["could_see"] = ["exit status and wall time"]
    data.update({"regions": {}, "tokens": token_stats([]), "hot_functions": [], "hot_lines": [], "sites": []})


def trace_visibility(seen: dict, trace: Trace, samples: np.ndarray, spans: list, regions: dict, locations: dict,
                     children: list[str]) -> None:
    """Record in `seen` what the trace shows and, in words, what it could not (for the reader of profile.json)."""
    seen.update(
        {
            "token_boundaries": bool(spans),
            "weight_buffers": bool(regions["weights"]),
            "samples": int(samples.size),
            "sampled_threads": len(trace.threads),
            "children_traces": children,
            "trace_complete": trace.complete,
            "trace_reason": trace.meta.get("reason", ""),
            "calls": trace.calls(),
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


def write_document(out: Path, data: dict) -> ProfileResult:
    text = json.dumps(data, indent=2, default=str)
    write_text_atomic(out, text)
    return ProfileResult(out, Profile.from_json(json.loads(text), out), _summary(data))  # the document as written


def _summary(data: dict) -> str:
    """Terminal summary: top kernels with % CPU, bytes per token, achieved GB/s vs the measured ceiling, where
    the weights sat (huge pages) and the roofline of the weight kernels."""
    lines: list[str] = []
    tok = data.get("tokens", {})
    bw = data.get("bandwidth", {})
    bpt = data.get("bytes_per_token", {}).get("weights")
    if tok.get("count"):
        lines.append(f"tokens: {tok['count']}  p50 {tok['p50_ms']:.2f} ms  p99 {tok['p99_ms']:.2f} ms")
    if bpt:
        per_token = data.get("bytes_per_token", {})
        experts = ""
        if per_token.get("n_expert"):
            experts = (f" (experts: {per_token['n_expert_used']} of {per_token['n_expert']} routed per token, "
                       f"{per_token.get('experts_read', 0) / 1e6:.1f} MB of them through mul_mat_id)")
        lines.append(f"weights read per token: {bpt / 1e6:.1f} MB{experts}")
    if bw.get("achieved_gbps"):
        ceil = bw.get("ceiling_gbps")
        pct = f" = {100 * bw['share_of_ceiling']:.0f}% of the measured ceiling {ceil:.1f} GB/s" if ceil else ""
        lines.append(f"achieved: {bw['achieved_gbps']:.1f} GB/s{pct} ({bw.get('ceiling_threads')} thread(s))")
    hf = data.get("hot_functions", [])
    if hf:
        scope = "during tokens" if tok.get("count") else "whole run"
        lines.append(f"hot functions (% of sampled CPU time, {scope}):")
        for f in hf[:8]:
            ops = ops_label(f)
            lines.append(f"  {100 * f['share']:5.1f}%  {f['name'][:100]}" + (f"  [{ops}]" if ops else ""))
    for s in data.get("sites", [])[:6]:
        lines.append(
            f"site {s['function']} loop {s['loop']} (line {s['loop_line']}) stream {s['stream']}: "
            f"distance {s['distance_bytes']} B, hint {s['hint']} ({100 * s['share']:.0f}% of CPU)"
        )
    pages = data.get("huge_pages")
    if isinstance(pages, dict):
        lines.append(f"weights on huge pages: {WeightPages.from_json(pages).describe()}")
    roofline = data.get("roofline")
    if isinstance(roofline, dict):
        part = ModelRoofline.from_json(roofline)
        lines += summary_lines(part)
        lines += [f"  {line}" for line in kernel_lines(part)]
        lines += [f"  note: {note}" for note in part.notes]
    vis = data.get("visibility", {})
    for item in vis.get("could_not_see", []):
        lines.append(f"could not see: {item}")
    for note in data.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
