"""The kernel side of the roofline, measured: how many weight bytes per second a hot kernel consumes when
its weights are cache-resident, against the same kernel streaming them from memory.

A C probe (amppatch/probes/roofline.c) is compiled against one llama.cpp build — the tree's ggml headers,
the build's own libggml / libggml-cpu / libggml-base — so it runs exactly that build's kernels. It computes
one MUL_MAT with n = 1 (a weight matrix of one ggml type, the model's row width, times one f32 activation
column: token generation's shape) with the CPU backend at a given thread count, over and over, at two sizes:
a cache-resident one (default: half of each thread's L2, never more than half the LLC) and a streaming one
(default: 4× the LLC, on 4 KiB pages). The two sizes interleave within every repeat, so slow load changes hit
both. The weights go where llama.cpp puts them: the first extra buffer type of the CPU device that takes
them (CPU_REPACK for Q4_0 on x86 → the repack GEMV; the AMX buffer on an --amx-batch1 build), else the plain
CPU buffer (ggml_vec_dot_*) — or the buffer type asked for.

If the in-cache rate is below the machine's stream-read ceiling, the kernel binds: even perfect prefetching
cannot make token generation faster than the kernel computes. If it is above, memory binds, and in_cache /
ceiling is the most that hiding memory latency could buy.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from amppatch import proc
from amppatch.errors import SubprocessError, UsageError
from amppatch.hugepages import huge_bytes_in_ranges
from amppatch.inputs import check_schema_version

SCHEMA_VERSION = 1
MIB = 1 << 20

# ggml types the probe can fill (quantizable without an importance matrix), with their block sizes: the
# row width must be a multiple of it.
TYPE_BLOCK: dict[str, int] = {
    "f32": 1, "f16": 1, "bf16": 1,
    "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32, "iq4_nl": 32,
    "q2_k": 256, "q3_k": 256, "q4_k": 256, "q5_k": 256, "q6_k": 256, "iq4_xs": 256,
}

# The kernel a MUL_MAT with n = 1 runs, by the buffer type its weights are in.
KERNEL_PATH: dict[str, str] = {
    "CPU": "vec_dot (ggml_vec_dot_<type>_*)",
    "CPU_REPACK": "repack GEMV (ggml_gemv_<type>_*)",
    "AMX": "AMX buffer batch-1 kernel (tinygemm_kernel_*)",
}


@dataclass(frozen=True)
class RooflineOptions:
    build: Path
    type: str = "q8_0"
    width: int = 2048  # the model's row width (ne0 of the weight matrix): 2048 for the 1.1B shape
    threads: int = 1
    buffer: str = "auto"  # auto (as llama.cpp: the first extra buffer type that takes it), cpu, or a buft name
    cache_bytes: int | None = None  # None: half of each thread's L2 times threads, at most half the LLC
    stream_bytes: int | None = None  # None: 4× the LLC (at least 256 MiB, at most a quarter of free memory)
    repeats: int = 9
    seconds: float = 0.3  # per measurement (each size, each repeat)
    stream_ceiling_gbps: float | None = None  # the machine's stream-read ceiling at `threads`, for `binds`


def validate(options: RooflineOptions) -> None:
    """Bad options as one UsageError line."""
    kind = options.type.lower()
    if kind not in TYPE_BLOCK:
        raise UsageError(f"roofline cannot fill weights of type {options.type!r}",
                         next_step=f"use one of {', '.join(TYPE_BLOCK)}")
    block = TYPE_BLOCK[kind]
    if options.width <= 0 or options.width % block:
        raise UsageError(f"row width {options.width} is not a positive multiple of {kind}'s block size {block}",
                         next_step="pass the model's row width, e.g. --width 2048 for the 1.1B shape")
    if options.threads <= 0:
        raise UsageError(f"threads must be at least 1, not {options.threads}")
    if options.repeats < 3:
        raise UsageError(f"repeats must be at least 3 (a median and a spread), not {options.repeats}")
    if not 0 < options.seconds < float("inf"):
        raise UsageError(f"seconds per measurement must be positive, not {options.seconds}")
    for name, value in (("cache bytes", options.cache_bytes), ("stream bytes", options.stream_bytes)):
        if value is not None and value < MIB // 4:
            raise UsageError(f"{name} {value} is too small (at least 256 KiB)")


def default_sizes(threads: int, l2_bytes: int, llc_bytes: int, mem_available_bytes: int) -> tuple[int, int]:
    """(cache-resident bytes, streaming bytes) of the weight matrix.

    In cache: half of each thread's L2 times the threads (the kernel's own rate, not the LLC's bandwidth),
    never more than half the LLC. Streaming: 4× the LLC, at least 256 MiB, at most a quarter of free memory.
    """
    l2 = l2_bytes or MIB * 2
    cache = min(threads * l2 // 2, llc_bytes // 2) if llc_bytes else threads * l2 // 2
    stream = max(4 * llc_bytes, 256 * MIB)
    if mem_available_bytes:
        stream = min(stream, mem_available_bytes // 4)
    return max(cache, MIB // 4), stream


def binds(in_cache_gbps: float, stream_ceiling_gbps: float | None) -> str | None:
    """"kernel" when the kernel consumes cache-resident weights no faster than memory streams them (its
    compute binds), "memory" when it is faster (memory binds); None without a ceiling."""
    if stream_ceiling_gbps is None or stream_ceiling_gbps <= 0:
        return None
    return "kernel" if in_cache_gbps <= stream_ceiling_gbps else "memory"


@dataclass(frozen=True)
class Rate:
    """Repeated measurements of one size: weight GB/s (wall clock) and the CPU share each got."""

    bytes: int  # weight bytes of the matrix
    rows: int
    gbps: tuple[float, ...]
    cpu_share: tuple[float, ...]  # CPU time / (threads × wall time) per measurement; < 1 under contention
    huge_page_bytes: int = 0  # of the weights, on huge pages (from the probe's smaps)

    @property
    def median(self) -> float:
        return statistics.median(self.gbps)

    @property
    def low(self) -> float:
        return min(self.gbps)

    @property
    def high(self) -> float:
        return max(self.gbps)

    @property
    def median_cpu_share(self) -> float:
        return statistics.median(self.cpu_share) if self.cpu_share else 0.0

    @property
    def cpu_normalized_median(self) -> float:
        """Median of GB/s ÷ CPU share: what each measurement would give with the cores to itself — a
        correction for time-slicing only (other processes also evict the caches), so quote it as such."""
        return statistics.median(g / s for g, s in zip(self.gbps, self.cpu_share, strict=True) if s > 0)

    def to_json(self) -> dict:
        return {**asdict(self), "median_gbps": round(self.median, 4), "low_gbps": round(self.low, 4),
                "high_gbps": round(self.high, 4), "median_cpu_share": round(self.median_cpu_share, 4),
                "cpu_normalized_median_gbps": round(self.cpu_normalized_median, 4)}

    @classmethod
    def from_json(cls, data: dict) -> Rate:
        return cls(int(data["bytes"]), int(data["rows"]), tuple(float(g) for g in data["gbps"]),
                   tuple(float(s) for s in data["cpu_share"]), int(data.get("huge_page_bytes", 0)))


@dataclass(frozen=True)
class RooflineResult:
    kernel_type: str  # ggml type name, as ggml prints it (q8_0, f16, q4_0, ...)
    row_width: int
    threads: int
    buffer_type: str  # where the weights were: CPU, CPU_REPACK, AMX
    kernel_path: str  # which kernel family that runs (KERNEL_PATH)
    in_cache: Rate
    streaming: Rate
    stream_ceiling_gbps: float | None
    build_dir: str
    build_key: str
    buffers_offered: tuple[tuple[str, bool], ...] = ()  # extra buffer types of the CPU device: takes them?
    loadavg: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after
    schema_version: int = SCHEMA_VERSION

    @property
    def in_cache_gbps(self) -> float:
        return self.in_cache.median

    @property
    def streaming_gbps(self) -> float:
        return self.streaming.median

    @property
    def binds(self) -> str | None:
        return binds(self.in_cache_gbps, self.stream_ceiling_gbps)

    @property
    def headroom(self) -> float | None:
        """in-cache ÷ ceiling: above 1, how much faster the kernel could go if memory kept up."""
        if not self.stream_ceiling_gbps:
            return None
        return self.in_cache_gbps / self.stream_ceiling_gbps

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "kernel_type": self.kernel_type,
            "row_width": self.row_width,
            "threads": self.threads,
            "buffer_type": self.buffer_type,
            "kernel_path": self.kernel_path,
            "in_cache_gbps": round(self.in_cache_gbps, 4),
            "streaming_gbps": round(self.streaming_gbps, 4),
            "stream_ceiling_gbps": self.stream_ceiling_gbps,
            "binds": self.binds,
            "headroom": None if self.headroom is None else round(self.headroom, 4),
            "in_cache": self.in_cache.to_json(),
            "streaming": self.streaming.to_json(),
            "build_dir": self.build_dir,
            "build_key": self.build_key,
            "buffers_offered": [{"name": n, "takes": t} for n, t in self.buffers_offered],
            "loadavg": list(self.loadavg),
        }

    @classmethod
    def from_json(cls, data: dict) -> RooflineResult:
        check_schema_version(data, SCHEMA_VERSION, what="roofline result",
                             next_step="rerun `amppatch roofline`")
        ceiling = data.get("stream_ceiling_gbps")
        return cls(
            kernel_type=str(data["kernel_type"]),
            row_width=int(data["row_width"]),
            threads=int(data["threads"]),
            buffer_type=str(data["buffer_type"]),
            kernel_path=str(data["kernel_path"]),
            in_cache=Rate.from_json(data["in_cache"]),
            streaming=Rate.from_json(data["streaming"]),
            stream_ceiling_gbps=None if ceiling is None else float(ceiling),
            build_dir=str(data["build_dir"]),
            build_key=str(data["build_key"]),
            buffers_offered=tuple((str(b["name"]), bool(b["takes"])) for b in data.get("buffers_offered", [])),
            loadavg=(float(data["loadavg"][0]), float(data["loadavg"][1])) if data.get("loadavg") else (0.0, 0.0),
            schema_version=SCHEMA_VERSION,
        )


def parse_probe_output(text: str) -> tuple[dict, list[dict], list[dict], str]:
    """The roofline probe's stdout → (setup record, offered buffer types, samples, smaps text)."""
    setup: dict = {}
    offered: list[dict] = []
    samples: list[dict] = []
    smaps: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.startswith("#smaps-begin"):
            inside = True
        elif line.startswith("#smaps-end"):
            inside = False
        elif inside:
            smaps.append(line)
        elif line.startswith("{"):
            rec = json.loads(line)
            event = rec.get("event")
            if event == "setup":
                setup = rec
            elif event == "buffers":
                offered = list(rec.get("offered", []))
            elif event == "sample":
                samples.append(rec)
    return setup, offered, samples, "\n".join(smaps)


