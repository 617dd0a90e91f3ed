"""bench/compare.py's pure parts: configurations, arms, the time split, results rows and the Markdown."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds bench/

from amppatch.abtest import AbTestResult
from amppatch.errors import UsageError
from bench import compare


def test_all_configurations_cover_types_paths_and_threads_headline_first() -> None:
    ids = [c.id for c in compare.all_configs()]
    assert len(ids) == 3 * 2 + 3 * 2 + 1 * 2 + 3 * 2  # native, noamx, Q4_0 with --repack 0 on noamx, amx
    assert len(set(ids)) == len(ids)
    assert ids[0] == "q8_0:native:1"
    assert "q4_0:noamx-repack0:2" in ids
    assert not any(i.startswith(("q8_0:noamx-repack0", "f16:noamx-repack0")) for i in ids)


def test_quick_runs_one_configuration_per_code_path() -> None:
    quick = compare.quick_configs()
    assert sorted(c.code_path for c in quick) == sorted(compare.CODE_PATHS)
    assert all(c.threads == 1 for c in quick)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("q8_0:noamx:1", ["q8_0:noamx:1"]),
        ("q8_0:native:1,q8_0:native:2", ["q8_0:native:1", "q8_0:native:2"]),
        ("*:noamx-repack0:*", ["q4_0:noamx-repack0:1", "q4_0:noamx-repack0:2"]),
        ("f16:*:2", ["f16:native:2", "f16:noamx:2", "f16:amx:2"]),
    ],
)
def test_only_selects_by_pattern(text: str, expected: list[str]) -> None:
    assert [c.id for c in compare.parse_only(text)] == expected


@pytest.mark.parametrize("text", ["q8_0:noamx", "q5_1:native:1", "q8_0:noamx-repack0:1", "q8_0:native:4", ","])
def test_only_rejects_what_matches_nothing(text: str) -> None:
    with pytest.raises(UsageError):
        compare.parse_only(text)


def test_runs_group_thread_counts_of_one_type_and_path() -> None:
    groups = compare.group_runs(compare.parse_only("q8_0:native:2,q8_0:native:1,q4_0:noamx:1"))
    assert [(g.id, g.threads) for g in groups] == [("q8_0:native:1,2", (1, 2)), ("q4_0:noamx:1", (1,))]
    assert [c.id for c in groups[0].configs()] == ["q8_0:native:1", "q8_0:native:2"]


def test_arms_put_stock_first_add_path_flags_and_explain_what_is_missing() -> None:
    group = compare.group_runs(compare.parse_only("q4_0:noamx-repack0:1"))[0]
    never = "transparent huge pages are disabled (mode never)"
    available = {a: None for a in compare.ARMS} | dict.fromkeys(compare.HUGEPAGE_ARMS, never)
    arms, missing = compare.arms_for(group, compare.ARMS, available, {"pgo": "PGO label"})
    assert [a.name for a in arms] == ["stock", "gcc-prefetch", "pgo", "amppatch", "amppatch-pgo"]
    assert all(a.bench_args[:2] == ("--repack", "0") for a in arms)
    assert missing == {"hugepages": never, "pages": never, "amppatch-hugepages": never, "amppatch-pages": never}
    assert arms[2].label == "PGO label"


def test_hugepages_arm_runs_stock_without_mmap_under_the_glibc_tunable() -> None:
    group = compare.group_runs(compare.parse_only("q8_0:native:1"))[0]
    arms, _ = compare.arms_for(group, ("stock", "hugepages"), {"stock": None, "hugepages": None}, {})
    huge = arms[1]
    assert huge.build_role == "stock"
    assert huge.bench_args == ("-lm", "none")
    assert dict(huge.env) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # the combined arm: amppatch's build under the same runtime, after --repack 0 where the path has it
    group = compare.group_runs(compare.parse_only("q4_0:noamx-repack0:1"))[0]
    arms, _ = compare.arms_for(group, ("stock", "amppatch-hugepages"),
                               {"stock": None, "amppatch-hugepages": None}, {})
    both = arms[1]
    assert both.build_role == "amppatch"
    assert both.bench_args == ("--repack", "0", "-lm", "none") and both.env == huge.env


def test_every_arm_is_registered_once_and_prepared_by_one_step() -> None:
    assert tuple(compare.ARM_REGISTRY) == compare.ARMS and compare.ARMS[0] == "stock"
    assert compare.HUGEPAGE_ARMS == ("hugepages", "pages", "amppatch-hugepages", "amppatch-pages")
    assert compare.PAGE_LEVER_ARMS == ("pages", "amppatch-pages")
    assert compare.AMPPATCH_ARMS == ("amppatch", "amppatch-pgo", "amppatch-hugepages", "amppatch-pages")
    covered = [a for prep in compare.PREPARATIONS for a in prep.arms]
    assert sorted(covered) == sorted(a for a in compare.ARMS if a != "stock")  # stock is always built


def test_gcc_prefetch_runs_the_build_of_its_weight_types_grid_winner() -> None:
    ctx = compare.Context(compare.BenchOptions(), Path("/r"))
    ctx.builds[("native", "gcc-prefetch|P1")] = SimpleNamespace(dir=Path("/g1"))  # type: ignore[assignment]
    ctx.builds[("native", "gcc-prefetch|P2")] = SimpleNamespace(dir=Path("/g2"))  # type: ignore[assignment]
    ctx.builds[("native", "hugepages")] = SimpleNamespace(dir=Path("/s"))  # type: ignore[assignment]
    ctx.type_variants["gcc-prefetch"] = {"q8_0": "P1", "q4_0": "P2"}
    gcc = compare.arm_def("gcc-prefetch")
    assert compare.arm_build(ctx, "native", gcc, "q4_0") == Path("/g2")
    assert compare.arm_build(ctx, "native", gcc, "q8_0") == Path("/g1")
    assert compare.arm_build(ctx, "native", compare.arm_def("hugepages"), "f16") == Path("/s")


def test_arms_refuse_a_run_without_stock() -> None:
    group = compare.group_runs(compare.parse_only("q8_0:native:1"))[0]
    with pytest.raises(UsageError):
        compare.arms_for(group, compare.ARMS, {"stock": "build failed"}, {})


def test_time_share_follows_the_weights_and_keeps_a_floor() -> None:
    assert compare.time_share(900.0, 2.0, [2.0, 1.0], 60.0) == pytest.approx(600.0)
    assert compare.time_share(10.0, 1.0, [1.0, 1.0], 60.0) == 60.0
    weights = compare.run_weights(compare.group_runs(compare.parse_only("f16:native:*,q4_0:native:1")),
                                  {"f16": 2000, "q4_0": 600})
    assert weights == {"q4_0:native:1": 600.0, "f16:native:1,2": 4000.0}


def _report(**changes: Any) -> AbTestResult:
    """A two-arm result, read through the checker every report.json passes."""
    return AbTestResult.from_json({**_document(), **changes})


def _document() -> dict:
    def by(median: float, share: float) -> dict:
        return {"median_tok_s": median, "cv": 0.02, "n": 8, "failed": None,
                "bandwidth": {"gb_per_s": median * 1.1, "ceiling_gbps": 40.0, "share_of_ceiling": share}}

    return {
        "schema_version": 1,
        "options": {"model": "/m.gguf", "reps": 2, "seed": 0, "min_effect": 0.03},
        "verdict": "faster",
        "settings": [{"id": "tg32-t1", "label": "tg32, 1 thread", "test": "tg", "threads": 1, "n_tokens": 32},
                     {"id": "tg32-t2", "label": "tg32, 2 threads", "test": "tg", "threads": 2, "n_tokens": 32}],
        "arms": [
            {"name": "stock", "build_dir": "/b/s", "bench_args": [], "env": {},
             "by_setting": {"tg32-t1": by(20.0, 0.55), "tg32-t2": by(30.0, 0.7)}},
            {"name": "amppatch", "build_dir": "/b/a", "bench_args": [], "env": {},
             "by_setting": {"tg32-t1": by(28.0, 0.77), "tg32-t2": by(31.0, 0.72)}},
        ],
        "comparisons": [
            {"arm": "amppatch", "baseline": "stock", "setting": "tg32-t1", "ratio": 1.4, "ci95": [1.3, 1.5],
             "verdict": "faster", "resolution": 0.1, "p_value": 0.001, "unavailable": None},
            {"arm": "amppatch", "baseline": "stock", "setting": "tg32-t2", "ratio": None, "ci95": None,
             "verdict": "unavailable", "unavailable": "amppatch: cannot run"},
        ],
        "diagnostics": {"loadavg_start": {"1min": 0.5}, "loadavg_end": {"1min": 1.5}},
        "samples": [],
    }


def test_rows_carry_the_documented_fields_per_configuration_and_arm() -> None:
    group = compare.group_runs(compare.parse_only("q8_0:native:*"))[0]
    arms = [compare.ArmDef("stock", "stock", label="as is"), compare.ArmDef("amppatch", "amppatch", label="amp")]
    rows = compare.rows_from_report(_report(), group, arms, {"report": "/r"})
    assert [(r["config"]["id"], r["arm"]) for r in rows] == [
        ("q8_0:native:1", "stock"), ("q8_0:native:1", "amppatch"),
        ("q8_0:native:2", "stock"), ("q8_0:native:2", "amppatch")]
    for r in rows:
        assert {"config", "arm", "median_tok_s", "ratio", "ci95", "ceiling_pct"} <= set(r)
        assert set(r["config"]) >= {"weight_type", "code_path", "threads"}
    stock1, amp1, _, amp2 = rows
    assert stock1["ratio"] == 1.0 and stock1["ci95"] is None
    assert amp1["ratio"] == 1.4 and amp1["ci95"] == [1.3, 1.5] and amp1["verdict"] == "faster"
    assert amp1["ceiling_pct"] == pytest.approx(77.0)
    assert amp1["loadavg_start"] == {"1min": 0.5} and amp1["report"] == "/r"
    assert amp2["ratio"] is None and amp2["failed"] == "amppatch: cannot run"


def test_rows_refuse_another_report_schema() -> None:
    group = compare.group_runs(compare.parse_only("q8_0:native:1"))[0]
    with pytest.raises(UsageError):
        compare.rows_from_report(_report(schema_version=2), group, [compare.ArmDef("stock", "stock")])


def test_only_reruns_replace_just_their_configurations() -> None:
    def row(cid: str, arm: str, tok: float) -> dict:
        return {"config": {"id": cid}, "arm": arm, "median_tok_s": tok}

    old = [row("q8_0:native:1", "stock", 1.0), row("q8_0:native:1", "pgo", 1.1), row("f16:noamx:2", "stock", 2.0)]
    new = [row("q8_0:native:1", "stock", 5.0)]
    merged = compare.merge_rows(old, new)
    assert [(r["config"]["id"], r["arm"], r["median_tok_s"]) for r in merged] == [
        ("q8_0:native:1", "stock", 5.0), ("f16:noamx:2", "stock", 2.0)]


def test_markdown_section_is_replaced_in_place_and_other_sections_stay() -> None:
    group = compare.group_runs(compare.parse_only("q8_0:native:*"))[0]
    rows = compare.rows_from_report(_report(), group, [compare.ArmDef("stock", "stock"),
                                                       compare.ArmDef("amppatch", "amppatch")])
    results = {"rows": rows, "machine": {"cpu_model": "CPU X", "ceiling_gbps": {"1": 40.0}}, "command": "cmd",
               "runs": [], "arm_labels": {"stock": "as is"}}
    md = compare.render_markdown(results)
    assert "1.400 [1.300, 1.500]" in md and "| q8_0:native:1 | amppatch | 28.00 |" in md
    assert "**Partial:**" in md and "f16:noamx:2" in md
    original = "# results\n\n## profile\n\nkept text\n"
    once = compare.update_results_md(original, md)
    assert once.startswith(original.rstrip("\n")) and compare.SECTION_TITLE in once
    twice = compare.update_results_md(once + "\nhand-written notes\n", md.replace("28.00", "29.00"))
    assert twice.count(compare.SECTION_TITLE) == 1 and "29.00" in twice and "28.00" not in twice
    assert "hand-written notes" in twice and "kept text" in twice


def test_arm_labels_say_which_rows_each_variant_measured() -> None:
    group = compare.group_runs(compare.parse_only("q8_0:native:*"))[0]
    arms = [compare.ArmDef("stock", "stock", label="as is"), compare.ArmDef("amppatch", "amppatch", label="old")]
    rows = compare.rows_from_report(_report(), group, arms)
    results = {"rows": rows, "machine": {}, "command": "cmd", "runs": [],
               "arm_labels": {"stock": "as is", "amppatch": "new"}}
    assert "- `amppatch`: old" in compare.render_markdown(results)  # one variant: the rows' own label
    rows[-1]["arm_label"] = "new"  # an --only rerun of q8_0:native:2 with another learned.json
    md = compare.render_markdown(results)
    assert "- `amppatch` in `q8_0:native:1`: old" in md and "- `amppatch` in `q8_0:native:2`: new" in md


def test_pick_best_never_picks_a_measured_loss() -> None:
    two = {"a": {"ratio": 1.05, "ci95": [0.99, 1.1]}, "b": {"ratio": 1.2, "ci95": [1.1, 1.3]}}
    assert compare.pick_best(two)[0] == "b"
    assert compare.pick_best({"a": {"ratio": 0.97, "ci95": [0.95, 0.99]}})[0] is None
    assert compare.pick_best({"a": {"ratio": None, "ci95": None}})[0] is None


def test_search_targets_split_the_q4_0_kernels() -> None:
    assert compare.search_target("ggml_vec_dot_q8_0_q8_0") == "q8_0"
    assert compare.search_target("gemv_q4_b32_8x8_q8_0_lut_avx") == "q4_0"
    assert compare.search_target("ggml_vec_dot_q4_0_q8_0") == "q4_0-repack0"
    assert compare.search_target("ggml_vec_dot_f16") == "f16"
    assert compare.search_target("ggml_vec_dot_q6_K_q8_K") is None


def test_gcc_grid_params_survive_cmake_option_deduplication() -> None:
    # CMake de-duplicates repeated target options, so a bare `--param` twice would lose one of them.
    assert compare.GCC_GRID
    for params in compare.GCC_GRID:
        assert params.split() and all(tok.startswith("--param=") for tok in params.split())


def test_cli_parses_into_resolved_options(tmp_path: Path) -> None:
    opts = compare.parse_args(["--only", "q8_0:noamx:1", "--arms", "stock,pgo", "--work", str(tmp_path),
                               "--no-results-md", "--results", str(tmp_path / "r.json")])
    resolved = compare.resolve_options(opts)
    assert resolved.only == ("q8_0:noamx:1",) and resolved.arms == ("stock", "pgo")
    assert resolved.results_md is None and resolved.work == tmp_path.resolve()
    assert resolved.to_json()["arms"] == ["stock", "pgo"]
    with pytest.raises(UsageError):
        compare.resolve_options(compare.parse_args(["--arms", "stock,magic"]))
    q8, f16 = tmp_path / "q8" / "learned.json", tmp_path / "f16" / "learned.json"
    for path in (q8, f16):
        path.parent.mkdir()
        path.write_text("{}")
    resolved = compare.resolve_options(compare.parse_args(["--learned", str(q8), "--learned", str(f16)]))
    assert resolved.learned == (q8.resolve(), f16.resolve())
    assert resolved.to_json()["learned"] == [str(q8.resolve()), str(f16.resolve())]
    with pytest.raises(UsageError, match="does not exist"):
        compare.resolve_options(compare.parse_args(["--learned", str(q8), "--learned", str(tmp_path / "nope")]))


def test_rows_get_the_4k_page_ceiling_and_render_only_rewrites_the_table(tmp_path: Path) -> None:
    stream = [{"threads": 1, "thp": 0, "gbps": 30.0}, {"threads": 1, "thp": 0, "gbps": 34.0},
              {"threads": 1, "thp": 1, "gbps": 43.0}, {"threads": 2, "thp": 0, "gbps": 44.0}]
    assert compare.small_page_ceiling(stream) == {1: 34.0, 2: 44.0}  # huge-page passes do not count
    group = compare.group_runs(compare.parse_only("q8_0:native:*"))[0]
    rows = compare.rows_from_report(_report(), group, [compare.ArmDef("stock", "stock"),
                                                       compare.ArmDef("amppatch", "amppatch")])
    results = {"rows": rows, "machine": {"ceiling_4k_gbps": {"1": 34.0, "2": 44.0}}, "command": "cmd",
               "runs": [], "arm_labels": {}}
    out, md = tmp_path / "results.json", tmp_path / "RESULTS.md"
    out.write_text(json.dumps(results))
    opts = compare.parse_args(["--render-only", "--results", str(out), "--results-md", str(md)])
    assert compare.main(["--render-only", "--results", str(out), "--results-md", str(md)]) == 0 and opts.render_only
    rows = json.loads(out.read_text())["rows"]
    for r in rows:
        expected = 100.0 * r["gb_per_s"] / (34.0 if r["config"]["threads"] == 1 else 44.0)
        assert r["ceiling_4k_pct"] == pytest.approx(expected)
    assert "% of 4 KiB-page ceiling" in md.read_text() and "1 thread(s) 34.0 GB/s" in md.read_text()
    # a file from before the roofline: its rows render the new columns empty and no plot is drawn
    assert all(r["roofline_gbps"] is None for r in rows) and "| — | — | — |" in md.read_text()
    assert not (tmp_path / "roofline.png").exists()


def test_amx_path_builds_the_amx_buffer_for_batch_one() -> None:
    amx = compare.build_options_for(Path("/r"), "amx", name="x")
    assert amx.amx_batch1 and amx.defines == ()
    noamx = compare.build_options_for(Path("/r"), "noamx")
    assert not noamx.amx_batch1 and ("GGML_AMX_INT8", "OFF") in noamx.defines
    assert [c.id for c in compare.parse_only("*:amx:1")] == ["q8_0:amx:1", "q4_0:amx:1", "f16:amx:1"]


def test_huge_page_arms_are_not_held_to_the_4k_ceiling_and_amx_tunes_are_recognised(tmp_path: Path) -> None:
    group = compare.group_runs(compare.parse_only("q8_0:native:1"))[0]
    rows = compare.rows_from_report(_report(), group, [compare.ArmDef("stock", "stock"), compare.hugepages_arm()])
    for r in rows:
        r["gb_per_s"] = 30.0
    compare.add_page_ceiling(rows, {1: 34.0})
    assert [r["ceiling_4k_pct"] is None for r in rows] == [False, True]
    vec, amx = tmp_path / "vec.json", tmp_path / "amx.json"
    vec.write_text(json.dumps({"schema_version": 1, "winners": [], "sites": [
        {"kept": True, "file": "ggml/src/ggml-cpu/arch/x86/quants.c", "function": "ggml_vec_dot_q8_0_q8_0"}]}))
    amx.write_text(json.dumps({"schema_version": 1, "winners": [], "sites": [
        {"kept": True, "file": "ggml/src/ggml-cpu/amx/mmq.cpp",
         "function": "tinygemm_kernel_vnni<block_q8_0, block_q4_0, float, BLOCK_M, BLOCK_N, BLOCK_K>::apply"},
        {"kept": False, "file": "ggml/src/ggml-cpu/amx/mmq.cpp",
         "function": "tinygemm_kernel_avx<float, ggml_fp16_t, float, BLOCK_M, BLOCK_N, BLOCK_K>::apply"}]}))
    # only kept AMX sites count, by the weight type their kernel runs (the last block type of the class)
    assert compare.learned_amx_types([vec]) == set() and compare.learned_amx_types([vec, amx]) == {"q4_0"}


def test_amppatch_is_compared_with_the_fastest_other_arm_by_block() -> None:
    samples = []
    for block in range(4):
        for arm, ns in (("stock", 1000), ("hugepages", 800), ("amppatch", 900), ("amppatch-pgo", 500)):
            for rep in range(2):
                samples.append({"round": block, "block": block, "slot": 0, "arm": arm, "setting": "tg32-t1",
                                "rep": rep, "ns": ns + 10 * rep + block, "n_tokens": 32})
    v = compare.amppatch_vs_best_other(samples, "tg32-t1", min_effect=0.03)
    # amppatch's own variants do not count; hugepages is the fastest other arm and amppatch is 8/9 of it
    assert v is not None and v["arm"] == "hugepages"
    assert v["ratio"] == pytest.approx(800 / 900, rel=0.02) and v["ci95"][1] < 1 and v["verdict"] == "slower"
    assert compare.amppatch_vs_best_other(samples, "tg32-t2", min_effect=0.03) is None


# ---- the huge-page lever's arms ------------------------------------------------------------------------------


def test_page_lever_arms_run_their_own_builds_mmapped_and_count_as_huge_page_arms() -> None:
    group = compare.group_runs(compare.parse_only("q4_0:noamx-repack0:1"))[0]
    wanted = ("stock", "hugepages", "pages", "amppatch-pages")
    arms, missing = compare.arms_for(group, wanted, dict.fromkeys(wanted), {"pages": "lever label"})
    assert [a.name for a in arms] == ["stock", "hugepages", "pages", "amppatch-pages"] and not missing
    pages, amp_pages = arms[2], arms[3]
    # the usual mmap: only the path's flags, no -lm none and no glibc tunable (that is the hugepages arm)
    assert pages.bench_args == amp_pages.bench_args == ("--repack", "0") and pages.env == amp_pages.env == ()
    assert (pages.build_role, amp_pages.build_role) == ("pages", "amppatch-pages")
    assert pages.label == "lever label" and pages.page_lever and pages.huge_pages and not pages.amppatch
    assert amp_pages.page_lever and amp_pages.amppatch  # so the amx path without an AMX tune drops it too
    assert not compare.arm_def("hugepages").page_lever


def test_thp_never_drops_every_huge_page_arm_with_the_reason(tmp_path: Path) -> None:
    enabled = tmp_path / "enabled"
    enabled.write_text("always madvise [never]\n")
    never = "transparent huge pages are disabled (mode never)"
    assert compare.thp_status(enabled) == compare.hugepages_status(enabled) == never
    assert "missing" in (compare.thp_status(tmp_path / "absent") or "")
    ctx = compare.Context(compare.BenchOptions(), Path("/r"))
    plan = compare.Plan(Path("/r"), {"native"}, set(compare.ARMS), (), thp_enabled=enabled)
    for prep in compare.PREPARATIONS:  # the steps of the huge-page arms: none may build or branch anything
        if set(prep.arms) & set(compare.HUGEPAGE_ARMS):
            prep.step(ctx, plan)
    assert ctx.unavailable == dict.fromkeys(compare.HUGEPAGE_ARMS, never)
    assert not ctx.builds and not ctx.labels
    enabled.write_text("always [madvise] never\n")
    assert compare.thp_status(enabled) is None


def test_amppatch_pages_says_why_when_the_amppatch_branch_is_missing(tmp_path: Path) -> None:
    enabled = tmp_path / "enabled"
    enabled.write_text("always [madvise] never\n")
    ctx = compare.Context(compare.BenchOptions(), Path("/r"))
    ctx.unavailable["amppatch"] = "the quick search rolled back every site"
    plan = compare.Plan(Path("/r"), {"native"}, {"stock", "amppatch-pages"}, (), thp_enabled=enabled)
    (step,) = [p for p in compare.PREPARATIONS if "amppatch-pages" in p.arms]
    step.step(ctx, plan)
    assert ctx.unavailable["amppatch-pages"] == "the quick search rolled back every site" and not ctx.builds
    # the amppatch step makes the branch amppatch-pages builds on, also when only amppatch-pages is asked for
    (amppatch_step,) = [p for p in compare.PREPARATIONS if "amppatch" in p.arms]
    assert "amppatch-pages" in amppatch_step.feeds


def test_page_shares_are_measured_stock_first_and_only_with_a_page_arm(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import runs

    calls: list[tuple[list[str], dict]] = []

    def fake(builds: dict, model: Path, *, bench_args: dict, env: dict) -> dict:
        calls.append((list(builds), bench_args))
        return {name: {"share": 0.5} for name in builds}

    monkeypatch.setattr(runs, "measure_page_shares", fake)
    monkeypatch.setattr(runs, "measure_lock", lambda what: contextlib.nullcontext())
    ctx = compare.Context(compare.BenchOptions(), Path("/r"))
    ctx.models["q8_0"] = Path("/m.gguf")
    for arm in ("stock", "pgo", "pages"):
        ctx.builds[("native", arm)] = SimpleNamespace(dir=Path(f"/{arm}"))  # type: ignore[assignment]
    group = compare.group_runs(compare.parse_only("q8_0:native:1"))[0]
    arms = [compare.arm_def("stock"), compare.arm_def("pgo"), compare.arm_def("pages")]
    assert set(compare.page_shares(ctx, group, arms)) == {"stock", "pages"}
    assert calls == [(["stock", "pages"], {"stock": (), "pages": ()})]
    assert compare.page_shares(ctx, group, arms[:2]) == {} and len(calls) == 1  # no page arm: nothing to measure


# ---- the roofline ------------------------------------------------------------------------------------------------


def _rows_with_pages() -> list[dict]:
    group = compare.group_runs(compare.parse_only("q8_0:native:*"))[0]
    rows = compare.rows_from_report(_report(), group, [compare.ArmDef("stock", "stock"),
                                                       compare.ArmDef("amppatch", "amppatch")])
    pages = [{**r, "arm": "pages"} for r in rows if r["arm"] == "stock"]
    return compare.merge_rows([], rows + pages)  # in registry order


ROOFLINES = {"q8_0:native:1": {"in_cache_gbps": 50.0}, "q8_0:native:2": {"in_cache_gbps": 30.0}}


def test_rows_get_the_lower_side_of_their_roofline() -> None:
    rows = compare.add_roofline(_rows_with_pages(), ROOFLINES, {1: 34.0, 2: 44.0}, {1: 43.0, 2: 51.0})
    by = {(r["config"]["threads"], r["arm"]): r for r in rows}
    stock1, pages1, stock2 = by[(1, "stock")], by[(1, "pages")], by[(2, "stock")]
    # 1 thread: the kernel in cache (50) outruns both stream ceilings, so the pages' ceiling is the roofline
    assert (stock1["roofline_gbps"], stock1["binds"], stock1["roofline_pages"]) == (34.0, "memory", "4k")
    assert stock1["roofline_pct"] == pytest.approx(100 * 22.0 / 34.0)
    assert (pages1["roofline_gbps"], pages1["binds"], pages1["roofline_pages"]) == (43.0, "memory", "huge")
    # 2 threads: the kernel (30 GB/s in cache) is below the ceiling; stock's 33 GB/s is over 100 % of it
    assert (stock2["roofline_gbps"], stock2["binds"]) == (30.0, "kernel")
    assert stock2["roofline_pct"] == pytest.approx(110.0)
    assert stock2["roofline_in_cache_gbps"] == 30.0 and stock2["roofline_stream_gbps"] == 44.0
    # without a roofline measurement (or a ceiling) the fields are there and empty
    bare = compare.add_roofline(_rows_with_pages(), {}, {1: 34.0}, {})
    assert all(r["roofline_gbps"] is None and r["binds"] is None and r["roofline_pct"] is None for r in bare)


def test_roofline_options_follow_the_configuration() -> None:
    (repack0,) = compare.parse_only("q4_0:noamx-repack0:2")
    opts = compare.roofline_options(repack0, Path("/b"))
    assert (opts.type, opts.width, opts.threads, opts.buffer) == ("q4_0", compare.ROW_WIDTH, 2, "cpu")
    assert opts.width == 2048 and opts.build == Path("/b") and opts.seconds < 0.3  # short: the default is 0.3 s
    (native,) = compare.parse_only("q4_0:native:1")
    assert compare.roofline_options(native, Path("/b")).buffer == "auto"  # CPU_REPACK, as llama-bench runs it


def _roofline_result(gbps: float) -> Any:
    from amppatch.roofline import Rate, RooflineResult

    rate = Rate(1 << 20, 16, (gbps, gbps, gbps), (1.0, 1.0, 1.0))
    return RooflineResult("q8_0", 2048, 1, "CPU", "vec_dot", rate, rate, None, "/b", "k")


def test_rooflines_are_measured_once_and_cached_by_build_and_options(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import amppatch.roofline
    from bench import roofline

    measured: list[Any] = []

    def fake(options: Any) -> Any:
        measured.append(options)
        if options.threads == 2:
            raise UsageError("the probe refused")
        return _roofline_result(48.0)

    monkeypatch.setattr(amppatch.roofline, "measure_roofline", fake)
    monkeypatch.setattr(roofline, "measure_lock", lambda what: contextlib.nullcontext())
    ctx = compare.Context(compare.BenchOptions(work=tmp_path), Path("/r"))
    ctx.stock["native"] = SimpleNamespace(dir=Path("/b"), manifest={"key": "k1"})  # type: ignore[assignment]
    configs = compare.parse_only("q8_0:native:*,q8_0:noamx:1")  # noamx has no stock build here: skipped
    first = compare.measure_rooflines(ctx, configs)
    assert first["q8_0:native:1"]["in_cache_gbps"] == 48.0 and "error" in first["q8_0:native:2"]
    assert "q8_0:noamx:1" not in first and len(measured) == 2
    again = compare.measure_rooflines(ctx, configs)
    assert again["q8_0:native:1"] == first["q8_0:native:1"] and len(measured) == 3  # the failure is retried
    ctx.stock["native"] = SimpleNamespace(dir=Path("/b"), manifest={"key": "k2"})  # type: ignore[assignment]
    compare.measure_rooflines(ctx, configs[:1])
    assert len(measured) == 4  # another build: measured again


def test_markdown_shows_roofline_share_and_binding_side_and_old_rows_render_empty() -> None:
    rows = compare.add_roofline(_rows_with_pages(), ROOFLINES, {1: 34.0, 2: 44.0}, {1: 43.0, 2: 51.0})
    rows = compare.add_page_shares(rows, {"pages": {"share": 0.996}, "stock": {"share": 0.0}})
    results = {"rows": rows, "machine": {}, "command": "cmd", "runs": [], "arm_labels": {},
               "rooflines": ROOFLINES}
    md = compare.render_markdown(results, "../bench/roofline.png")
    assert "| % of roofline | binds |" in md
    assert "| q8_0:native:1 | stock | 20.00 |" in md and "| 0 % | 65 | memory (4 KiB pages) |" in md
    assert "| q8_0:native:1 | pages | 20.00 |" in md and "| 100 % | 51 | memory (huge pages) |" in md
    assert "| 110 | kernel |" in md and "`q8_0:native:1` 50.0, `q8_0:native:2` 30.0" in md
    assert "[roofline.png](../bench/roofline.png)" in md and "Stock mapped the model" not in md
    rows[0]["huge_page_share"] = 0.99  # stock found the lever's large folios
    assert "Stock mapped the model on huge pages after the runs with page arms (`q8_0:native:1` 99%)" in \
        compare.render_markdown(results)
    old = compare.render_markdown({"rows": compare.rows_from_report(_report(), compare.group_runs(
        compare.parse_only("q8_0:native:*"))[0], [compare.ArmDef("stock", "stock")]), "machine": {}, "runs": []})
    assert "| 55 | – | — | — | — |" in old and "Roofline:" not in old and "roofline.png" not in old


def test_plot_draws_each_arm_against_both_sides_of_the_roofline(tmp_path: Path) -> None:
    rows = _rows_with_pages()
    results = {"rows": rows, "machine": {"ceiling_4k_gbps": {"1": 34.0, "2": 44.0}, "ceiling_gbps": {"1": 43.0}},
               "rooflines": {"q8_0:native:1": {"in_cache_gbps": 50.0}}}
    (bars,) = compare.roofline_bars(results)  # q8_0:native:2 has no roofline
    assert (bars.config, bars.in_cache_gbps, bars.ceiling_4k_gbps, bars.ceiling_huge_gbps) == (
        "q8_0:native:1", 50.0, 34.0, 43.0)  # an older file's best ceiling stands for the huge-page one
    assert [(b.arm, b.gbps, b.huge_pages) for b in bars.bars] == [
        ("stock", 22.0, False), ("pages", 22.0, True), ("amppatch", pytest.approx(30.8), False)]
    out = compare.render_roofline_plot(results, tmp_path / "roofline.png")
    assert out == tmp_path / "roofline.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roofline.png"]
    assert compare.render_roofline_plot({**results, "rooflines": {}}, tmp_path / "none.png") is None


def test_render_only_adds_the_roofline_and_links_the_plot(tmp_path: Path) -> None:
    group = compare.group_runs(compare.parse_only("q8_0:native:*"))[0]
    rows = compare.rows_from_report(_report(), group, [compare.ArmDef("stock", "stock")])
    results = {"rows": rows, "machine": {"ceiling_4k_gbps": {"1": 34.0, "2": 44.0},
                                         "ceiling_huge_gbps": {"1": 43.0, "2": 51.0}},
               "command": "cmd", "runs": [], "arm_labels": {}, "rooflines": ROOFLINES}
    (tmp_path / "bench").mkdir()
    (tmp_path / "docs").mkdir()
    out, md = tmp_path / "bench" / "results.json", tmp_path / "docs" / "RESULTS.md"
    out.write_text(json.dumps(results))
    assert compare.main(["--render-only", "--results", str(out), "--results-md", str(md)]) == 0
    stock1 = json.loads(out.read_text())["rows"][0]
    assert stock1["roofline_gbps"] == 34.0 and stock1["binds"] == "memory"
    assert (tmp_path / "bench" / "roofline.png").is_file()
    assert "[roofline.png](../bench/roofline.png)" in md.read_text()
