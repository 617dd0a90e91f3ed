"""run's final race: the keep rule, which arms and settings race, the THP-never path, the option resolution,
and the report's race, ships and carrying sections (pure: no stage runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from amppatch import run_race
from amppatch.errors import UsageError
from amppatch.run import RunOptions, resolve_options
from amppatch.run_race import Decision, decide, keep_lever
from amppatch.run_report import cmake_flags, render_summary

PRIMARY = "tg64-t1"
LABELS = {"tg64-t1": "tg64, 1 thread", "tg64-t2": "tg64, 2 threads",
          "tg16-d4096-t1": "tg16 at depth 4096, 1 thread", "pp512-t1": "pp512, 1 thread"}


def comp(arm: str, base: str, setting: str, ratio: float | None, lo: float = 0, hi: float = 0) -> dict[str, Any]:
    return {"arm": arm, "baseline": base, "setting": setting, "setting_label": LABELS[setting], "ratio": ratio,
            "ci95": None if ratio is None else [lo, hi], "verdict": "x"}


# --- the keep rule ----------------------------------------------------------------------------------------


def test_a_lever_above_1_everywhere_is_kept() -> None:
    comps = [comp("prefetch", "stock", PRIMARY, 1.19, 1.15, 1.20),
             comp("prefetch", "stock", "pp512-t1", 1.0, 0.98, 1.02)]
    v = keep_lever("prefetch", "prefetch", "stock", comps, PRIMARY)
    assert v.kept and v.why == "gain" and v.primary is not None and v.primary.ratio == 1.19


def test_a_ci_touching_1_at_the_primary_setting_is_no_gain() -> None:
    comps = [comp("prefetch", "stock", PRIMARY, 1.05, 0.999, 1.10), comp("prefetch", "stock", "tg64-t2", 1.2, 1.1, 1.3)]
    v = keep_lever("prefetch", "prefetch", "stock", comps, PRIMARY)
    assert not v.kept and v.why == "no-gain"


def test_a_lever_that_helps_tg_but_hurts_depth_is_not_kept() -> None:
    comps = [comp("prefetch", "stock", PRIMARY, 1.19, 1.15, 1.20),
             comp("prefetch", "stock", "tg16-d4096-t1", 0.97, 0.95, 0.99)]
    v = keep_lever("prefetch", "prefetch", "stock", comps, PRIMARY)
    assert not v.kept and v.why == "hurts" and [h.setting for h in v.hurts] == ["tg16-d4096-t1"]


def test_a_lever_unmeasured_at_the_primary_setting_is_not_kept() -> None:
    v = keep_lever("prefetch", "prefetch", "stock", [comp("prefetch", "stock", PRIMARY, None)], PRIMARY)
    assert not v.kept and v.why == "not-measured"
    assert keep_lever("prefetch", "prefetch", "stock", [], PRIMARY).why == "not-measured"


def test_pages_are_judged_on_top_of_prefetch_when_prefetch_is_kept() -> None:
    arms = ("stock", "prefetch", "pages", "both")
    comps = [comp("prefetch", "stock", PRIMARY, 1.19, 1.15, 1.20), comp("pages", "stock", PRIMARY, 1.04, 1.02, 1.06),
             comp("both", "stock", PRIMARY, 1.20, 1.16, 1.22), comp("both", "prefetch", PRIMARY, 1.01, 0.99, 1.03)]
    d = decide(comps, arms, PRIMARY)
    pages = d.lever("hugepages")
    assert pages is not None and (pages.arm, pages.baseline) == ("both", "prefetch") and pages.why == "no-gain"
    assert d.ships == "prefetch"
    comps[-1] = comp("both", "prefetch", PRIMARY, 1.03, 1.01, 1.05)
    assert decide(comps, arms, PRIMARY).ships == "both"


def test_pages_are_judged_against_stock_when_prefetch_is_not_kept() -> None:
    arms = ("stock", "prefetch", "pages", "both")
    comps = [comp("prefetch", "stock", PRIMARY, 1.01, 0.98, 1.04), comp("pages", "stock", PRIMARY, 1.04, 1.02, 1.06),
             comp("both", "prefetch", PRIMARY, 1.0, 0.9, 1.1)]
    d = decide(comps, arms, PRIMARY)
    pages = d.lever("hugepages")
    assert pages is not None and (pages.arm, pages.baseline) == ("pages", "stock") and pages.kept
    assert d.ships == "pages"
    assert Decision.from_json(d.to_json()) == d


def test_nothing_kept_ships_stock() -> None:
    d = decide([comp("pages", "stock", PRIMARY, 0.99, 0.97, 1.01)], ("stock", "pages"), PRIMARY)
    assert d.ships == "stock" and d.lever("prefetch") is None and d.lever("hugepages") is not None


# --- arms, settings, THP ------------------------------------------------------------------------------------


def test_the_arms_follow_the_levers_present() -> None:
    assert run_race.race_arms(True, True) == ("stock", "prefetch", "pages", "both")
    assert run_race.race_arms(True, False) == ("stock", "prefetch")
    assert run_race.race_arms(False, True) == ("stock", "pages")
    assert run_race.race_arms(False, False) == ("stock",)
    assert run_race.race_pairs(("stock", "prefetch", "pages", "both")) == (("both", "prefetch"),)
    assert run_race.race_pairs(("stock", "pages")) == ()


def test_extra_settings_at_the_first_thread_count() -> None:
    assert [s.id for s in run_race.extra_settings(1, 64, 4096, 512)] == ["tg16-d4096-t1", "pp512-t1"]
    assert run_race.extra_settings(2, 16, 0, 0) == ()


def test_no_thp_at_all_races_no_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMPPATCH_THP_ENABLED_PATH", str(tmp_path / "missing"))
    o = resolve_options(RunOptions(out=tmp_path / "o"))
    assert o.thp_enabled == "unavailable" and not o.hugepages
    text = render_summary(o, {"bake": {"reason": "no lever to race"}}, {})
    assert "- huge pages: this kernel offers no transparent huge pages — not raced, stock behaviour" in text


def test_race_options_race_every_arm_at_every_setting(tmp_path: Path) -> None:
    o = run_race.race_options("/b/stock", {"prefetch": "/b/p", "pages": "/b/h", "both": "/b/2"}, ("--repack", "0"),
                              model=tmp_path / "m.gguf", gate_model=None, threads=(1, 2), long_depth=4096,
                              prompt_tokens=512, quick=False, final_minutes=10, seed=3, out=tmp_path / "final")
    assert [a.name for a in o.arms] == ["stock", "prefetch", "pages", "both"]
    assert all(a.bench_args == ("--repack", "0") for a in o.arms)
    assert o.pairs == (("both", "prefetch"),) and o.max_time == 600 and o.skip_correctness
    assert o.min_rounds == 5 and o.resume  # enough blocks for a verdict; a rerun goes on from the rounds done
    from amppatch.abtest import settings_for

    assert [s.id for s in settings_for(o)] == ["tg64-t1", "tg64-t2", "tg16-d4096-t1", "pp512-t1"]


def test_samples_are_sized_from_the_profiles_token_time(tmp_path: Path) -> None:
    from amppatch.run import PROBE_SECONDS, PROBE_TOKENS, RACE_SECONDS, RACE_TOKENS, sample_tokens

    # a 1B-class model keeps the upper bounds; an 8B at ~330 ms a token gets the lower ones
    assert sample_tokens(25.0, PROBE_SECONDS, PROBE_TOKENS) == 32
    assert sample_tokens(25.0, RACE_SECONDS, RACE_TOKENS) == 64
    assert sample_tokens(330.0, PROBE_SECONDS, PROBE_TOKENS) == 8
    assert sample_tokens(330.0, RACE_SECONDS, RACE_TOKENS) == 16
    assert sample_tokens(100.0, RACE_SECONDS, RACE_TOKENS) == 40  # between the bounds: about 4 s
    assert sample_tokens(None, PROBE_SECONDS, PROBE_TOKENS) == 32  # a profile without token times
    o = run_race.race_options("/b/stock", {"pages": "/b/h"}, (), model=tmp_path / "m.gguf", gate_model=None,
                              threads=(1, 2), long_depth=4096, prompt_tokens=256, quick=False, final_minutes=10,
                              seed=0, out=tmp_path / "final", tokens=16)
    from amppatch.abtest import settings_for

    assert [s.id for s in settings_for(o)] == ["tg16-t1", "tg16-t2", "tg16-d4096-t1", "pp256-t1"]


def test_only_failures_where_stock_failed_too_are_tolerated() -> None:
    failures = [{"arm": "stock", "setting": "pp64-t1", "reason": "r"}, {"arm": "pages", "setting": "pp64-t1",
                                                                          "reason": "r"},
                {"arm": "pages", "setting": "tg16-d128-t1", "reason": "crash"}]
    assert run_race.tolerated_failures(failures, ["pp64-t1", "tg16-d128-t1"]) == failures[:2]
    assert run_race.tolerated_failures(failures, []) == []


# --- options ---------------------------------------------------------------------------------------------


def _never(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str = "always madvise [never]") -> None:
    path = tmp_path / "thp-enabled"
    path.write_text(mode + "\n")
    monkeypatch.setenv("AMPPATCH_THP_ENABLED_PATH", str(path))


def test_options_resolve_long_depth_prompt_and_thp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _never(tmp_path, monkeypatch, "always [madvise] never")
    full = resolve_options(RunOptions(out=tmp_path / "o", threads=(1, 2)))
    assert (full.long_depth, full.prompt_tokens, full.thp_enabled, full.hugepages) == (1024, 256, "madvise", True)
    quick = resolve_options(RunOptions(out=tmp_path / "o", quick=True))
    assert (quick.long_depth, quick.prompt_tokens) == (128, 64)
    assert resolve_options(RunOptions(out=tmp_path / "o", quick=True, long_depth=0, prompt_tokens=32)).long_depth == 0
    _never(tmp_path, monkeypatch)
    assert not resolve_options(RunOptions(out=tmp_path / "o")).hugepages
    with pytest.raises(UsageError, match="must not be negative"):
        resolve_options(RunOptions(out=tmp_path / "o", long_depth=-1))


def test_the_cli_passes_the_race_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from amppatch.cli import cmd_run

    seen: list[RunOptions] = []
    monkeypatch.setattr(cmd_run, "run_pipeline", lambda o: seen.append(o) or tmp_path)
    parser = argparse.ArgumentParser()
    cmd_run.add_arguments(parser)
    cmd_run.run(parser.parse_args(["-o", str(tmp_path / "o"), "--long-depth", "1024", "--prompt-tokens", "0"]))
    assert (seen[0].long_depth, seen[0].prompt_tokens) == (1024, 0)


# --- the report ------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_limit_section(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Limit section reads the final ab-test's report.json, which these recorded outputs only name."""
    from amppatch import run_report

    monkeypatch.setattr(run_report, "limit_lines", lambda report: [])


