"""The limit of token generation: which kernels a model's roofline measures, how the sides combine, which
binds, each arm's share, the huge-page share of the weights, the typed record, its lines and its plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amppatch import limit_plot
from amppatch.childpages import ChildPages, children
from amppatch.errors import UsageError
from amppatch.gguf_info import GgufInfo, TensorInfo
from amppatch.hugepages import HugeShare
from amppatch.limit import (
    KernelPick,
    KernelRun,
    MeasuredKernel,
    ModelRoofline,
    SettingRates,
    StreamCeilings,
    assemble,
    combined_gbps,
    kernel_lines,
    pick_kernels,
    setting_table,
    stream_ceilings,
    summary_lines,
)
from amppatch.roofline import Rate, RooflineResult
from amppatch.weightpages import WeightPages

MIB = 1 << 20


def _tensor(name: str, kind: str, shape: tuple[int, ...], n_bytes: int) -> TensorInfo:
    n = 1
    for d in shape:
        n *= d
    return TensorInfo(name, kind, shape, n, n_bytes)


def _info(tensors: list[TensorInfo], *, n_expert: int = 0, n_expert_used: int = 0) -> GgufInfo:
    return GgufInfo(Path("/m.gguf"), "llama", sum(t.n_bytes for t in tensors) + 4096, tuple(tensors), 2, 256, 4, 4,
                    64, 64, 1000, n_expert, n_expert_used)


def test_picks_the_dominant_type_at_its_commonest_width_and_skips_norms_and_gathered_rows() -> None:
    info = _info([
        _tensor("token_embd.weight", "Q8_0", (256, 1000), 900 * MIB),  # gathered: one row per token
        _tensor("output.weight", "Q6_K", (256, 1000), 10 * MIB),
        _tensor("blk.0.attn_q.weight", "Q8_0", (256, 256), 60 * MIB),
        _tensor("blk.0.ffn_down.weight", "Q8_0", (768, 256), 30 * MIB),
        _tensor("blk.0.attn_norm.weight", "F32", (256,), 800 * MIB),  # 1-D: no matrix product
    ])
    picks, notes = pick_kernels(info)
    assert notes == []
    assert [(p.type, p.width) for p in picks] == [("q8_0", 256)]  # 90 of 100 MiB: cover reached
    (q8,) = picks
    assert q8.bytes_per_token == 90 * MIB and q8.share == pytest.approx(0.9)
    assert q8.width_share == pytest.approx(60 / 90)


def test_picks_types_until_they_cover_most_bytes_and_notes_a_type_the_probe_cannot_fill() -> None:
    info = _info([
        _tensor("blk.0.ffn_up.weight", "Q4_K", (2048, 5632), 40 * MIB),
        _tensor("blk.0.ffn_down.weight", "IQ2_XXS", (5632, 2048), 30 * MIB),
        _tensor("blk.0.attn_v.weight", "Q6_K", (2048, 256), 20 * MIB),
        _tensor("blk.0.attn_k.weight", "F16", (2048, 256), 10 * MIB),
    ])
    picks, notes = pick_kernels(info)
    # 40 + 30 (not fillable, still counted) + 20 = 90 % ≥ 80 %: f16 stays out
    assert [(p.type, p.width) for p in picks] == [("q4_k", 2048), ("q6_k", 2048)]
    assert len(notes) == 1 and notes[0].startswith("iq2_xxs (30% of the weight bytes per token)")
    assert [p.type for p in pick_kernels(info, cover=1.0)[0]] == ["q4_k", "q6_k", "f16"]
    assert [p.type for p in pick_kernels(info, cover=1.0, max_kernels=1)[0]] == ["q4_k"]


def test_moe_counts_only_the_routed_experts_bytes() -> None:
    info = _info([
        _tensor("blk.0.ffn_up_exps.weight", "Q4_0", (256, 512, 8), 80 * MIB),  # 2 of 8 experts: 20 MiB
        _tensor("blk.0.attn_q.weight", "Q8_0", (256, 256), 30 * MIB),
    ], n_expert=8, n_expert_used=2)
    picks, _ = pick_kernels(info, cover=1.0)
    assert [(p.type, p.bytes_per_token) for p in picks] == [("q8_0", 30 * MIB), ("q4_0", 20 * MIB)]


def test_combined_rate_is_the_byte_weighted_harmonic_mean() -> None:
    # 1 GB at 10 GB/s takes 0.1 s, 1 GB at 40 GB/s 0.025 s: 2 GB in 0.125 s
    assert combined_gbps([(10**9, 10.0), (10**9, 40.0)]) == pytest.approx(16.0)
    assert combined_gbps([(10**9, 10.0)]) == pytest.approx(10.0)
    assert combined_gbps([(0, 10.0), (10**9, 0.0)]) is None and combined_gbps([]) is None


ROWS = [{"kind": "stream", "threads": t, "thp": thp, "distance": d, "hint": 3, "gbps": g}
        for t, thp, d, g in [(1, 0, 0, 14.2), (1, 0, 1024, 12.3), (1, 1, 0, 12.3), (1, 1, 2048, 12.8),
                             (2, 0, 1024, 26.2), (2, 1, 1024, 22.8)]]


def test_stream_ceilings_best_per_page_size_at_the_nearest_thread_count() -> None:
    assert stream_ceilings(ROWS, 1) == StreamCeilings(14.2, 12.8, 1)
    assert stream_ceilings(ROWS, 2) == StreamCeilings(26.2, 22.8, 2)
    assert stream_ceilings(ROWS, 8) == StreamCeilings(26.2, 22.8, 2)  # the probe stopped at 2 threads
    assert stream_ceilings(ROWS, 2, "never") == StreamCeilings(26.2, None, 2)  # MADV_HUGEPAGE did nothing
    assert stream_ceilings([], 1) == StreamCeilings(None, None, None)
    assert StreamCeilings(14.2, 12.8, 1).best_gbps == 14.2


def _result(kind: str, width: int, threads: int, in_cache: float, *, share: float = 1.0) -> RooflineResult:
    return RooflineResult(kind, width, threads, "CPU", "vec_dot (ggml_vec_dot_<type>_*)",
                          Rate(MIB, 100, (in_cache * 0.9, in_cache, in_cache * 1.1), (share,) * 3),
                          Rate(600 * MIB, 60000, (4.0, 4.2, 4.4), (share,) * 3), None, "/b", "k")


def _pick(kind: str, n: int, share: float, width: int = 2048) -> KernelPick:
    return KernelPick(kind, width, n, share, 1.0)


def _kernel_run() -> KernelRun:
    q8, f16 = _pick("q8_0", 900 * MIB, 0.9), _pick("f16", 100 * MIB, 0.1)
    kernels = (MeasuredKernel(q8, 1, _result("q8_0", 2048, 1, 30.0)),
               MeasuredKernel(f16, 1, _result("f16", 2048, 1, 10.0)),
               MeasuredKernel(q8, 2, _result("q8_0", 2048, 2, 20.0, share=0.5)),
               MeasuredKernel(f16, 2, None, "the probe failed"))
    return KernelRun(kernels, tuple(ROWS), "madvise", "/b", ("iq2_xxs: not measured",))


def _part() -> ModelRoofline:
    return _kernel_run().assemble([
        SettingRates("tg64-t1", "tg64, 1 thread", 1, (("A", 7.1), ("B", 8.52))),
        SettingRates("tg64-t2", "tg64, 2 threads", 2, (("A", 11.0), ("B", None))),
    ])


def test_the_roofline_is_the_lower_side_and_says_which_binds() -> None:
    part = _part()
    one, two = part.settings
    # 900 MiB at 30 GB/s and 100 MiB at 10 GB/s: 1000 MiB in the time 900/30 + 100/10 = 40 units → 25 GB/s
    assert one.in_cache_gbps == pytest.approx(25.0)
    assert one.stream_gbps == 14.2 and one.roofline_gbps == 14.2 and one.binds == "memory"
    assert one.share(7.1) == pytest.approx(0.5) and one.share(None) is None
    # at 2 threads f16 failed and q8_0 got half the cores: a probe that starved measured the scheduler, so it
    # sets no kernel side and the stream ceiling alone is the limit, with no claim of which side binds
    assert two.in_cache_gbps is None and two.roofline_gbps == 26.2 and two.binds is None
    assert part.available and part.measured_share == pytest.approx(1.0)
    assert "f16 width 2048 at 2 thread(s): the probe failed" in part.notes
    assert any("ran under contention" in n for n in part.notes)
    assert any(n.startswith("q8_0 at 2 thread(s): in-cache rate left out of the roofline (CPU share 0.50")
               for n in part.notes)
    assert part.notes[0] == "iq2_xxs: not measured"


def test_a_clean_probe_at_several_threads_sets_the_kernel_side() -> None:
    q8 = _pick("q8_0", 900 * MIB, 1.0)
    run = KernelRun((MeasuredKernel(q8, 2, _result("q8_0", 2048, 2, 20.0, share=0.95)),), tuple(ROWS), "madvise",
                    "/b", ())
    (two,) = run.assemble([SettingRates("tg64-t2", "tg64, 2 threads", 2, (("A", 11.0),))]).settings
    assert two.in_cache_gbps == 20.0 and two.roofline_gbps == 20.0 and two.binds == "kernel"


def test_a_missing_side_leaves_the_other_as_the_limit_and_says_nothing_of_which_binds() -> None:
    nothing = assemble([], [SettingRates("s", "s", 1, (("A", 5.0),))], [])
    assert not nothing.available and nothing.note == "no kernel could be measured"
    (s,) = nothing.settings
    assert s.roofline_gbps is None and s.binds is None and s.share(5.0) is None
    no_ceiling = assemble(list(_kernel_run().kernels[:1]), [SettingRates("s", "s", 1, (("A", 5.0),))], [])
    (s,) = no_ceiling.settings
    assert s.roofline_gbps == 30.0 and s.binds is None and s.share(15.0) == 0.5


def test_an_arm_above_the_roofline_is_called_out() -> None:
    part = _kernel_run().assemble([SettingRates("tg64-t1", "tg64, 1 thread", 1, (("A", 21.3),))])
    assert part.settings[0].share(21.3) == 1.5
    assert part.notes[-1].startswith("A at tg64, 1 thread ran at 150% of the roofline: above the limit")


def test_record_round_trips_and_refuses_another_schema_or_a_malformed_one() -> None:
    part = _part()
    doc = json.loads(json.dumps(part.to_json()))
    assert ModelRoofline.from_json(doc) == part
    assert ModelRoofline.from_json(doc).to_json() == doc
    assert doc["settings"][0]["roofline_gbps"] == 14.2 and doc["settings"][0]["binds"] == "memory"
    assert doc["settings"][0]["arms"][0] == {"arm": "A", "gb_per_s": 7.1, "share_of_roofline": 0.5}
    assert doc["kernels"][3]["result"] is None and doc["kernels"][3]["error"] == "the probe failed"
    off = ModelRoofline.unavailable("not measured (--no-roofline)")
    assert ModelRoofline.from_json(off.to_json()) == off
    with pytest.raises(UsageError, match="schema_version 2"):
        ModelRoofline.from_json({**doc, "schema_version": 2})
    with pytest.raises(UsageError, match="malformed"):
        ModelRoofline.from_json({**doc, "settings": [{"label": "no id"}]})


def test_lines_name_every_side_and_every_arm() -> None:
    part = _part()
    table = setting_table(part)
    assert table[0] == ("| setting | in cache GB/s | stream 4 KiB | stream huge | roofline | binds | A GB/s (share) "
                        "| B GB/s (share) |")
    assert table[2] == "| tg64, 1 thread | 25.00 | 14.20 | 12.80 | 14.20 | memory | 7.10 (50%) | 8.52 (60%) |"
    assert table[3] == "| tg64, 2 threads | — | 26.20 | 22.80 | 26.20 | — | 11.00 (42%) | — (—) |"
    kernels = kernel_lines(part)
    assert kernels[0].startswith("- q8_0 at width 2048 (90% of the weight bytes per token, 100% of them at this "
                                 "width): CPU → vec_dot")
    assert "1 thread(s) 30.00 GB/s in cache" in kernels[0] and "2 thread(s) 20.00 GB/s in cache" in kernels[0]
    assert kernels[1].endswith("2 thread(s) not measured")
    (line, _) = summary_lines(part)
    assert line == ("tg64, 1 thread: roofline 14.20 GB/s (memory binds: in cache 25.00, stream 14.20 on 4 KiB / "
                    "12.80 on huge pages); A 7.10 GB/s (50%), B 8.52 GB/s (60%)")
    assert summary_lines(ModelRoofline.unavailable("not measured (x)")) == ["roofline: not measured (x)"]


def test_weight_pages_share_and_phrases() -> None:
    huge = HugeShare(1000 * MIB, 1000 * MIB, 900 * MIB, 0, 1, True)
    pages = WeightPages.watched(huge, 1000 * MIB + 4096, "warmup (tg64, 1 thread)")
    assert pages.share == pytest.approx(0.9) and pages.note == ""
    assert pages.describe() == ("90% of the 1.05 GB mapping of the model file on huge pages (file THP 900 MiB), "
                                "during warmup (tg64, 1 thread)")
    assert WeightPages.from_json(json.loads(json.dumps(pages.to_json()))) == pages
    small = WeightPages.watched(HugeShare(19_085_312, 19_085_312, 0, 0, 1, True), 19_085_312, "warmup")
    assert small.describe() == "0% of the 19.1 MB mapping of the model file on huge pages, during warmup"
    unmapped = WeightPages.watched(HugeShare(0, 0, 0, 0, 0, True), 10, "warmup")
    assert unmapped.share is None and unmapped.describe() == (
        "not measured during warmup: the model file's mapping was not seen (weights read into memory, or the run "
        "ended before its mapping could be read)")
    unseen = WeightPages.watched(None, 10, "warmup")
    assert unseen.to_json()["share"] is None and unseen.describe() == (
        "not measured during warmup: no process of this run was seen")


def test_plot_is_written_with_matplotlib_and_explained_without(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    part = _part()
    assert limit_plot.plot_note(part) is None
    out = limit_plot.render_roofline_png(part, tmp_path / "roofline.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["roofline.png"]
    assert limit_plot.plot_note(None) == "not drawn (the report has no roofline)"
    assert limit_plot.plot_note(ModelRoofline.unavailable("not measured (--no-roofline)")) == (
        "not drawn (roofline not measured (--no-roofline))")
    monkeypatch.setattr(limit_plot.importlib.util, "find_spec", lambda name: None)
    assert limit_plot.plot_note(part) == "not drawn (matplotlib is not installed)"


def _fake_proc(root: Path, *, listed: bool) -> Path:
    """A /proc with our pid 10 (tasks 10 and 11) and processes 20 (child of 10), 21 (child of 20), 22 (of 10)."""
    for tid, kids in ((10, "20 "), (11, "22")):
        task = root / "10" / "task" / str(tid)
        task.mkdir(parents=True)
        if listed:
            (task / "children").write_text(kids)
    for pid, ppid in ((10, 1), (20, 10), (21, 20), (22, 10)):
        (root / str(pid)).mkdir(exist_ok=True)
        (root / str(pid) / "stat").write_text(f"{pid} (llama bench) S {ppid} 1 1 0 -1\n")
    (root / "self").mkdir()
    return root


@pytest.mark.parametrize("listed", [True, False])
def test_children_from_task_lists_or_from_every_stat(tmp_path: Path, listed: bool) -> None:
    assert children(10, _fake_proc(tmp_path, listed=listed)) == {20, 22}


def test_child_pages_without_a_child_has_no_result(tmp_path: Path) -> None:
    with ChildPages(tmp_path / "m.gguf") as watch:
        pass
    assert watch.result is None

