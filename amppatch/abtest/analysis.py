"""ab-test's samples and their analysis (pure): every arm against the first (and any other pair of arms),
paired by block.

report.py rebuilds samples and settings from report.json through `samples_from_report` and
`settings_from_report`, so the dependency runs one way: the report renderer imports this module, never the
runner."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from amppatch import stats
from amppatch.abtest.options import MIN_ROUNDS, Setting
from amppatch.errors import UsageError


@dataclass(frozen=True)
class Sample:
    round: int
    block: int
    slot: int
    arm: str
    setting: str
    rep: int
    ns: int
    n_tokens: int

    @property
    def tok_s(self) -> float:
        return self.n_tokens * 1e9 / self.ns


def samples_by_block(samples: Iterable[Sample], arm: str, setting: str, blocks: Sequence[int]) -> list[list[float]]:
    grouped: dict[int, list[float]] = {b: [] for b in blocks}
    for s in samples:
        if s.arm == arm and s.setting == setting and s.block in grouped:
            grouped[s.block].append(s.tok_s)
    return [grouped[b] for b in blocks]


def compare_arms(samples: Sequence[Sample], base: str, other: str, setting: str, *, min_effect: float,
                 seed: int, n_boot: int, interval: str = stats.DEFAULT_INTERVAL) -> stats.Comparison | None:
    """`other` against `base` at one setting, paired by block; None when either has no samples."""
    blocks = sorted({s.block for s in samples if s.setting == setting})
    a = samples_by_block(samples, base, setting, blocks)
    b = samples_by_block(samples, other, setting, blocks)
    if not any(len(x) and len(y) for x, y in zip(a, b, strict=True)):
        return None
    return stats.compare(a, b, min_effect=min_effect, n_boot=n_boot, seed=seed, interval=interval)


def per_round_medians(samples: Sequence[Sample], arm: str, setting: str) -> list[float]:
    rounds = sorted({s.round for s in samples if s.arm == arm and s.setting == setting})
    return [
        float(np.median([s.tok_s for s in samples if s.arm == arm and s.setting == setting and s.round == r]))
        for r in rounds
    ]


def comparison_json(arm: str, base: str, setting: Setting, comp: stats.Comparison | None,
                    unavailable: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"arm": arm, "baseline": base, "setting": setting.id, "setting_label": setting.label}
    if comp is None:
        out.update(verdict="unavailable", ratio=None, ci95=None, unavailable=unavailable or "no samples")
        return out
    out.update(
        verdict=comp.verdict,
        ratio=comp.ratio,
        ci95=[comp.ci_low, comp.ci_high],
        resolution=comp.resolution,
        p_value=comp.p_value,
        p_method=comp.p_method,
        min_effect=comp.min_effect,
        n_a=comp.n_a,
        n_b=comp.n_b,
        n_blocks=comp.n_blocks,
        paired=comp.paired,
        bootstrap=comp.method,
        interval=comp.interval,
        ci95_bootstrap=[comp.boot_low, comp.boot_high],
        block_ratio=_finite(comp.block_ratio),
        ci95_blocks=None if math.isnan(comp.block_low) else [comp.block_low, comp.block_high],
        unavailable=None,
    )
    return out


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def analyze_pairs(samples: Sequence[Sample], pairs: Sequence[tuple[str, str]], settings: Sequence[Setting],
                  failures: dict[tuple[str, str], str], *, min_effect: float, seed: int,
                  n_boot: int, interval: str = stats.DEFAULT_INTERVAL) -> list[dict[str, Any]]:
    """Each (arm, baseline) pair at every setting, paired by block (both arms ran in every block); a pair
    with an arm that failed at a setting is `unavailable` there, with the reason."""
    out = []
    for setting in settings:
        for arm, base in pairs:
            reason = failures.get((base, setting.id)) or failures.get((arm, setting.id))
            if reason:
                who = base if (base, setting.id) in failures else arm
                out.append(comparison_json(arm, base, setting, None, f"{who}: {reason}"))
                continue
            comp = compare_arms(samples, base, arm, setting.id, min_effect=min_effect, seed=seed, n_boot=n_boot,
                                interval=interval)
            out.append(comparison_json(arm, base, setting, comp))
    return out


def analyze(samples: Sequence[Sample], arms: Sequence[str], settings: Sequence[Setting],
            failures: dict[tuple[str, str], str], *, min_effect: float, seed: int,
            n_boot: int, interval: str = stats.DEFAULT_INTERVAL) -> list[dict[str, Any]]:
    """Every arm against the first, at every setting."""
    return analyze_pairs(samples, [(arm, arms[0]) for arm in arms[1:]], settings, failures,
                         min_effect=min_effect, seed=seed, n_boot=n_boot, interval=interval)


def slice_verdicts(samples: Sequence[Sample], arms: Sequence[str], settings: Sequence[Setting], n_slices: int,
                   *, min_effect: float, seed: int, n_boot: int) -> list[dict[str, Any]]:
    """Split the rounds into `n_slices` disjoint consecutive groups and judge each on its own (for A/A
    false-positive checks: ten slices of one long run are ten independent verdicts)."""
    rounds = sorted({s.round for s in samples})
    if n_slices < 1 or len(rounds) < n_slices * MIN_ROUNDS:
        raise UsageError(
            f"{len(rounds)} rounds cannot make {n_slices} slices of at least {MIN_ROUNDS} rounds",
            next_step="use fewer slices or a longer run",
        )
    groups = [list(g) for g in np.array_split(np.array(rounds), n_slices)]
    out = []
    for i, group in enumerate(groups):
        chosen = set(int(r) for r in group)
        part = [s for s in samples if s.round in chosen]
        for comp in analyze(part, arms, settings, {}, min_effect=min_effect, seed=seed, n_boot=n_boot):
            comp["slice"] = i
            comp["rounds"] = [int(group[0]), int(group[-1])]
            out.append(comp)
    return out



_SAMPLE_FIELDS = ("round", "block", "slot", "arm", "setting", "rep", "ns", "n_tokens")


def samples_from_report(report: dict[str, Any]) -> list[Sample]:
    """The raw samples of a report.json (its records also carry the derived tok_s, which is dropped)."""
    return [Sample(**{k: v for k, v in s.items() if k in _SAMPLE_FIELDS}) for s in report["samples"]]


def settings_from_report(report: dict[str, Any]) -> list[Setting]:
    """The settings of a report.json, in the order measured (the first is the headline setting)."""
    return [Setting(s["test"], s["threads"], s["n_tokens"], s.get("depth", 0)) for s in report["settings"]]
