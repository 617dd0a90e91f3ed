"""The bench's arms (pure): one registry entry per arm says which build it runs and how it is run.

How each build role is made (stock, GCC's loop prefetching, PGO, amppatch's branch) is bench/prepare.py's
table of preparation steps; this module only knows what an arm is once its builds exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from amppatch.errors import UsageError
from bench.configs import CODE_PATHS, RunGroup

HUGEPAGES_ENV: tuple[tuple[str, str], ...] = (("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1"),)
NO_AMX_TUNE = ("no --learned names this weight type's AMX-buffer kernel: tune it with `amppatch tune --amx-batch1` "
               "and pass that learned.json")


@dataclass(frozen=True)
class ArmDef:
    """An arm as the bench races it: which build (by role), extra llama-bench flags and environment."""

    name: str
    # stock | gcc-prefetch | pgo | amppatch | amppatch-pgo | pages | amppatch-pages (the hugepages arms
    # reuse stock's or amppatch's build)
    build_role: str
    bench_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    label: str = ""
    # Its weights sit on transparent huge pages: the THP ceiling is its limit, not the 4 KiB-page one.
    huge_pages: bool = False
    # Its build carries amppatch's file-backed huge-page lever (amppatch/pages.py): the model stays mmapped,
    # and the share of the file that landed on huge pages is measured after its run.
    page_lever: bool = False
    # It runs amppatch's branch, so on the amx path it is raced only where a learned.json tuned the weight
    # type's AMX kernel (the quick search never sees those kernels: the branch would leave them unpatched).
    amppatch: bool = False


def hugepages_arm(name: str = "hugepages", build_role: str = "stock") -> ArmDef:
    """`build_role`'s build with the weights in malloc'd memory that glibc backs with transparent huge pages."""
    return ArmDef(name, build_role, ("-lm", "none"), HUGEPAGES_ENV,
                  f"{build_role}, weights in malloc'd memory (-lm none) with glibc.malloc.hugetlb=1 (THP via madvise)",
                  huge_pages=True, amppatch=build_role == "amppatch")


def pages_arm(name: str = "pages", base: str = "stock") -> ArmDef:
    """`base`'s source with the file-backed huge-page lever compiled in, run as usual (mmap)."""
    return ArmDef(name, name, label=f"{base} + amppatch's file-backed huge-page lever (mmapped weights on THP)",
                  huge_pages=True, page_lever=True, amppatch=base == "amppatch")


# The registry, in the order rows and labels are listed. amppatch-hugepages: the amppatch build with the
# hugepages arm's runtime; whether the two levers stack is what an engineer who has both wants to know
# (neither needs the other). pages / amppatch-pages: the same question for the file-backed lever, which keeps
# the mmap (no copy of the weights); hugepages stays as the anonymous-copy alternative it is compared with.
ARM_REGISTRY: dict[str, ArmDef] = {arm.name: arm for arm in (
    ArmDef("stock", "stock"),
    ArmDef("gcc-prefetch", "gcc-prefetch"),
    ArmDef("pgo", "pgo"),
    hugepages_arm(),
    pages_arm(),
    ArmDef("amppatch", "amppatch", amppatch=True),
    ArmDef("amppatch-pgo", "amppatch-pgo", amppatch=True),
    hugepages_arm("amppatch-hugepages", "amppatch"),
    pages_arm("amppatch-pages", "amppatch"),
)}
ARMS = tuple(ARM_REGISTRY)
HUGEPAGE_ARMS = tuple(a.name for a in ARM_REGISTRY.values() if a.huge_pages)
PAGE_LEVER_ARMS = tuple(a.name for a in ARM_REGISTRY.values() if a.page_lever)
AMPPATCH_ARMS = tuple(a.name for a in ARM_REGISTRY.values() if a.amppatch)


def arm_def(name: str) -> ArmDef:
    """The registry's entry; a name it does not know is an arm that runs its own build as is."""
    return ARM_REGISTRY.get(name) or ArmDef(name, name)


def arms_for(group: RunGroup, wanted: Sequence[str], available: dict[str, str | None],
             labels: dict[str, str]) -> tuple[list[ArmDef], dict[str, str]]:
    """The arms of one run (stock first), and why each wanted arm that cannot run was left out.

    `available` maps an arm name to None (runnable) or the reason it is not."""
    path = CODE_PATHS[group.code_path]
    arms: list[ArmDef] = []
    missing: dict[str, str] = {}
    for name in ARMS:
        if name not in wanted and name != "stock":
            continue
        reason = available.get(name, "not prepared")
        if reason is not None:
            missing[name] = reason
            continue
        base = arm_def(name)
        arms.append(replace(base, bench_args=path.bench_args + base.bench_args,
                            label=labels.get(name) or base.label or name))
    if not arms or arms[0].name != "stock":
        raise UsageError(f"{group.id}: the stock arm is not available ({missing.get('stock', '?')})",
                         next_step="every comparison is against stock; fix its build first")
    return arms, missing
