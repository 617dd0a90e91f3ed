"""amppatch profile end to end: the tiny model on the native build, plus programs the profiler can only
partly see (no llama symbols, statically linked, crashing), and the optional backends."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from amppatch import proc
from amppatch.build import Build
from amppatch.errors import SubprocessError, ToolMissingError
from amppatch.profile import ProfileOptions, _check_backend, profile

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
KERNEL = re.compile(r"ggml_vec_dot|gemv|gemm|tinygemm|amx|mul_mat")


@pytest.fixture(scope="module")
def stress(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("profile_fixtures")
    dyn, static = out / "tracer_stress", out / "tracer_stress_static"
    proc.run(["cc", "-O1", "-g", "-o", dyn, FIXTURES / "tracer_stress.c", "-lpthread", "-ldl"])
    proc.run(["cc", "-O1", "-g", "-static", "-o", static, FIXTURES / "tracer_stress.c", "-lpthread", "-ldl"])
    return {"dynamic": dyn, "static": static}


def test_tiny_model_hot_function_is_a_kernel(native_build: Build, llama_repo: Path, tiny_model_q8_0: Path,
                                             tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    result = profile(ProfileOptions(repo=llama_repo, build=native_build.dir, model=tiny_model_q8_0, tokens=256,
                                    out=out, roofline=True))
    assert result.path == out
    data = json.loads(out.read_text())
    assert data["schema_version"] == 1
    assert data["machine"]["cpu_model"]
    assert data["options"]["tokens"] == 256 and data["build"]["key"] == native_build.manifest["key"]
    assert data["tokens"]["count"] == 257  # llama-bench's warm-up token plus the measured ones
    assert 0 < data["tokens"]["p50_ms"] <= data["tokens"]["p99_ms"]
    top = data["hot_functions"][0]
    assert KERNEL.search(top["name"]), data["hot_functions"][:5]
    assert "libggml-cpu" in top["module"]
    assert data["hot_functions"] == sorted(data["hot_functions"], key=lambda f: -f["share"])
    assert data["regions"]["weights"], "the weight buffers were not seen"
    assert data["bandwidth"]["achieved_gbps"] > 0 and data["bandwidth"]["ceiling_gbps"] > 0
    for site in data["sites"]:
        assert {"function", "loop", "stream", "distance_bytes", "hint", "inputs"} <= set(site)
        assert site["distance_bytes"] % 64 == 0 and site["hint"] in (0, 1, 2, 3)
        assert site["inputs"]["latency_ns"] > 0
    assert "hot functions" in result.summary
    # where the weights sat in the profiled run, and the roofline of its kernel at its thread count
    pages = result.profile.huge_pages
    assert pages is not None and pages.smaps is not None and pages.share is not None and 0 <= pages.share <= 1
    assert pages.smaps.range_bytes > 0.9 * tiny_model_q8_0.stat().st_size
    part = result.profile.roofline
    assert part is not None and part.available, part
    (kernel,) = part.kernels
    assert kernel.pick.type == "q8_0" and kernel.threads == 1 and kernel.result is not None
    assert kernel.result.buffer_type == "CPU" and kernel.result.in_cache_gbps > 0
    (limit,) = part.settings
    assert limit.roofline_gbps == min(limit.in_cache_gbps or 0, limit.stream_gbps or 0) > 0
    assert dict(limit.arms)["profiled"] == data["bandwidth"]["achieved_gbps"]
    assert "weights on huge pages" in result.summary and "1 thread: roofline" in result.summary


def test_program_without_llama_symbols(stress: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    # 10 rounds × 4 threads × ~40 ms of CPU each: every thread lives through several kernel ticks, so the
    # CPU-time sampler sees it on any machine (2 ms threads were sometimes never sampled).
    result = profile(ProfileOptions(command=(str(stress["dynamic"]), "threads", "10", "60000000"), out=out))
    data = result.profile.to_json()
    assert data == json.loads(out.read_text())
    assert data["visibility"]["tracer_loaded"] and data["visibility"]["samples"] > 0
    assert any("token boundaries" in s for s in data["visibility"]["could_not_see"])
    assert data["tokens"]["count"] == 0 and data["sites"] == []
    assert data["hot_functions"][0]["name"] in ("work", "worker")
    assert "could not see: token boundaries" in result.summary


def test_static_binary_says_what_it_could_not_see(stress: dict[str, Path], tmp_path: Path) -> None:
    result = profile(ProfileOptions(command=(str(stress["static"]), "threads", "2"), out=tmp_path / "p.json"))
    vis = result.profile.get("visibility")
    assert result.profile.get("workload")["linkage"] == "static"
    assert not vis["tracer_loaded"]
    assert "statically linked" in vis["could_not_see"][0]


def test_crash_is_reported_not_hidden(stress: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    with pytest.raises(SubprocessError, match="SIGSEGV") as info:
        profile(ProfileOptions(command=(str(stress["dynamic"]), "crash"), out=out))
    assert info.value.returncode == -signal.SIGSEGV
    data = json.loads(out.read_text())
    assert "SIGSEGV" in data["workload"]["ended"] and data["visibility"]["trace_reason"] == "signal"


def test_perf_backend_is_used_or_clearly_unavailable(stress: dict[str, Path], tmp_path: Path) -> None:
    """Where perf has hardware counters the backend runs and names the hot function; where it has none (most
    VMs, this one included) the request is refused with the reason, not silently sampled another way."""
    options = ProfileOptions(command=(str(stress["dynamic"]), "threads", "2"), backend="perf",
                             out=tmp_path / "p.json")
    if _check_backend("perf"):
        with pytest.raises(ToolMissingError, match="backend perf is unavailable"):
            profile(options)
        return
    rows = profile(options).profile.get("perf")["functions"]
    assert rows and any(r["function"] in ("work", "worker") for r in rows)


def test_cachegrind_backend_on_a_small_program(stress: dict[str, Path], tmp_path: Path) -> None:
    if _check_backend("cachegrind"):
        pytest.skip(_check_backend("cachegrind"))
    result = profile(ProfileOptions(command=(str(stress["dynamic"]), "threads", "2"), backend="cachegrind",
                                    out=tmp_path / "p.json"))
    cg = result.profile.get("cachegrind")
    assert cg["simulated"] and cg["functions"]
    assert any("work" in row["function"] for row in cg["functions"])


@pytest.mark.slow
@pytest.mark.parametrize("weight_type", ["q8_0", "q4_0", "f16"])
@pytest.mark.parametrize("repack", [1, 0])
def test_1b_hot_kernel_and_site(native_build: Build, llama_repo: Path, weight_type: str, repack: int,
                                tmp_path: Path) -> None:
    """The acceptance criterion on the 1.1B shape at 1 thread: a real kernel is hottest and gets a site whose
    distance and hint come with their inputs. Which kernel depends on the CPU (AMX or not), except that
    --repack 0 turns the extra buffers off, so Q8_0 and F16 must then take their vec_dot kernels."""
    from amppatch.model import SynthOptions, synth_model
    from amppatch.profile import MAX_DISTANCE, MIN_DISTANCE, site_function_name

    model = synth_model(SynthOptions(shape="1b", type=weight_type, build=native_build))
    data = profile(ProfileOptions(repo=llama_repo, build=native_build.dir, model=model, threads=1, tokens=32,
                                  repack=repack, out=tmp_path / "p.json")).profile.to_json()
    top = data["hot_functions"][0]
    assert KERNEL.search(top["name"]) and "libggml-cpu" in top["module"] and top["share"] > 0.5
    if repack == 0 and weight_type in ("q8_0", "f16"):
        assert top["name"] == {"q8_0": "ggml_vec_dot_q8_0_q8_0", "f16": "ggml_vec_dot_f16"}[weight_type]
    site = data["sites"][0]
    assert site["function"] == site_function_name(top["name"])  # gemv_..._lut_avx<block_q4_0x8> for Q4_0
    assert MIN_DISTANCE <= site["distance_bytes"] <= MAX_DISTANCE and site["hint"] in (0, 3)
    inputs = site["inputs"]
    assert inputs["latency_ns"] > 0 and inputs["cpu_ns_per_token"] > 0 and inputs["stream_bytes_per_token"] > 0
    assert data["bandwidth"]["ceiling_gbps"] > 0
