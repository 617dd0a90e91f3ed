"""The build layer as the bench uses it: build options per code-path family, builds under the measurement
lock, and the Context that holds what preparation made (builds, models, labels, evidence)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch.errors import AmppatchError
from bench.arms import ArmDef
from bench.measure import measure_lock, read_json
from bench.options import BenchOptions

if TYPE_CHECKING:
    from amppatch.build import Build, BuildOptions

# Zen 4's ISA as ggml's CMake options: AVX512 F/BW/DQ/VL (GGML_AVX512), VNNI, BF16, VBMI; no AVX-VNNI
# (the VEX form arrived with Zen 5) and no AMX. GGML_NATIVE=OFF so -march=native cannot add anything.
NOAMX_DEFINES: tuple[tuple[str, str], ...] = (
    ("GGML_NATIVE", "OFF"), ("GGML_SSE42", "ON"), ("GGML_AVX", "ON"), ("GGML_AVX2", "ON"), ("GGML_BMI2", "ON"),
    ("GGML_FMA", "ON"), ("GGML_F16C", "ON"), ("GGML_AVX512", "ON"), ("GGML_AVX512_VBMI", "ON"),
    ("GGML_AVX512_VNNI", "ON"), ("GGML_AVX512_BF16", "ON"), ("GGML_AVX_VNNI", "OFF"),
    ("GGML_AMX_TILE", "OFF"), ("GGML_AMX_INT8", "OFF"), ("GGML_AMX_BF16", "OFF"),
)  # fmt: skip


@dataclass
class Context:
    options: BenchOptions
    repo: Path
    models: dict[str, Path] = field(default_factory=dict)
    gate_models: dict[str, Path] = field(default_factory=dict)
    stock: dict[str, Build] = field(default_factory=dict)
    builds: dict[tuple[str, str], Build] = field(default_factory=dict)  # (family, arm) -> build
    unavailable: dict[str, str] = field(default_factory=dict)  # arm -> reason (all families)
    family_unavailable: dict[tuple[str, str], str] = field(default_factory=dict)  # (family, arm) -> reason
    amx_types: set[str] = field(default_factory=set)  # weight types whose AMX kernel a learned.json tuned
    labels: dict[str, str] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)
    # arm -> weight type -> variant, for an arm whose build differs per weight type (gcc-prefetch's grid
    # winners): its builds are keyed (family, "ARM|VARIANT").
    type_variants: dict[str, dict[str, str]] = field(default_factory=dict)


def build_options_for(repo: Path, family: str, *, ref: str | None = None, kernel_cflags: str = "",
                      pgo_models: tuple[Path, ...] = (), name: str = "") -> BuildOptions:
    from amppatch.build import BuildOptions

    defines = NOAMX_DEFINES if family == "noamx" else ()
    return BuildOptions(repo=repo, ref=ref, name=name or None, kernel_cflags=kernel_cflags, defines=defines,
                        pgo=bool(pgo_models), pgo_models=pgo_models, amx_batch1=family == "amx")


def is_cached(options: BuildOptions) -> bool:
    """Whether build() would only reuse a finished build (then no measurement lock is needed)."""
    from amppatch.build import DEFAULT_TARGETS, resolve
    from amppatch.paths import cache_dir

    try:
        rb = resolve(options)
    except AmppatchError:
        return False
    d = cache_dir("builds") / rb.dir_key
    m = read_json(d / "manifest.json")
    return bool(m) and m.get("key") == rb.key and all((d / "bin" / t).is_file() for t in DEFAULT_TARGETS)


def locked_build(options: BuildOptions) -> Build:
    from amppatch.build import build

    if is_cached(options):
        return build(options)
    with measure_lock(f"build {options.name}"):
        return build(options)


def arm_build_of(ctx: Context, family: str, arm: ArmDef, weight_type: str) -> Build:
    """The build an arm runs on a code-path family for a weight type."""
    variants = ctx.type_variants.get(arm.name)
    key = arm.name if variants is None else f"{arm.name}|{variants[weight_type]}"
    return ctx.builds[(family, key)]


def arm_build(ctx: Context, family: str, arm: ArmDef, weight_type: str) -> Path:
    """The build directory an arm runs on a code-path family for a weight type."""
    return arm_build_of(ctx, family, arm, weight_type).dir
