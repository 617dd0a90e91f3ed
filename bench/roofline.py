"""Each configuration's roofline: the kernel's in-cache rate (`amppatch.roofline` on the code path's stock
build, the model's weight type, row width 2048, the configuration's threads; measured once per bench and
cached in the work dir) against the stream-read ceiling of the pages an arm's weights sit on. Every row gets
its bandwidth as a share of the lower side and which side binds (`add_roofline`, pure)."""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch.errors import AmppatchError
from amppatch.paths import write_text_atomic
from amppatch.proc import progress
from amppatch.roofline import RooflineOptions, RooflineResult, binds, contention_warnings
from bench.arms import arm_def
from bench.configs import CODE_PATHS, Config
from bench.measure import measure_lock, read_json

if TYPE_CHECKING:
    from bench.builds import Context

ROW_WIDTH = 2048  # the 1.1B shape's hidden size: the row width of its attention and FFN-up/gate weights
# Short: the in-cache rate of a hot kernel is steady within a second; the bench's budget is for the races.
ROOFLINE_SECONDS = 0.1
ROOFLINE_REPEATS = 5
CACHE_FILE = "rooflines.json"
FIELDS = ("roofline_gbps", "roofline_pct", "binds", "roofline_in_cache_gbps", "roofline_stream_gbps",
          "roofline_pages")


def _repack_off(args: Sequence[str]) -> bool:
    return any(flag == "--repack" and value in ("0", "off", "false") for flag, value in itertools.pairwise(args))


def roofline_options(config: Config, build: Path) -> RooflineOptions:
    """What measure_roofline runs for a configuration: its weights where llama-bench puts them on that path
    (`--repack 0` keeps Q4_0 in the plain CPU buffer, whose kernel is vec_dot)."""
    buffer = "cpu" if _repack_off(CODE_PATHS[config.code_path].bench_args) else "auto"
    return RooflineOptions(build=build, type=config.weight_type, width=ROW_WIDTH, threads=config.threads,
                           buffer=buffer, repeats=ROOFLINE_REPEATS, seconds=ROOFLINE_SECONDS)


def cache_key(options: RooflineOptions, build_key: str) -> str:
    payload = [str(options.build), build_key, options.type, options.width, options.threads, options.buffer,
               options.repeats, options.seconds]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:12]


def roofline_entry(result: RooflineResult, key: str) -> dict[str, Any]:
    """What results.json keeps of one measurement, as JSON values (its medians, spreads and CPU shares; every
    measurement is in the `in_cache` / `streaming` records)."""
    return json.loads(json.dumps({"key": key, "in_cache_gbps": round(result.in_cache_gbps, 3),
            "streaming_gbps": round(result.streaming_gbps, 3), "buffer_type": result.buffer_type,
            "kernel_path": result.kernel_path, "type": result.kernel_type, "row_width": result.row_width,
            "threads": result.threads, "in_cache": result.in_cache.to_json(), "streaming": result.streaming.to_json(),
            "loadavg": list(result.loadavg), "contention": contention_warnings([result]),
            "build_dir": result.build_dir, "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))


def measure_rooflines(ctx: Context, configs: Sequence[Config]) -> dict[str, dict[str, Any]]:
    """The roofline of every configuration whose code path has a stock build, by configuration id; a cached
    measurement of the same build and options is reused (delete the work dir's rooflines.json to redo). A
    failed measurement says why and is tried again on the next bench."""
    from amppatch.roofline import measure_roofline

    path = Path(ctx.options.work) / CACHE_FILE
    cached = read_json(path)
    entries: dict[str, dict[str, Any]] = dict(cached.get("entries") or {}) if isinstance(cached, dict) else {}
    out: dict[str, dict[str, Any]] = {}
    for config in configs:
        build = ctx.stock.get(CODE_PATHS[config.code_path].build)
        if build is None:
            continue  # the path cannot run here: its rows say why
        options = roofline_options(config, build.dir)
        key = cache_key(options, str(build.manifest.get("key", "")))
        hit = entries.get(config.id)
        if hit and hit.get("key") == key:
            out[config.id] = hit
            continue
        try:
            with measure_lock(f"roofline {config.id}"):
                result = measure_roofline(options)
        except AmppatchError as exc:
            out[config.id] = {"key": key, "error": exc.message}
            progress(f"bench: roofline {config.id} not measured: {exc.message}")
            continue
        entries[config.id] = out[config.id] = roofline_entry(result, key)
        write_text_atomic(path, json.dumps({"entries": entries}, indent=2) + "\n")
        progress(f"bench: roofline {config.id}: {result.in_cache_gbps:.1f} GB/s in cache ({result.kernel_path})")
    return out


def add_roofline(rows: list[dict[str, Any]], rooflines: dict[str, dict[str, Any]], ceiling_4k: dict[int, float],
                 ceiling_huge: dict[int, float]) -> list[dict[str, Any]]:
    """Each measured row's roofline: the lower of its configuration's in-cache kernel rate and the stream
    ceiling of its pages (the huge-page one for the arms whose weights sit on huge pages, else the 4 KiB-page
    one) at its thread count; `roofline_pct` its GB/s as % of that, `binds` which side is lower ("kernel":
    even perfect prefetching cannot go faster; "memory"). Without both sides the fields are None."""
    for r in rows:
        if r.get("median_tok_s") is None:
            continue
        threads = int(r["config"]["threads"])
        huge = arm_def(r["arm"]).huge_pages
        in_cache = (rooflines.get(r["config"]["id"]) or {}).get("in_cache_gbps")
        stream = (ceiling_huge if huge else ceiling_4k).get(threads)
        r.update(dict.fromkeys(FIELDS))
        r.update(roofline_pages="huge" if huge else "4k", roofline_in_cache_gbps=in_cache, roofline_stream_gbps=stream)
        if in_cache is None or not stream:
            continue
        roof = min(float(in_cache), float(stream))
        gbps = r.get("gb_per_s")
        r.update(roofline_gbps=roof, binds=binds(float(in_cache), float(stream)),
                 roofline_pct=100.0 * float(gbps) / roof if gbps is not None and roof > 0 else None)
    return rows
