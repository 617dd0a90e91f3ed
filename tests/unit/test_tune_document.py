"""learned.json schema 2 as tune writes it after the passes (kernel shares, budget split, joint result), read
back through `Learned`; schema 1 files are still read; and run's report.md Tune table, from hand-built outputs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from tune_fakes import FakeClock, FakeSites, helps, outcome

from amppatch.errors import UsageError
from amppatch.learned import Learned
from amppatch.patch.manifest import ApplyManifest
from amppatch.run import RunOptions
from amppatch.run_report import joint_line, render_summary
from amppatch.tune import Budget, SearchConfig, SitePasses, TuneOptions, tune_site
from amppatch.tune.document import LearnedWriter

ROOT = Path(__file__).resolve().parents[2]
GRID = (512, 1024, 2048, 4096, 8192, 16384)


def _tuned(tmp_path: Path) -> Learned:
    """Three sites of a Q4_K_M model through every pass, written as learned.json: the gemv kept, one Q6_K
    site rolled back, a cold kernel below --min-share."""
    clock = FakeClock()
    prober = FakeSites({0: helps(1.2), 1: lambda c: 0.97, 2: helps(1.3)}, clock)
    outcomes = [outcome(0, "ggml_gemv_q4_K_8x8_q8_K", 0.76), outcome(1, "ggml_vec_dot_q6_K_q8_K", 0.18),
                outcome(2, "ggml_vec_dot_q8_K", 0.02)]
    budget = Budget(3000.0, clock)
    config = SearchConfig(grid=GRID)
    passes = SitePasses(outcomes, prober, config, budget, threads=1, verify_threads=(), min_share=0.05,
                        search=tune_site)
    options = TuneOptions(repo=tmp_path, model=tmp_path / "m.gguf", profile=tmp_path / "profile.json",
                          budget_minutes=50.0, out=tmp_path, verify_threads=())
    manifest = ApplyManifest(1, tuple(o.site for o in outcomes), path=tmp_path / "tunable.json")
    build = cast(Any, SimpleNamespace(manifest={"key": "k", "compiler": "cc"}, dir=tmp_path / "build"))
    writer = LearnedWriter(tmp_path / "learned.json", options, manifest, build, config, budget, outcomes,
                           "kernel share")
    writer.joint = passes.run()
    return writer.write("done")


def test_schema_2_round_trips_with_shares_split_and_joint_result(tmp_path: Path) -> None:
    learned = _tuned(tmp_path)
    text = (tmp_path / "learned.json").read_text()
    assert Learned.read(tmp_path / "learned.json").dumps() == text == learned.dumps()
    doc = json.loads(text)
    assert doc["schema_version"] == 2
    assert doc["budget"]["split"] == "kernel share" and doc["budget"]["min_share"] == 0.05
    gemv, q6, q8 = (next(s for s in doc["sites"] if s["function"] == f) for f in
                    ("ggml_gemv_q4_K_8x8_q8_K", "ggml_vec_dot_q6_K_q8_K", "ggml_vec_dot_q8_K"))
    assert gemv["kept"] and gemv["share"] == 0.76 and gemv["contribution"]["ratio"] == pytest.approx(1.2)
    # the gemv's share of the pool (less the joint reserve); the last site gets all that is left
    assert gemv["budget"]["allotted_minutes"] == pytest.approx(50 * 0.9 * 0.76 / 0.94, abs=0.01)
    assert q6["budget"]["allotted_minutes"] > 50 - gemv["budget"]["spent_minutes"] - 1
    assert q6["dropped_by"] == "rollback" and "no setting beats off" in q6["reason"]
    assert q8["dropped_by"] == "threshold" and q8["probes"] == [] and q8["stopped_because"] == "not tuned"
    assert {d["dropped_by"] for d in doc["dropped"]} == {"rollback", "threshold"}
    assert [w["function"] for w in doc["winners"]] == ["ggml_gemv_q4_K_8x8_q8_K"]
    assert learned.joint is not None and learned.joint["status"] == "single"
    assert learned.joint["sites"] == ["ggml_gemv_q4_K_8x8_q8_K#0 x"]
    rows = learned.kernel_rows()
    assert [r["function"] for r in rows] == ["ggml_gemv_q4_K_8x8_q8_K", "ggml_vec_dot_q6_K_q8_K",
                                              "ggml_vec_dot_q8_K"]
    assert rows[0]["sites"][0]["distance_bytes"] == 4096 and rows[0]["sites"][0]["hint"] == 3
    assert rows[2]["sites"][0]["ratio"] is None and rows[2]["sites"][0]["dropped_by"] == "threshold"


def test_schema_1_is_still_read_and_other_versions_are_refused(tmp_path: Path) -> None:
    old = ROOT / "bench" / "learned" / "q8_0-vec_dot.json"
    learned = Learned.read(old)
    assert learned.schema_version == 1 and learned.joint is None and "joint" not in learned.to_json()
    (row,) = learned.kernel_rows()
    assert row["share"] is None and row["sites"][0]["ratio"] == pytest.approx(1.134, abs=1e-3)  # its evidence
    doc = json.loads(old.read_text()) | {"schema_version": 3}
    (tmp_path / "learned.json").write_text(json.dumps(doc))
    with pytest.raises(UsageError, match=r"reads learned\.json schema_version 1 or 2"):
        Learned.read(tmp_path / "learned.json")


# ---------------------------------------------------------------------------------------------------- report.md


def _site(key: str, loop: int, stream: str, *, kept: bool, ratio: float | None, ci: list[float] | None,
          dropped_by: str | None = None, reason: str = "", distance: int | None = None, hint: int | None = None
          ) -> dict[str, Any]:
    return {"key": key, "loop": loop, "stream": stream, "kept": kept, "distance_bytes": distance, "hint": hint,
            "dropped_by": dropped_by, "reason": reason, "ratio": ratio, "ci95": ci}


KERNELS = [
    {"function": "ggml_gemv_q4_K_8x8_q8_K", "share": 0.76,
     "sites": [_site("gemv#0 b", 0, "b_ptr[l]", kept=True, ratio=1.061, ci=[1.042, 1.080], distance=4096, hint=3)]},
    {"function": "ggml_vec_dot_q6_K_q8_K", "share": 0.18,
     "sites": [_site("q6#0 ql", 0, "q4", kept=False, ratio=1.008, ci=[0.991, 1.024], dropped_by="rollback",
                     reason="best setting d2048-h3 does not beat off beyond the noise"),
               _site("q6#1 qh", 1, "qh", kept=False, ratio=1.012, ci=[1.004, 1.020], dropped_by="joint",
                     reason="joint verification: gemv#0 b, q6#1 qh together 0.998 [0.985, 1.011] is not wholly "
                            "above 1.000")]},
    {"function": "ggml_vec_dot_q8_K", "share": 0.03,
     "sites": [_site("q8#0 x", 0, "x[i]", kept=False, ratio=None, ci=None, dropped_by="threshold",
                     reason="kernel share 3.0% of the profile's samples is below --min-share 5.0%: not tuned")]},
]
JOINT = {"status": "single", "sites": ["gemv#0 b"], "threads": 1, "threshold": 1.0, "ratio": 1.061,
         "ci95": [1.042, 1.08], "reason": "one site kept", "dropped": [{"key": "q6#1 qh", "reason": "..."}]}


def test_report_tune_section_is_a_per_kernel_table_with_the_joint_line(tmp_path: Path) -> None:
    outputs = {"tune": {"learned": "<run>/tune/learned.json", "kept": 1, "dropped": 3, "kernels": KERNELS,
                        "joint": JOINT, "budget": {"minutes": 20.0, "spent_minutes": 19.4, "probes": 41,
                                                   "stopped_because": "done", "split": "kernel share",
                                                   "min_share": 0.05}}}
    report = render_summary(RunOptions(out=tmp_path, threads=(1, 2)), outputs, {})
    section = report.split("## Tune\n")[1].split("## Stock vs tuned")[0]
    lines = section.strip().splitlines()
    assert lines[2].startswith("| kernel | share | site(s) | tuned setting (distance, hint), or why dropped |")
    assert lines[4] == ("| `ggml_gemv_q4_K_8x8_q8_K` | 76.0% | loop 0 b_ptr[l] | 4096 B, hint 3 | "
                        "1.061 [1.042, 1.080] |")
    q6 = lines[5]
    assert q6.startswith("| `ggml_vec_dot_q6_K_q8_K` | 18.0% | loop 0 q4; loop 1 qh | loop 0 q4: dropped (rollback): ")
    assert "loop 1 qh: dropped (joint): joint verification" in q6
    assert q6.endswith("| loop 0 q4: 1.008 [0.991, 1.024]; loop 1 qh: 1.012 [1.004, 1.020] |")
    assert lines[6].endswith("below --min-share 5.0%: not tuned | — |")
    assert "Joint verification: one site kept after dropping 1 site(s), measured alone against every site off: " \
           "1.061 [1.042, 1.080]." in section
    assert "- budget: 19.4 of 20.0 min (done), 41 probe results; split by kernel share; --min-share 5%\n" in section
    outputs["tune"]["probe_tokens"] = 8
    section = render_summary(RunOptions(out=tmp_path, threads=(1, 2)), outputs, {}).split("## Tune\n")[1]
    assert "; --min-share 5%; probes of tg8\n" in section


def test_joint_line_says_each_outcome() -> None:
    verified = JOINT | {"status": "verified", "sites": ["a", "b"], "dropped": []}
    assert joint_line(verified) == ("Joint verification: a, b together against every site off at 1 thread(s): "
                                    "1.061 [1.042, 1.080], wholly above 1.000.")
    assert "not done — the budget ran out" in joint_line({"status": "unverified",
                                                          "reason": "the budget ran out before the joint race"})
    assert "stock build stays" in joint_line({"status": "emptied", "dropped": [{}, {}]})
    assert joint_line({"status": "none"}) == "Joint verification: no site was kept, nothing to verify."
    assert "schema 1" in joint_line(None)


def test_report_of_a_run_whose_tune_kept_nothing_and_of_an_old_record(tmp_path: Path) -> None:
    o = RunOptions(out=tmp_path, threads=(1,))
    empty = {"tune": {"learned": "l.json", "kernels": [], "joint": {"status": "none"}, "budget": {}}}
    assert "No site was tuned." in render_summary(o, empty, {})
    old = {"tune": {"learned": "l.json", "winners": ["k#0 x d=4096 h=3"], "dropped": 0}}
    assert "- kept: k#0 x d=4096 h=3; dropped: 0" in render_summary(o, old, {})