def _options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> RunOptions:
    _never(tmp_path, monkeypatch, mode)
    return resolve_options(RunOptions(out=tmp_path / "o", threads=(1, 2)))


FLAGS = {"cmake_options": {"CMAKE_BUILD_TYPE": "Release", "GGML_NATIVE": "ON"}, "cflags": "",
         "kernel_flags_applied": ["-mno-amx-tile"], "pgo": False, "amx_batch1": False}


def _baked(*arms: str) -> dict[str, Any]:
    check = {"status": "verified", "share_b": 0.98, "note": None}
    return {"arms": {a: {"patch": f"/out/{a}/x.patch", "base_commit": "9fefe408ba84be56", "build": f"/b/{a}",
                         "build_flags": FLAGS, "hugepages": check if a != "prefetch" else None}
                     for a in arms}, "stock_build": "/b/stock"}


def _final(comps: list[dict[str, Any]], arms: tuple[str, ...], **extra: Any) -> dict[str, Any]:
    settings = sorted({c["setting"] for c in comps}, key=list(LABELS).index)
    return {"report": "/out/final", "arms": list(arms), "comparisons": comps, "cpu_model": "AMD EPYC 9R14",
            "settings": [{"id": s, "label": LABELS[s]} for s in settings],
            "decision": decide(comps, arms, PRIMARY).to_json(), **extra}


