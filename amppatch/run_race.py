"""The final race of `amppatch run`: which levers race, at which settings, and which of them ship.

Two levers, each decided by measurement: prefetch (tune's winners baked in as constants) and huge pages (the
weights mapped on transparent huge pages, `pages.py`). The race has one arm per combination:

    stock, prefetch, pages, both        (pages and both only where THP is not `never`; prefetch and both
                                         only when tune kept a site)

and runs at every thread count (tg at depth 0), plus tg at a long context and prompt processing at the first
thread count. The keep rule: a lever is kept when its ratio against the arm without it — prefetch against
stock; pages against stock, or both against prefetch when prefetch is kept — has a 95 % CI wholly above 1 at
the primary setting (the first one: tg at depth 0 at the first thread count), and no setting has a CI wholly
below 1. What ships is the arm of the kept levers.

Pure: the statistics are ab-test's, passed in as its result or the comparisons' JSON; the THP mode is read by
`pages.thp_enabled_mode` when run's options are resolved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch.abtest.options import STOP_MIN_ROUNDS, AbTestOptions, ArmSpec, Setting
from amppatch.abtest.result import REPORT_JSON, AbTestResult

if TYPE_CHECKING:
    from amppatch.patch.manifest import ApplyManifest

NO_THP = ("never", "unavailable")  # THP modes (`pages.thp_enabled_mode`) where the lever maps small pages
ARMS = ("stock", "prefetch", "pages", "both")
LONG_TOKENS = 16  # tokens generated at the long depth
SHIPS = {(False, False): "stock", (True, False): "prefetch", (False, True): "pages", (True, True): "both"}


def race_arms(prefetch: bool, pages: bool) -> tuple[str, ...]:
    """The arms of the race, stock first: one per lever present, and both together when both are."""
    wanted = {"stock": True, "prefetch": prefetch, "pages": pages, "both": prefetch and pages}
    return tuple(arm for arm in ARMS if wanted[arm])


def race_pairs(arms: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Comparisons beyond every arm against stock: the page lever on top of prefetch."""
    return (("both", "prefetch"),) if "both" in arms and "prefetch" in arms else ()


def extra_settings(first_threads: int, tokens: int, long_depth: int, prompt_tokens: int) -> tuple[Setting, ...]:
    """Beyond tg at depth 0 at every thread count: tg at the long depth and pp, at the first thread count
    (0 leaves a setting out). The long context generates at most LONG_TOKENS tokens: every llama-bench call
    first fills the context (untimed, once per call), and generation there is several times slower, so more
    tokens would only lengthen a setting that is already the race's most expensive."""
    out = []
    if long_depth > 0:
        out.append(Setting("tg", first_threads, min(tokens, LONG_TOKENS), long_depth))
    if prompt_tokens > 0:
        out.append(Setting("pp", first_threads, prompt_tokens, 0))
    return tuple(out)


def _ci(comp: Mapping[str, Any]) -> tuple[float, float] | None:
    ci = comp.get("ci95")
    return None if comp.get("ratio") is None or not ci else (float(ci[0]), float(ci[1]))


