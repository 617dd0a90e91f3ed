"""`amppatch tune` for real: a short search on the tiny Q8_0 model, learned.json, and `apply --learned`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amppatch.errors import UsageError
from amppatch.patch import ApplyOptions, GitRepo, apply
from amppatch.tune import TuneOptions, tune

SITE = "ggml_vec_dot_q8_0_q8_0"


@pytest.fixture(scope="module")
def tuned(llama_repo: Path, native_build, tiny_model_q8_0: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("tune")
    result = tune(TuneOptions(
        repo=llama_repo, model=tiny_model_q8_0, sites=(SITE,), threads=1, verify_threads=(), budget_minutes=0.75,
        out=out, grid_min=1024, grid_max=4096, probe_tokens=16, probe_reps=2, probe_rounds=2, confirm_rounds=2,
        refine_levels=1, max_batch=6, gate_model=tiny_model_q8_0))
    assert result.path == out / "learned.json"
    text = result.path.read_text()
    assert result.learned.dumps() == text  # the returned result is the file, key for key
    return {"out": out, "learned": json.loads(text), "path": result.path}


def test_learned_json_records_every_probe(tuned: dict) -> None:
    data = tuned["learned"]
    assert data["schema_version"] == 2 and data["tool"]["command"] == "tune"
    # --site without a profile: no share is known, the budget is split equally and nothing is below --min-share
    assert data["budget"]["split"] == "equal" and data["sites"][0]["share"] is None
    assert data["joint"]["status"] in ("single", "none", "verified", "unverified", "emptied")
    assert data["options"]["threads"] == 1 and data["options"]["sites"] == [SITE]
    assert data["code_path"]["cmake_options"] and data["base_commit"]
    assert data["budget"]["minutes"] == 0.75 and data["budget"]["spent_minutes"] > 0
    probes = data["probes"]
    assert probes, "no probe ran"
    for p in probes:
        assert p["site"] == f"{SITE}#0 x[ib]"
        assert p["distance_bytes"] > 0 and p["hint"] in (0, 1, 2, 3) and p["threads"] == 1
        assert p["ratio"] > 0 and p["ci95"][0] <= p["ratio"] <= p["ci95"][1]
        assert p["verdict"] in ("faster", "slower", "equivalent", "inconclusive")
        assert len(p["samples_ns"]) >= 4 and len(p["off_samples_ns"]) >= 4  # 2 rounds x 2 reps at least
        assert Path(p["report"], "report.json").is_file()
    # the first batch explores both main hints around the start (apply's default 2048 B, hint 3)
    first = [p for p in probes if p["batch"] == 1]
    assert {p["hint"] for p in first} == {0, 3} and {p["distance_bytes"] for p in first} == {1024, 2048, 4096}
    (site,) = data["sites"]
    assert site["start"] == {"distance_bytes": 2048, "hint": 3}
    assert site["kept"] == bool(data["winners"]) and site["reason"]
    assert len(data["winners"]) + len(data["dropped"]) == 1


def test_probes_time_one_binary_under_different_environments(tuned: dict) -> None:
    """Each probe is an interleaved ab-test of the tunable build: 'off' is the site's hint -1, each
    candidate sets its own distance and hint through the site's environment variables."""
    data = tuned["learned"]
    build = data["tunable"]["build"]
    first = next(p for p in data["probes"] if p["batch"] == 1)
    report = json.loads(Path(first["report"], "report.json").read_text())
    arms = {a["name"]: a for a in report["options"]["arms"]}
    assert {a["build"] for a in arms.values()} == {build}
    assert report["options"]["skip_correctness"] is True
    env = data["sites"][0]["env"]
    assert arms["off"]["env"][env["hint"]] == "-1"
    name = first["name"]
    assert arms[name]["env"] == {env["distance"]: str(first["distance_bytes"]), env["hint"]: str(first["hint"])}


def test_apply_learned_bakes_the_winner_as_constants(tuned: dict, llama_repo: Path, tmp_path: Path) -> None:
    data = dict(tuned["learned"])
    if not data["winners"]:
        # On the tiny model prefetching rarely pays (its weights sit in cache), so the search usually drops
        # the site; bake its best probe instead to check the mechanism itself.
        best = max(data["probes"], key=lambda p: p["ratio"])
        s = data["sites"][0]
        data["winners"] = [{"key": s["key"], "function": s["function"], "loop": s["loop"], "stream": s["stream"],
                            "distance_bytes": best["distance_bytes"], "hint": best["hint"], "ratio": best["ratio"],
                            "ci95": best["ci95"]}]
    learned = tmp_path / "learned.json"
    learned.write_text(json.dumps(data))
    w = data["winners"][0]
    result = apply(ApplyOptions(repo=llama_repo, learned=(learned,), dry_run=True, out=tmp_path / "out"))
    (site,) = result.sites
    assert (site.request.distance_bytes, site.request.hint, site.request.origin) == (
        w["distance_bytes"], w["hint"], "learned")
    added = [ln for ln in result.diff.splitlines() if ln.startswith("+") and "__builtin_prefetch" in ln]
    assert added and all(f"+ {w['distance_bytes']}, 0, {w['hint']});" in ln for ln in added)
    assert "getenv" not in result.diff and "amppatch-tunables.h" not in result.diff
    assert GitRepo(llama_repo).dirty_files() == []


def test_apply_learned_without_winners_says_why(tuned: dict, llama_repo: Path, tmp_path: Path) -> None:
    data = dict(tuned["learned"])
    data["winners"] = []
    data["dropped"] = [{"key": "k", "reason": "no setting beats off"}]
    learned = tmp_path / "learned.json"
    learned.write_text(json.dumps(data))
    with pytest.raises(UsageError, match=r"keeps no site.*no setting beats off"):
        apply(ApplyOptions(repo=llama_repo, learned=(learned,), dry_run=True))
    with pytest.raises(UsageError, match="cannot be combined"):
        apply(ApplyOptions(repo=llama_repo, learned=(learned,), sites=(SITE,), dry_run=True))


def test_the_joint_race_sets_the_kept_sites_against_every_site_off(tuned: dict, llama_repo: Path,
                                                                    tiny_model_q8_0: Path, tmp_path: Path) -> None:
    """The joint verification's race: one interleaved ab-test of the tunable build, 'off' with every site's
    hint -1, 'joint' with the given sites at their settings; its ratio and CI come back as a RaceResult."""
    from amppatch.patch.manifest import ApplyManifest
    from amppatch.tune import Budget, Candidate
    from amppatch.tune.probing import _Prober

    data = tuned["learned"]
    manifest = ApplyManifest.read(Path(data["tunable"]["manifest"]))
    options = TuneOptions(repo=llama_repo, model=tiny_model_q8_0, out=tmp_path, probe_tokens=16, probe_reps=2,
                          bench_args=())
    prober = _Prober(options, Path(data["tunable"]["build"]), list(manifest.sites), Budget(120.0))
    result = prober.race({0: Candidate(2048, 3)}, 1, 2)
    assert result.ratio is not None and result.ci95 is not None
    assert result.ci95[0] <= result.ratio <= result.ci95[1] and result.rounds == 2
    report = json.loads(Path(result.extra["report"], "report.json").read_text())
    arms = {a["name"]: a for a in report["options"]["arms"]}
    env = manifest.sites[0]["env"]
    assert arms["off"]["env"][env["hint"]] == "-1"
    assert arms["joint"]["env"] == {env["distance"]: "2048", env["hint"]: "3"}