def test_thp_never_races_no_pages_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    o = _options(tmp_path, monkeypatch, "always madvise [never]")
    assert run_race.race_arms(True, o.hugepages) == ("stock", "prefetch")
    comps = [comp("prefetch", "stock", PRIMARY, 1.19, 1.15, 1.20)]
    text = render_summary(o, {"bake": _baked("prefetch"), "final": _final(comps, ("stock", "prefetch"))}, {})
    assert "- huge pages: THP is never on this machine — not raced, stock behaviour" in text
    assert "Ships: **prefetch** (arm `prefetch`); patch: `/out/prefetch/x.patch`" in text
    # nothing raced at all: the line still says why pages were not tried
    skipped = render_summary(o, {"bake": {"reason": "no lever to race"}}, {})
    assert "The stock build stays the answer" in skipped and "THP is never on this machine" in skipped


def _four_arm_summary(o: RunOptions, prefetch: tuple[float, float, float], pages: tuple[float, float, float],
                      both: tuple[float, float, float], both_vs_prefetch: tuple[float, float, float]) -> str:
    """report.md of a race of all four arms, each (ratio, CI low, CI high) at the primary setting."""
    comps = [comp("prefetch", "stock", PRIMARY, *prefetch), comp("pages", "stock", PRIMARY, *pages),
             comp("both", "stock", PRIMARY, *both), comp("both", "prefetch", PRIMARY, *both_vs_prefetch)]
    final = _final(comps, ("stock", "prefetch", "pages", "both"))
    return render_summary(o, {"bake": _baked("prefetch", "pages", "both"), "final": final}, {})


