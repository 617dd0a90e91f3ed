"""What the tracer costs the traced program, measured directly (`amppatch profile --calibrate`).

Sampling: ns per sample = the kernel's signal round trip into the tracer's handler and back (a tgkill loop
with the handler installed) + the handler's own recording time (measured inside it, AMPTRACE_SELFTIME=1);
times the samples actually delivered per CPU-second (the kernel checks CPU-time timers once per scheduler
tick, so the delivered rate can be below the requested one).
Hooks: ns per interposed call = the same call through the PLT with and without the tracer (medians);
times the calls per token a profile's trace counted.
"""

from __future__ import annotations

import json
import os
import statistics
from importlib import resources
from pathlib import Path

from amppatch import proc
from amppatch.ctools import compile_c_tool
from amppatch.inputs import PROFILE, read_json
from amppatch.tracer import read_trace, tracer_library

SCHEMA_VERSION = 1
SPIN_ITERS = 400_000_000  # ≈0.3–0.5 s of one core: enough CPU-time ticks to count the delivered rate
CALLS = 100_000  # stays below the tracer's token-event capacity (2 events per call, 3 functions)
SIGNALS = 100_000
REPEATS = 3


def _tools() -> tuple[Path, Path]:
    pkg = resources.files("amppatch") / "tracer"
    exe = compile_c_tool((pkg / "calib.c").read_bytes(), "amptrace_calib", ("-O2", "-Wall"), ("-ldl",))
    lib = compile_c_tool((pkg / "calib_lib.c").read_bytes(), "libamptrace_calib.so", ("-O2", "-fPIC", "-shared"))
    return exe, lib


def _json(done: proc.Completed) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def _traced_env(out: Path, hz: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"LD_PRELOAD": str(tracer_library()), "AMPTRACE_OUT": str(out), "AMPTRACE_HZ": str(hz),
                "AMPTRACE_PARENT": str(os.getpid()), **extra})
    return env


def calls_per_token(profile_json: Path) -> tuple[dict[str, float], float]:
    """Interposed calls per generated token and the p50 token time (ns) from a profile's trace."""
    data = read_json(Path(profile_json), PROFILE, require=("trace", "tokens.p50_ms"))
    trace = read_trace(Path(data["trace"]))
    tokens = max(1, len(trace.token_ns))
    return {k: v / tokens for k, v in trace.calls().items()}, float(data["tokens"]["p50_ms"]) * 1e6


def measure_overhead(*, hz: int = 1000, profile_json: Path | None = None, workdir: Path) -> dict:
    exe, lib = _tools()
    workdir.mkdir(parents=True, exist_ok=True)
    sig = 27  # SIGPROF on Linux x86-64/arm64, the tracer's default sampling signal
    plain_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("AMPTRACE_")}

    roundtrip, empty = [], []
    for i in range(REPEATS):
        empty.append(_json(proc.run([exe, "signals", str(SIGNALS), str(sig)], env=plain_env))["ns_per_signal"])
        out = workdir / f"sig{i}.bin"
        done = proc.run([exe, "signals", str(SIGNALS), str(sig)], env=_traced_env(out, hz))
        roundtrip.append(_json(done)["ns_per_signal"])

    spin_out = workdir / "spin.bin"
    spin = _json(proc.run([exe, "spin", str(SPIN_ITERS)], env=_traced_env(spin_out, hz, AMPTRACE_SELFTIME="1")))
    trace = read_trace(spin_out)
    main = max(trace.threads, key=lambda t: t.n_samples)
    record_ns = main.handler_ns / max(1, main.n_samples)
    delivered_hz = main.n_samples / (spin["cpu_ns"] / 1e9)
    ns_per_sample = statistics.median(roundtrip) + record_ns
    sample_fraction = delivered_hz * ns_per_sample / 1e9

    plain_calls: dict[str, list[float]] = {}
    traced_calls: dict[str, list[float]] = {}
    for i in range(REPEATS):
        for store, env in ((plain_calls, plain_env), (traced_calls, _traced_env(workdir / f"calls{i}.bin", 0))):
            for k, v in _json(proc.run([exe, "calls", str(CALLS), str(lib)], env=env)).items():
                store.setdefault(k, []).append(float(v))
    per_call = {
        k: max(0.0, statistics.median(traced_calls[k]) - statistics.median(plain_calls[k])) for k in plain_calls
    }

    result: dict = {
        "schema_version": SCHEMA_VERSION,
        "requested_hz": hz,
        "sampling": {
            "signal_roundtrip_ns": round(statistics.median(roundtrip), 1),
            "signal_roundtrip_empty_handler_ns": round(statistics.median(empty), 1),
            "record_ns": round(record_ns, 1),
            "ns_per_sample": round(ns_per_sample, 1),
            "delivered_hz": round(delivered_hz, 1),
            "overhead_fraction_of_cpu": sample_fraction,
            "how": "tgkill round trip into the installed handler + time inside it; × samples delivered per "
                   "CPU-second of a spinning thread",
        },
        "hooks": {"ns_per_call": {k: round(v, 1) for k, v in per_call.items()},
                  "how": "median ns per call through the PLT with the tracer minus without"},
        "commands": {
            "signals": [str(exe), "signals", str(SIGNALS), str(sig)],
            "spin": [str(exe), "spin", str(SPIN_ITERS)],
            "calls": [str(exe), "calls", str(CALLS), str(lib)],
        },
    }
    if profile_json is not None:
        per_token, token_ns = calls_per_token(profile_json)
        cost_map = {"llama_decode": "llama_decode", "llama_process": "llama_process",
                    "llama_synchronize": "llama_synchronize", "posix_memalign": "posix_memalign"}
        hook_ns = sum(per_token.get(k, 0.0) * per_call.get(v, 0.0) for k, v in cost_map.items())
        result["workload"] = {
            "profile": str(profile_json),
            "calls_per_token": {k: round(v, 3) for k, v in per_token.items() if v},
            "token_p50_ns": token_ns,
            "hook_ns_per_token": round(hook_ns, 1),
            "hook_overhead_fraction": hook_ns / token_ns if token_ns else None,
            "total_overhead_fraction": sample_fraction + (hook_ns / token_ns if token_ns else 0.0),
        }
    return result
