"""amppatch profile: run a workload under the tracer, find the hot kernels and loops, and derive for each
hot streaming loop a prefetch distance (bytes) and locality hint from measured numbers.

Stages: resolve options → run (LD_PRELOAD tracer, or perf / cachegrind) → read trace → symbolize →
aggregate by function and line → map hot lines onto loops (amppatch.source) → derive → profile.json.

The package is split along those seams; this module only re-exports the names other modules import:
``derive`` (pure: distance and hint from machine numbers, token statistics, bandwidth, kernel naming),
``workload`` (options, argv and environment, the sampler/perf/cachegrind backends, running),
``sites`` (hot lines → loops → sites), ``document`` (profile.json and the terminal summary) and
``stage`` (``profile()``, which ties them together).
"""

from __future__ import annotations

from amppatch.profile.derive import (
    HOT_FUNCTIONS,
    LINE,
    MAX_DISTANCE,
    MIN_DISTANCE,
    WEIGHT_KERNEL_RE,
    Derived,
    SiteInputs,
    attribute_weight_bytes,
    bandwidth,
    bare_name,
    derive_site,
    in_spans,
    percentile,
    site_function_name,
    summarize_regions,
    tensor_type_of_kernel,
    token_stats,
)
from amppatch.profile.document import SCHEMA_VERSION, ProfileResult
from amppatch.profile.sites import GGML_CPU_DIR, HOT_LINES, SITE_MIN_SHARE
from amppatch.profile.stage import profile
from amppatch.profile.workload import (
    BACKENDS,
    ProfileOptions,
    _check_backend,
    elf_linkage,
    parse_cg_annotate,
    parse_perf_report,
    perf_counters_missing,
    resolve_options,
    workload_argv,
)
from amppatch.profiledoc import Profile, ProfileSite

__all__ = [
    "BACKENDS",
    "GGML_CPU_DIR",
    "HOT_FUNCTIONS",
    "HOT_LINES",
    "LINE",
    "MAX_DISTANCE",
    "MIN_DISTANCE",
    "SCHEMA_VERSION",
    "SITE_MIN_SHARE",
    "WEIGHT_KERNEL_RE",
    "Derived",
    "Profile",
    "ProfileOptions",
    "ProfileResult",
    "ProfileSite",
    "SiteInputs",
    "_check_backend",
    "attribute_weight_bytes",
    "bandwidth",
    "bare_name",
    "derive_site",
    "elf_linkage",
    "in_spans",
    "parse_cg_annotate",
    "parse_perf_report",
    "percentile",
    "perf_counters_missing",
    "profile",
    "resolve_options",
    "site_function_name",
    "summarize_regions",
    "tensor_type_of_kernel",
    "token_stats",
    "workload_argv",
]