def result_from_output(text: str, *, ceiling: float | None, build_dir: str, build_key: str,
                       loadavg: tuple[float, float] = (0.0, 0.0)) -> RooflineResult:
    """A RooflineResult from the probe's stdout (pure)."""
    setup, offered, samples, smaps = parse_probe_output(text)
    if not setup or not samples:
        raise SubprocessError("the roofline probe printed no measurements", output_tail=text[-2000:])
    sets = {s["label"]: s for s in setup["sets"]}
    rates: dict[str, Rate] = {}
    for label in ("cache", "stream"):
        rows = [s for s in samples if s["label"] == label]
        if not rows:
            raise SubprocessError(f"the roofline probe printed no {label} measurement", output_tail=text[-2000:])
        info = sets[label]
        share = huge_bytes_in_ranges(smaps, [(int(info["start"]), int(info["end"]))]) if smaps else None
        rates[label] = Rate(int(info["bytes"]), int(info["rows"]), tuple(float(r["gbps"]) for r in rows),
                            tuple(float(r["cpu_share"]) for r in rows), share.huge_bytes if share else 0)
    buffer = str(setup["buffer"])
    return RooflineResult(
        kernel_type=str(setup["type"]),
        row_width=int(setup["width"]),
        threads=int(setup["threads"]),
        buffer_type=buffer,
        kernel_path=KERNEL_PATH.get(buffer, f"the {buffer} buffer's MUL_MAT"),
        in_cache=rates["cache"],
        streaming=rates["stream"],
        stream_ceiling_gbps=ceiling,
        build_dir=build_dir,
        build_key=build_key,
        buffers_offered=tuple((str(b["name"]), bool(b["takes"])) for b in offered),
        loadavg=loadavg,
    )