def test_pages_without_gain_are_said_plainly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    o = _options(tmp_path, monkeypatch, "always [madvise] never")
    text = _four_arm_summary(o, (1.19, 1.15, 1.20), (1.0, 0.99, 1.01), (1.19, 1.15, 1.21), (1.002, 0.990, 1.012))
    assert "- huge pages: no gain here, ratio 1.002 [0.990, 1.012] (both against prefetch at tg64, 1 thread)" in text
    assert "- prefetch: kept — ratio 1.190 [1.150, 1.200]" in text
    assert "| tg64, 1 thread | both | prefetch | 1.002 | [0.990, 1.012] | spans 1 |" in text
    assert "huge-page mapping of the pages build (apply's check on the gate model): verified, 98% of the" in text


def test_a_race_too_short_to_tell_is_not_called_no_gain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    o = _options(tmp_path, monkeypatch, "always [madvise] never")
    text = _four_arm_summary(o, (1.465, 0.863, 2.535), (1.0, 0.99, 1.01), (1.456, 0.977, 2.202), (1.0, 0.9, 1.1))
    assert ("- prefetch: not shown here, ratio 1.465 [0.863, 2.535] (prefetch against stock at tg64, 1 thread) — "
            "the CI spans 1 and a gain above 5%: the race was too short to tell") in text
    assert "- huge pages: no gain here, ratio 1.000 [0.990, 1.010] (pages against stock" in text
    assert "Ships: **stock** — no lever proved a gain in this race" in text


def test_a_setting_that_hurts_is_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    o = _options(tmp_path, monkeypatch, "always madvise [never]")
    comps = [comp("prefetch", "stock", PRIMARY, 1.19, 1.15, 1.20), comp("prefetch", "stock", "tg64-t2", 1.1, 1.05, 1.2),
             comp("prefetch", "stock", "tg16-d4096-t1", 0.96, 0.94, 0.98),
             comp("prefetch", "stock", "pp512-t1", 1.0, 0.99, 1.01)]
    text = render_summary(o, {"bake": _baked("prefetch"), "final": _final(comps, ("stock", "prefetch"))}, {})
    for label in LABELS.values():  # the table lists every setting
        assert f"| {label} | prefetch | stock |" in text
    assert "| tg16 at depth 4096, 1 thread | prefetch | stock | 0.960 | [0.940, 0.980] | below 1 |" in text
    assert "prefetch: not kept — slower at tg16 at depth 4096, 1 thread: ratio 0.960 [0.940, 0.980]" in text
    assert "Ships: **stock**" in text and "## Carrying the patch" not in text


def test_the_carrying_section_names_patch_flags_and_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    o = _options(tmp_path, monkeypatch, "always [madvise] never")
    text = _four_arm_summary(o, (1.19, 1.15, 1.20), (1.04, 1.02, 1.06), (1.22, 1.18, 1.25), (1.03, 1.01, 1.05))
    carry = text.split("## Carrying the patch")[1]
    assert "git -C <your llama.cpp checkout> am /out/both/x.patch" in carry and "9fefe408ba84" in carry
    assert "-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON" in carry and "`-mno-amx-tile`" in carry
    assert "tuned for this CPU (AMD EPYC 9R14)" in carry and "THP `madvise` or `always`" in carry
    assert "amppatch ab-test --a <stock build> --b <patched build>" in carry
    assert cmake_flags({"cflags": "-O3"}).endswith('-DCMAKE_CXX_FLAGS="-g -O3"')


def test_an_unrunnable_setting_is_reported_not_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    o = _options(tmp_path, monkeypatch, "always madvise [never]")
    comps = [comp("prefetch", "stock", PRIMARY, 1.19, 1.15, 1.20), comp("prefetch", "stock", "pp512-t1", None)]
    comps[1]["unavailable"] = "stock: cannot run prompts on this machine: SIGILL"
    gone = [{"arm": "stock", "setting": "pp512-t1", "reason": "cannot run prompts on this machine: SIGILL"}]
    final = _final(comps, ("stock", "prefetch"), not_measured=gone)
    text = render_summary(o, {"bake": _baked("prefetch"), "final": final}, {})
    assert "Not measured: pp512, 1 thread — this build cannot run it here (cannot run prompts" in text
    assert "Ships: **prefetch**" in text
