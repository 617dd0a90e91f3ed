"""run's apply, bake and final stages with the levers: which applies run with which flags, what the race is
asked to measure, and which failures end the run (apply and ab-test replaced by fakes)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from amppatch import run as run_mod
from amppatch.run import RunOptions, resolve_options


def _runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thp: str, kept: int = 2) -> run_mod._Runner:
    mode = tmp_path / "thp-enabled"
    mode.write_text(thp + "\n")
    monkeypatch.setenv("AMPPATCH_THP_ENABLED_PATH", str(mode))
    options = resolve_options(RunOptions(out=tmp_path / "o", threads=(1, 2)))
    (tmp_path / "o").mkdir()
    r = run_mod._Runner(options)
    r.outputs = {"fetch": {"repo": str(tmp_path)}, "build": {"build": str(tmp_path / "stock")},
                 "model": {"model": str(tmp_path / "m.gguf"), "gate_model": str(tmp_path / "g.gguf")},
                 "profile": {"profile": str(tmp_path / "profile.json"), "fallback_sites": []},
                 "apply": {"manifest": str(tmp_path / "tunable.json")},
                 "tune": {"kept": kept, "learned": str(tmp_path / "learned.json")}}
    monkeypatch.setattr(r, "build_options", lambda: None)
    return r


def _fake_apply(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Any]:
    from amppatch import build, patch

    seen: list[Any] = []

    def apply(o: Any) -> Any:
        seen.append(o)
        name = o.out.name
        levers = ("hugepages",) if o.hugepages else ()
        manifest = SimpleNamespace(path=o.out / f"{name}.json", branch=f"amppatch/{name}", base_commit="c0ffee",
                                   builds={"a": str(tmp_path / "stock"), "b": str(tmp_path / f"build-{name}")},
                                   build_b=str(tmp_path / f"build-{name}"), levers=levers,
                                   hugepages={"status": "verified", "share_b": 0.9} if o.hugepages else None)
        return SimpleNamespace(manifest=manifest, patch_path=o.out / f"{name}.patch")

    monkeypatch.setattr(patch, "apply", apply)
    monkeypatch.setattr(build, "load_build", lambda p: SimpleNamespace(manifest={"cmake_options": {"X": "1"}}))
    return seen


def test_the_tunable_build_carries_the_pages_that_would_ship(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fake_apply(monkeypatch, tmp_path)
    _runner(tmp_path, monkeypatch, "always [madvise] never").apply_tunable()
    assert seen[-1].tunable and seen[-1].hugepages
    never = tmp_path / "never"
    never.mkdir()
    _runner(never, monkeypatch, "always madvise [never]").apply_tunable()
    assert seen[-1].tunable and not seen[-1].hugepages


def test_bake_makes_prefetch_pages_and_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fake_apply(monkeypatch, tmp_path)
    r = _runner(tmp_path, monkeypatch, "always [madvise] never")
    status, out = r.bake()
    assert status == "done" and list(out["arms"]) == ["prefetch", "pages", "both"]
    assert [(bool(o.learned), o.hugepages, o.out.name) for o in seen] == [
        (True, False, "prefetch"), (False, True, "pages"), (True, True, "both")]
    assert all(not o.tunable and not o.sites and o.profile is None for o in seen)
    both = out["arms"]["both"]
    assert both["levers"] == ["hugepages"] and both["hugepages"]["status"] == "verified"
    assert both["build_flags"]["cmake_options"] == {"X": "1"} and both["patch"].endswith("both.patch")
    assert out["stock_build"] == str(tmp_path / "stock")


def test_thp_never_bakes_no_page_arms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fake_apply(monkeypatch, tmp_path)
    status, out = _runner(tmp_path, monkeypatch, "always madvise [never]").bake()
    assert status == "done" and list(out["arms"]) == ["prefetch"] and not seen[0].hugepages
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    status, out = _runner(nothing, monkeypatch, "always madvise [never]", kept=0).bake()
    assert status == "skipped" and "no lever to race" in out["reason"] and len(seen) == 1


def test_pages_race_alone_when_tune_kept_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fake_apply(monkeypatch, tmp_path)
    status, out = _runner(tmp_path, monkeypatch, "[always] madvise never", kept=0).bake()
    assert status == "done" and list(out["arms"]) == ["pages"] and seen[0].learned == ()


class _Captured(Exception):
    pass


def test_the_final_race_measures_every_arm_at_every_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from amppatch import abtest

    _fake_apply(monkeypatch, tmp_path)
    r = _runner(tmp_path, monkeypatch, "always [madvise] never")
    r.outputs["bake"] = r.bake()[1]
    seen: list[Any] = []

    def capture(options: Any) -> None:
        seen.append(options)
        raise _Captured

    monkeypatch.setattr(abtest, "run_abtest", capture)
    with pytest.raises(_Captured):
        r.final()
    o = seen[0]
    assert [a.name for a in o.arms] == ["stock", "prefetch", "pages", "both"]
    assert [a.build for a in o.arms] == [tmp_path / "stock", *(tmp_path / f"build-{a}" for a in ("prefetch", "pages",
                                                                                                  "both"))]
    assert o.pairs == (("both", "prefetch"),) and o.max_time == 600 and o.roofline
    assert [s.id for s in abtest.settings_for(o)] == ["tg64-t1", "tg64-t2", "tg16-d1024-t1", "pp256-t1"]
    assert o.gate_model == tmp_path / "g.gguf" and not o.skip_correctness


def test_a_slow_models_samples_are_short_in_tune_and_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from amppatch import abtest, tune

    _fake_apply(monkeypatch, tmp_path)
    r = _runner(tmp_path, monkeypatch, "always [madvise] never")
    r.outputs["profile"]["token_p50_ms"] = 330.0  # an 8B at 1 thread
    r.outputs["bake"] = r.bake()[1]
    seen: list[Any] = []

    def capture(options: Any) -> None:
        seen.append(options)
        raise _Captured

    monkeypatch.setattr(tune, "tune", capture)
    monkeypatch.setattr(abtest, "run_abtest", capture)
    with pytest.raises(_Captured):
        r.tune()
    with pytest.raises(_Captured):
        r.final()
    assert seen[0].probe_tokens == 8
    assert [s.id for s in abtest.settings_for(seen[1])] == ["tg16-t1", "tg16-t2", "tg16-d1024-t1", "pp256-t1"]


def test_nothing_baked_skips_the_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = _runner(tmp_path, monkeypatch, "always madvise [never]", kept=0)
    r.outputs["bake"] = {"reason": "no lever to race", "paths": []}
    assert r.final() == ("skipped", {"reason": "no lever to race", "paths": []})


def test_every_stage_runs_once_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from amppatch.runstate import STAGES

    ran: list[str] = []

    def stage(self: run_mod._Runner, name: str, inputs: Any, fn: Any) -> dict[str, Any]:
        ran.append(name)
        return {"report": str(tmp_path / "report.md")}

    monkeypatch.setattr(run_mod._Runner, "stage", stage)
    monkeypatch.setenv("AMPPATCH_THP_ENABLED_PATH", str(tmp_path / "missing"))
    options = resolve_options(RunOptions(out=tmp_path / "o", threads=(1,)))
    (tmp_path / "o").mkdir()
    assert run_mod._run(options) == tmp_path / "report.md"
    assert ran == list(STAGES)
