"""`amppatch run --quick` end to end on the tiny model, then resume and a failed stage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from amppatch.cli import cmd_run
from amppatch.errors import SubprocessError
from amppatch.run import RunOptions, run
from amppatch.runstate import STAGES


def _cli(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser()
    cmd_run.add_arguments(parser)
    return cmd_run.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def quick_run(llama_repo: Path, native_build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    report = _cli(["--quick", "--repo", str(llama_repo), "-o", str(out)])
    assert report == out / "report.md"
    return out


def test_quick_run_goes_end_to_end(quick_run: Path) -> None:
    state = json.loads((quick_run / "run-state.json").read_text())
    stages = state["stages"]
    assert list(stages) == list(STAGES)
    assert all(stages[s]["status"] == "done" for s in ("fetch", "build", "model", "profile", "apply", "tune",
                                                       "report"))
    assert state["options"]["quick"] is True and state["options"]["shape"] == "tiny"
    profile = json.loads(Path(stages["profile"]["outputs"]["profile"]).read_text())
    assert profile["sites"] or stages["profile"]["outputs"]["fallback_sites"]
    learned = json.loads(Path(stages["tune"]["outputs"]["learned"]).read_text())
    assert learned["probes"] and learned["tunable"]["manifest"] == stages["apply"]["outputs"]["manifest"]
    text = (quick_run / "report.md").read_text()
    pages = state["options"]["thp_enabled"] != "never"
    arms = ["stock"] + (["prefetch"] if learned["winners"] else []) + (["pages"] if pages else [])
    arms += ["both"] if len(arms) == 3 else []
    if len(arms) > 1:
        # every lever that could race was baked and raced against stock, at every setting
        assert stages["bake"]["status"] == "done" and stages["final"]["status"] == "done"
        assert list(stages["bake"]["outputs"]["arms"]) == arms[1:]
        report = json.loads(Path(stages["final"]["outputs"]["report"], "report.json").read_text())
        assert [a["name"] for a in report["arms"]] == arms
        assert all(g["passed"] is True for g in report["correctness"])
        assert [s["id"] for s in report["settings"]] == ["tg16-t1", "tg16-d128-t1", "pp64-t1"]
        for label in ("tg16, 1 thread", "tg16 at depth 128, 1 thread", "pp64, 1 thread"):
            assert f"| {label} | {arms[1]} | stock |" in text
        ships = stages["final"]["outputs"]["decision"]["ships"]
        assert "Ships: **" in text and (ships == "stock") == ("## Carrying the patch" not in text)
        if ships != "stock":
            patch = Path(stages["bake"]["outputs"]["arms"][ships]["patch"])
            assert patch.is_file() and f"am {patch}" in text
        if pages:
            assert "hugepages" in stages["bake"]["outputs"]["arms"]["pages"]["levers"]
        else:
            assert "huge pages: THP is never on this machine" in text
    else:
        assert stages["bake"]["status"] == "skipped" and stages["final"]["status"] == "skipped"
        assert "The stock build stays the answer" in text and learned["dropped"][0]["reason"] in text


def test_rerun_reuses_every_stage(quick_run: Path, llama_repo: Path) -> None:
    before = json.loads((quick_run / "run-state.json").read_text())["stages"]
    run(RunOptions(repo=llama_repo, out=quick_run, quick=True))
    after = json.loads((quick_run / "run-state.json").read_text())["stages"]
    for name in STAGES[:-1]:
        assert after[name]["finished_utc"] == before[name]["finished_utc"], name


def test_failed_stage_names_itself_and_resume_reuses_the_rest(quick_run: Path, llama_repo: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import amppatch.tune

    def broken(options: object) -> object:
        raise SubprocessError("llama-bench failed: killed by SIGKILL", next_step="free some memory")

    before = json.loads((quick_run / "run-state.json").read_text())["stages"]
    monkeypatch.setattr(amppatch.tune, "tune", broken)
    # a longer budget changes the tune stage's key: tune reruns, everything before it is reused
    with pytest.raises(SubprocessError) as info:
        run(RunOptions(repo=llama_repo, out=quick_run, quick=True, threads=(1,), budget_minutes=0.5))
    message = str(info.value)
    assert "stage 'tune' failed" in message and "free some memory" in message and str(quick_run) in message
    state = json.loads((quick_run / "run-state.json").read_text())["stages"]
    assert state["tune"]["status"] == "failed" and "SIGKILL" in state["tune"]["error"]
    for name in ("fetch", "build", "model", "profile", "apply"):
        assert state[name]["finished_utc"] == before[name]["finished_utc"], name
