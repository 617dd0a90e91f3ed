"""The bench's configurations (pure): weight type × code path × thread count, and the ab-test runs they
group into (one run per weight type and code path, its thread counts as settings of that run)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from amppatch.errors import UsageError

WEIGHT_TYPES = ("q8_0", "q4_0", "f16")
THREADS = (1, 2)
MODEL_SHAPE = "1b"


@dataclass(frozen=True)
class CodePath:
    name: str
    build: str  # build family: native | noamx | amx
    bench_args: tuple[str, ...]
    types: tuple[str, ...]
    description: str


CODE_PATHS: dict[str, CodePath] = {
    "native": CodePath("native", "native", (), WEIGHT_TYPES,
                       "default native build (GGML_NATIVE=ON, -march=native)"),
    "noamx": CodePath("noamx", "noamx", (), WEIGHT_TYPES,
                      "GGML_NATIVE=OFF, AVX2 + AVX512 F/VNNI/BF16/VBMI, F16C, FMA, BMI2, no AMX (as on Zen 4)"),
    "noamx-repack0": CodePath("noamx-repack0", "noamx", ("--repack", "0"), ("q4_0",),
                              "the no-AMX build with --repack 0 (Q4_0 through ggml_vec_dot_q4_0_q8_0)"),
    # What an AMX CPU's token generation runs: the AMX buffer's batch-1 kernels (AVX512-VNNI for the quantized
    # types, AVX512 for F16). `amppatch build --amx-batch1` compiles them on a CPU without AMX and runs them
    # through the permission shim with -ub 1, so this path exists wherever AVX512-VNNI executes.
    "amx": CodePath("amx", "amx", (), WEIGHT_TYPES,
                    "native + --amx-batch1: the AMX buffer's batch-1 kernels (what an AMX CPU generates tokens with)"),
}


@dataclass(frozen=True, order=True)
class Config:
    weight_type: str
    code_path: str
    threads: int

    @property
    def id(self) -> str:
        return f"{self.weight_type}:{self.code_path}:{self.threads}"

    def to_json(self) -> dict[str, Any]:
        path = CODE_PATHS[self.code_path]
        return {"id": self.id, "weight_type": self.weight_type, "code_path": self.code_path,
                "threads": self.threads, "build": path.build, "bench_args": list(path.bench_args)}


def all_configs() -> list[Config]:
    """Every configuration, headline first: Q8_0 on the native path at 1 thread."""
    out = [Config(t, p.name, n) for p in CODE_PATHS.values() for t in p.types for n in THREADS]
    return sorted(out, key=priority)


def priority(config: Config) -> tuple[int, int, int]:
    """Run order: native before noamx before repack0; q8_0, then q4_0, then f16 (the slowest)."""
    return (list(CODE_PATHS).index(config.code_path), WEIGHT_TYPES.index(config.weight_type), config.threads)


def quick_configs() -> list[Config]:
    """One configuration per code path (1 thread): the smoke test."""
    firsts: dict[str, Config] = {}
    for c in all_configs():
        if c.threads == 1:
            firsts.setdefault(c.code_path, c)
    return list(firsts.values())


def parse_only(text: str) -> list[Config]:
    """Comma-separated TYPE:PATH:THREADS patterns; each field may be `*` or a glob (`q*`), e.g.
    `q8_0:noamx:1`, `*:native:*`, `q4_0:noamx-repack0:2`."""
    known = all_configs()
    chosen: list[Config] = []
    for raw in text.split(","):
        pattern = raw.strip()
        if not pattern:
            continue
        parts = pattern.split(":")
        if len(parts) != 3:
            raise UsageError(f"--only {pattern!r} is not TYPE:PATH:THREADS",
                             next_step="e.g. --only q8_0:noamx:1 or --only '*:native:*'")
        hits = [c for c in known if all(fnmatch.fnmatchcase(v, p) for v, p in
                                        zip((c.weight_type, c.code_path, str(c.threads)), parts, strict=True))]
        if not hits:
            ids = ", ".join(c.id for c in known)
            raise UsageError(f"--only {pattern!r} matches no configuration", next_step=f"choose among {ids}")
        chosen.extend(h for h in hits if h not in chosen)
    if not chosen:
        raise UsageError("--only names no configuration", next_step="e.g. --only q8_0:native:1")
    return sorted(chosen, key=priority)


@dataclass(frozen=True)
class RunGroup:
    """One interleaved ab-test run: a weight type on a code path, at one or more thread counts."""

    weight_type: str
    code_path: str
    threads: tuple[int, ...]

    @property
    def id(self) -> str:
        return f"{self.weight_type}:{self.code_path}:{','.join(map(str, self.threads))}"

    def configs(self) -> list[Config]:
        return [Config(self.weight_type, self.code_path, t) for t in self.threads]


def group_runs(configs: Sequence[Config]) -> list[RunGroup]:
    groups: dict[tuple[str, str], list[int]] = {}
    for c in sorted(configs, key=priority):
        groups.setdefault((c.weight_type, c.code_path), []).append(c.threads)
    return [RunGroup(t, p, tuple(sorted(set(th)))) for (t, p), th in groups.items()]