def format_table(results: list[RooflineResult]) -> str:
    """A Markdown table of results (one row per kernel and thread count)."""
    lines = ["| type | width | threads | buffer → kernel | in cache GB/s (median [min, max]) | MiB | "
             "streaming GB/s (median [min, max]) | MiB | CPU share cache / stream | ceiling GB/s | binds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c, s = r.in_cache, r.streaming
        ceiling = f"{r.stream_ceiling_gbps:.1f}" if r.stream_ceiling_gbps else "—"
        bound = r.binds or "—"
        if r.headroom is not None:
            bound += f" ({r.headroom:.2f}×)"
        lines.append(
            f"| {r.kernel_type} | {r.row_width} | {r.threads} | {r.buffer_type} → {r.kernel_path} | "
            f"{c.median:.2f} [{c.low:.2f}, {c.high:.2f}] | {c.bytes / MIB:.1f} | "
            f"{s.median:.2f} [{s.low:.2f}, {s.high:.2f}] | {s.bytes / MIB:.0f} | "
            f"{c.median_cpu_share:.2f} / {s.median_cpu_share:.2f} | {ceiling} | {bound} |")
    return "\n".join(lines)


def contention_warnings(results: list[RooflineResult], min_share: float = 0.9) -> list[str]:
    """One line per result whose measurements got less than `min_share` of `threads` cores (median CPU
    share): other processes took the CPU, so its GB/s are depressed — and at several threads a small
    matrix's rate collapses, since every compute waits at ggml's barriers for a thread that is not running."""
    out = []
    for r in results:
        shares = {"in cache": r.in_cache.median_cpu_share, "streaming": r.streaming.median_cpu_share}
        low = {k: v for k, v in shares.items() if v < min_share}
        if low:
            what = ", ".join(f"{k} {v:.2f}" for k, v in low.items())
            out.append(f"{r.kernel_type} at {r.threads} thread(s) ran under contention (CPU share {what}): "
                       "its GB/s are depressed; measure on a quiet machine for absolute numbers")
    return out


# ---- running it (not pure) ----------------------------------------------------------------------------------

def _shared_libs(bin_dir: Path) -> None:
    missing = [name for name in ("ggml", "ggml-cpu", "ggml-base") if not (bin_dir / f"lib{name}.so").exists()]
    if missing:
        raise UsageError(
            f"{bin_dir} has no shared {', '.join('lib' + m + '.so' for m in missing)}: the roofline probe links "
            "against a build's shared ggml libraries",
            next_step="measure a build made by `amppatch build` (shared libraries are its default)")


def probe_binary(build_dir: Path, source_dir: Path, build_key: str) -> Path:
    """The roofline probe compiled against this build (cached by source, compiler, flags and build key)."""
    from amppatch.ctools import compile_c_tool

    bin_dir = build_dir / "bin"
    _shared_libs(bin_dir)
    include = source_dir / "ggml" / "include"
    if not (include / "ggml-cpu.h").is_file():
        raise UsageError(f"{include} has no ggml-cpu.h (the build's source tree is gone or too old)",
                         next_step="rebuild with `amppatch build`")
    source = (resources.files("amppatch") / "probes" / "roofline.c").read_bytes()
    tag = hashlib.sha256(build_key.encode() + str(build_dir).encode()).hexdigest()[:12]
    flags = ("-O2", "-Wall", f"-I{include}", f"-L{bin_dir}", f"-Wl,-rpath,{bin_dir}")
    return compile_c_tool(source, f"roofline-{tag}", flags, ("-lggml", "-lggml-cpu", "-lggml-base", "-lm"))


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def machine_sizes(threads: int) -> tuple[int, int, int]:
    """default_sizes for this machine (caches from sysfs, free memory from /proc/meminfo), and its LLC."""
    from amppatch.machine import read_caches

    caches = read_caches()
    l2 = max((c.size_bytes for c in caches if c.level == 2 and c.type != "Instruction"), default=0)
    llc = max((c.size_bytes for c in caches if c.type != "Instruction"), default=32 * MIB)
    available = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    cache, stream = default_sizes(threads, l2, llc, available)
    return cache, stream, llc


def measure_roofline(options: RooflineOptions) -> RooflineResult:
    """Compile (once per build) and run the roofline probe; the result with every measurement."""
    from amppatch.build import load_build, run_env

    validate(options)
    build = load_build(options.build)
    key = str(build.manifest.get("key", ""))
    exe = probe_binary(build.dir, build.source_dir, key)
    cache, stream, llc = machine_sizes(options.threads)
    cache = options.cache_bytes or cache
    stream = options.stream_bytes or stream
    if cache > llc // 2:
        raise UsageError(f"a {cache / MIB:.1f} MiB weight matrix is not cache-resident here (the LLC is "
                         f"{llc / MIB:.0f} MiB; at most half of it counts)", next_step="pass a smaller --cache-mib")
    if stream < 2 * llc:
        raise UsageError(f"a {stream / MIB:.0f} MiB weight matrix does not stream from memory here (the LLC is "
                         f"{llc / MIB:.0f} MiB; pass at least twice that)", next_step="pass a larger --stream-mib")
    argv: list[str | Path] = [exe, options.type.lower(), str(options.width), str(options.threads), str(cache),
                              str(stream), str(options.repeats), str(options.seconds), options.buffer]
    proc.progress(f"roofline: {options.type} width {options.width}, {options.threads} thread(s): "
                  f"{cache / MIB:.1f} MiB in cache vs {stream / MIB:.0f} MiB streaming, {options.repeats} repeats")
    before = _loadavg()
    done = proc.run(argv, env=run_env(build), check=False, timeout=3600, what="roofline probe")
    after = _loadavg()
    if done.returncode != 0:
        message = next((line.removeprefix("roofline: ") for line in done.stderr.splitlines()
                        if line.startswith("roofline: ")), None)
        if done.returncode == 2 and message:
            raise UsageError(message)
        raise SubprocessError(f"roofline probe failed: {proc.describe_returncode(done.returncode)}",
                              returncode=done.returncode, output_tail=done.stderr[-2000:])
    return result_from_output(done.stdout, ceiling=options.stream_ceiling_gbps, build_dir=str(build.dir),
                              build_key=key, loadavg=(before, after))


def results_to_json(results: list[RooflineResult]) -> dict:
    """The roofline file `amppatch roofline` writes: every result, in the order measured."""
    return {"schema_version": SCHEMA_VERSION, "results": [r.to_json() for r in results]}


def results_from_json(data: dict) -> list[RooflineResult]:
    version = int(data.get("schema_version", 0))
    if version != SCHEMA_VERSION or not isinstance(data.get("results"), list):
        raise UsageError(f"not a roofline file of schema_version {SCHEMA_VERSION}",
                         next_step="pass a file written by `amppatch roofline`")
    return [RooflineResult.from_json(r) for r in data["results"]]


def load_results(path: Path) -> list[RooflineResult]:
    """The results of a roofline file (a bad or missing file is one UsageError line)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read roofline file {path}: {error}") from error
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a roofline file")
    return results_from_json(data)