@dataclass(frozen=True)
class Evidence:
    """One comparison the keep rule looked at."""

    setting: str
    setting_label: str
    ratio: float | None
    ci95: tuple[float, float] | None

    def to_json(self) -> dict[str, Any]:
        return {"setting": self.setting, "setting_label": self.setting_label, "ratio": self.ratio,
                "ci95": None if self.ci95 is None else list(self.ci95)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Evidence:
        ci = doc.get("ci95")
        return cls(doc["setting"], doc.get("setting_label") or doc["setting"], doc.get("ratio"),
                   None if not ci else (ci[0], ci[1]))


@dataclass(frozen=True)
class LeverVerdict:
    """The keep rule's answer for one lever: `why` is "gain" (kept), "no-gain" (the CI at the primary
    setting reaches 1 or below), "hurts" (some setting's CI lies wholly below 1) or "not-measured"."""

    lever: str  # "prefetch" | "hugepages"
    arm: str
    baseline: str
    kept: bool
    why: str
    primary: Evidence | None
    hurts: tuple[Evidence, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"lever": self.lever, "arm": self.arm, "baseline": self.baseline, "kept": self.kept, "why": self.why,
                "primary": None if self.primary is None else self.primary.to_json(),
                "hurts": [h.to_json() for h in self.hurts]}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LeverVerdict:
        primary = doc.get("primary")
        return cls(doc["lever"], doc["arm"], doc["baseline"], bool(doc["kept"]), doc["why"],
                   None if primary is None else Evidence.from_json(primary),
                   tuple(Evidence.from_json(h) for h in doc.get("hurts") or ()))


def keep_lever(lever: str, arm: str, baseline: str, comparisons: Sequence[Mapping[str, Any]],
               primary: str) -> LeverVerdict:
    """The keep rule for `lever`, judged by `arm` against `baseline` over every setting's comparison."""
    mine = [c for c in comparisons if c.get("arm") == arm and c.get("baseline") == baseline]
    evidence = [Evidence(c["setting"], c.get("setting_label") or c["setting"], c.get("ratio"), _ci(c)) for c in mine]
    head = next((e for e in evidence if e.setting == primary), None)
    hurts = tuple(e for e in evidence if e.ci95 is not None and e.ci95[1] < 1.0)
    if head is None or head.ci95 is None:
        why = "not-measured"
    elif hurts:
        why = "hurts"
    elif head.ci95[0] > 1.0:
        why = "gain"
    else:
        why = "no-gain"
    return LeverVerdict(lever, arm, baseline, why == "gain", why, head, hurts)


@dataclass(frozen=True)
class Decision:
    """What the race decided: each raced lever's verdict and the arm that ships ("stock" when none)."""

    ships: str
    primary: str
    levers: tuple[LeverVerdict, ...] = field(default_factory=tuple)

    def lever(self, name: str) -> LeverVerdict | None:
        return next((v for v in self.levers if v.lever == name), None)

    def to_json(self) -> dict[str, Any]:
        return {"ships": self.ships, "primary": self.primary, "levers": [v.to_json() for v in self.levers]}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Decision:
        return cls(doc["ships"], doc["primary"], tuple(LeverVerdict.from_json(v) for v in doc.get("levers") or ()))


def decide(comparisons: Sequence[Mapping[str, Any]], arms: Sequence[str], primary: str) -> Decision:
    """The keep rule over a race's comparisons (every arm against stock, plus `race_pairs`)."""
    verdicts = []
    prefetch = keep_lever("prefetch", "prefetch", "stock", comparisons, primary) if "prefetch" in arms else None
    if prefetch is not None:
        verdicts.append(prefetch)
    pages = None
    if "pages" in arms:
        on_top = prefetch is not None and prefetch.kept and "both" in arms
        pages = keep_lever("hugepages", *(("both", "prefetch") if on_top else ("pages", "stock")), comparisons,
                           primary)
        verdicts.append(pages)
    ships = SHIPS[(bool(prefetch and prefetch.kept), bool(pages and pages.kept))]
    return Decision(ships, primary, tuple(verdicts))


def tolerated_failures(failures: Sequence[Mapping[str, Any]], extra: Sequence[str],
                       stock: str = "stock") -> list[Mapping[str, Any]]:
    """The failures that do not fail the run: those at an extra setting (long depth, pp) where the stock arm
    failed too — this build cannot run that setting here, so it is reported as not measured. A patched arm
    failing where stock ran is a real failure."""
    unrunnable = {f.get("setting") for f in failures if f.get("arm") == stock and f.get("setting") in extra}
    return [f for f in failures if f.get("setting") in unrunnable]


def baked_record(manifest: ApplyManifest, patch: Path | None, build_manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The bake stage's record of one arm: its apply (manifest, exported patch, branch, base commit), its build,
    the levers it carries with the huge-page check, and the flags its build was configured with."""
    return {"manifest": str(manifest.path), "patch": str(patch), "branch": manifest.branch,
            "base_commit": manifest.base_commit, "build": manifest.builds["b"], "stock_build": manifest.builds["a"],
            "levers": list(manifest.levers), "hugepages": manifest.hugepages,
            "build_flags": {k: build_manifest.get(k) for k in ("cmake_options", "cflags", "kernel_flags_applied",
                                                                "pgo", "amx_batch1")}}


def race_options(stock_build: str, builds: Mapping[str, str], bench_args: tuple[str, ...], *, model: Path,
                 gate_model: Path | None, threads: tuple[int, ...], long_depth: int, prompt_tokens: int,
                 quick: bool, final_minutes: float, seed: int, out: Path, tokens: int = 64) -> AbTestOptions:
    """The final ab-test: stock first, then the baked arms in `race_arms` order; tg of `tokens` at depth 0 at
    every thread count, then the extra settings; both against prefetch besides every arm against stock.
    --quick: three fixed rounds of short runs; otherwise the stop rule within `final_minutes`."""
    # not before STOP_MIN_ROUNDS rounds: with fewer blocks the CI of a real 1.5x gain still spans 1, and the
    # keep rule would ship stock for want of evidence
    timing: dict[str, Any] = {"rounds": 3, "tokens": 16, "reps": 2} if quick else \
        {"max_time": final_minutes * 60.0, "min_rounds": STOP_MIN_ROUNDS, "tokens": tokens}
    arms = ("stock", *builds)
    return AbTestOptions(
        arms=(ArmSpec("stock", Path(stock_build), bench_args),
              *(ArmSpec(arm, Path(build), bench_args) for arm, build in builds.items())),
        model=model, threads=threads, seed=seed, out=out, gate_model=gate_model, skip_correctness=gate_model is None,
        extra_settings=extra_settings(threads[0], timing["tokens"], long_depth, prompt_tokens),
        # a rerun of the run goes on from the rounds an interrupted final race recorded
        pairs=race_pairs(arms), roofline=True, resume=True, **timing)


def race_outputs(result: AbTestResult, options: AbTestOptions) -> dict[str, Any]:
    """The final stage's record of the race: every comparison, the decision, and the failures that count."""
    assert result.path is not None
    arms = [a.name for a in options.arms]
    comps = [{"arm": c.arm, "baseline": c.baseline, "setting": c.setting, "setting_label": c.setting_label,
              "ratio": c.ratio, "ci95": None if c.ci95 is None else list(c.ci95), "verdict": c.verdict,
              "unavailable": c.unavailable}
             for c in (*result.comparisons, *result.pair_comparisons)]
    tolerated = tolerated_failures(result.failures, [s.id for s in options.extra_settings])
    return {"report": str(result.path), "paths": [str(result.path / REPORT_JSON)], "arms": arms,
            "settings": [{"id": s.id, "label": s.label} for s in result.settings], "comparisons": comps,
            "decision": decide(comps, arms, result.settings[0].id).to_json(),
            "failures": [f for f in result.failures if f not in tolerated], "not_measured": tolerated,
            "cpu_model": (result.rest.get("environment") or {}).get("cpu_model"),
            "median_tok_s": {a.name: a.median_tok_s for a in result.arms}}
