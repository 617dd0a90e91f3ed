"""The `amppatch profile` stage: resolve options → run the workload (workload.py) → read and symbolize the
trace → hot functions, lines and sites (sites.py) → the roofline of the model's weight kernels
(amppatch.limit) → profile.json and its summary (document.py).
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

from amppatch.limit import ModelRoofline, SettingRates, measure_model
from amppatch.profile.derive import bandwidth, in_spans, matrix_ops, summarize_regions, token_stats
from amppatch.profile.document import ProfileResult, mark_blind, new_document, trace_visibility, write_document
from amppatch.profile.sites import _aggregate, _model_bytes, _sites
from amppatch.profile.workload import (
    ProfileOptions,
    _raise_if_crashed,
    prepare_workload,
    resolve_options,
    run_workload,
    trace_dir_for,
)

if TYPE_CHECKING:
    from pathlib import Path

    from amppatch.build import Build
    from amppatch.machine import MachineInfo
    from amppatch.tracer import Trace


def profile(options: ProfileOptions) -> ProfileResult:
    """Run the workload under the chosen backend and write profile.json (the path is returned)."""
    from amppatch.machine import probe_machine
    from amppatch.tracer import read_trace, trace_files

    options = resolve_options(options)
    assert options.out is not None
    build, argv, linkage = prepare_workload(options)
    machine = probe_machine()
    trace_dir = trace_dir_for(options.out)
    try:
        run = run_workload(options, build, argv, linkage)
    except BaseException:
        # no profile.json will name the trace: a failed or interrupted run leaves no partial trace behind
        shutil.rmtree(trace_dir, ignore_errors=True)
        raise
    files = trace_files(run.trace_path)
    data = new_document(options, machine, run, tracer_loaded=bool(files))
    if run.pages is not None:
        data["huge_pages"] = run.pages.to_json()
    crash_signal = 0
    if not files:
        mark_blind(data, linkage)
    else:
        # The root trace is the workload itself; children (if any) are listed.
        trace = read_trace(files[0])
        data.update(_from_trace(options, build, machine, trace, files, data["notes"], data["visibility"]))
        data["machine"]["cpu_model"] = machine.cpu_model
        crash_signal = trace.crash_signal
    try:
        data["roofline"] = _roofline(options, build, data, run.done.returncode).to_json()
    except KeyboardInterrupt:
        # what the workload showed is kept (profile.json names its trace), then the exit status says 130
        data["roofline"] = ModelRoofline.unavailable("not measured (interrupted)").to_json()
        write_document(options.out, data)
        raise
    result = write_document(options.out, data)
    _raise_if_crashed(run.done.returncode, options.out, crash_signal)
    return result


def _roofline(options: ProfileOptions, build: Build | None, data: dict, returncode: int) -> ModelRoofline:
    """The roofline of the model's dominant weight kernels on the profiled build at the profiled thread count,
    with the profiled run's achieved weight GB/s against it (the same helper as ab-test's)."""
    if not options.roofline:
        return ModelRoofline.unavailable("not measured (--no-roofline)")
    if options.command or options.model is None or build is None:
        return ModelRoofline.unavailable("not measured (it needs the llama-bench workload of a model on a build)")
    if returncode != 0:
        return ModelRoofline.unavailable("not measured (the profiled program failed)")
    from amppatch.gguf_info import read_gguf

    buffer = "cpu" if options.repack == 0 else "auto"  # --repack 0: the plain CPU buffer, as llama-bench
    kernels = measure_model(build.dir, read_gguf(options.model), [options.threads], buffer=buffer)
    achieved = (data.get("bandwidth") or {}).get("achieved_gbps")
    label = f"{options.threads} thread{'s' if options.threads != 1 else ''}"
    return kernels.assemble([SettingRates(f"t{options.threads}", label, options.threads, (("profiled", achieved),))])


def _from_trace(options: ProfileOptions, build: Build | None, machine: MachineInfo, trace: Trace,
                files: list[Path], notes: list[str], seen: dict) -> dict:
    """profile.json's sections that come from the trace: tokens, regions, bandwidth, sampling, hot
    functions and lines, sites (notes and visibility are filled in place)."""
    from amppatch.symbolize import symbolize

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
    # a mixture of experts: name the products (mul_mat / mul_mat_id) that drive each kernel, by its weight type
    hot_functions = matrix_ops(hot_functions, type_bytes, dict(bytes_provenance.get("experts_by_type") or {}))
    trace_visibility(seen, trace, samples, spans, regions, locations, children)

    sites: list[dict] = []
    if chains and spans and weights_bpt:
        sites = _sites(options, build, chains, cpu_ns_per_token, max(1, len(tids_in_tokens)), machine,
                       type_bytes, weights_bpt, notes)
    elif not spans:
        notes.append("no token boundaries: no per-token rates, so no sites were derived")
    return {
        "regions": regions,
        "tokens": token,
        "bytes_per_token": {"weights": weights_bpt, **bytes_provenance},
        "bandwidth": bandwidth(weights_bpt, token["p50_ms"], machine.ceiling_for(options.threads), options.threads),
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
