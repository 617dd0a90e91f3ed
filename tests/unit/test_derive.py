"""Distance and hint derivation, and the other pure pieces of profile (no subprocess)."""

from __future__ import annotations

import numpy as np
import pytest

from amppatch.profile import (
    LINE,
    MAX_DISTANCE,
    MIN_DISTANCE,
    SiteInputs,
    bare_name,
    derive_site,
    in_spans,
    parse_cg_annotate,
    site_function_name,
    tensor_type_of_kernel,
    token_stats,
)


def inputs(**kw: object) -> SiteInputs:
    base = dict(
        latency_ns=160.0, stream_bytes_per_token=1_000_000_000, cpu_ns_per_token=50e6, loop_share=0.8,
        threads=1, bytes_per_iteration=34, working_set_bytes=1_100_000_000, llc_bytes=32 << 20,
        reused_across_rows=False,
    )
    base.update(kw)
    return SiteInputs(**base)  # type: ignore[arg-type]


def test_distance_is_latency_times_rate_in_whole_lines() -> None:
    d = derive_site(inputs())
    rate = 1e9 / (0.8 * 50e6)  # 25 bytes per ns
    assert d.consumption_gbps == pytest.approx(rate)
    assert d.raw_distance_bytes == pytest.approx(160 * rate)  # 4000 B
    assert d.distance_bytes == 4032 and d.distance_bytes % LINE == 0 and not d.clamped
    assert d.distance_iterations == 118  # ceil(160 / (34 / 25))
    assert d.hint == 0  # 1.1 GB streamed once per token, far larger than the LLC


def test_more_threads_with_same_cpu_time_per_token_keeps_the_rate() -> None:
    # CPU time is summed over threads, so the per-thread rate depends only on bytes per CPU-ns
    assert derive_site(inputs(threads=4)).distance_bytes == derive_site(inputs()).distance_bytes


def test_slow_loops_clamp_to_two_lines_and_fast_ones_to_the_maximum() -> None:
    slow = derive_site(inputs(stream_bytes_per_token=1_000_000))
    assert slow.distance_bytes == MIN_DISTANCE and slow.clamped
    fast = derive_site(inputs(cpu_ns_per_token=1e6, loop_share=1.0))
    assert fast.distance_bytes == MAX_DISTANCE and fast.clamped


def test_hint_keeps_small_working_sets_and_reused_data() -> None:
    assert derive_site(inputs(working_set_bytes=10 << 20)).hint == 3
    assert derive_site(inputs(reused_across_rows=True)).hint == 3


def test_no_time_or_bytes_is_an_error() -> None:
    with pytest.raises(ValueError):
        derive_site(inputs(loop_share=0.0))
    with pytest.raises(ValueError):
        derive_site(inputs(stream_bytes_per_token=0))


def test_unknown_bytes_per_iteration_still_gives_bytes() -> None:
    d = derive_site(inputs(bytes_per_iteration=None))
    assert d.distance_iterations is None and d.distance_bytes == 4032


def test_bare_name() -> None:
    assert bare_name("ggml_vec_dot_f16") == "ggml_vec_dot_f16"
    assert bare_name("void gemv_q4_b32_8x8_q8_0_lut_avx<block_q4_0x8>(int, float*)") == "gemv_q4_b32_8x8_q8_0_lut_avx"


def test_site_function_name_keeps_the_specialization() -> None:
    assert site_function_name("ggml_vec_dot_f16") == "ggml_vec_dot_f16"
    assert (site_function_name("void gemv_q4_b32_8x8_q8_0_lut_avx<block_q4_0x8>(int, float*, unsigned long)")
            == "gemv_q4_b32_8x8_q8_0_lut_avx<block_q4_0x8>")
    assert site_function_name("void ns::tinygemm<block_q8_0,1,16>(int)") == "tinygemm<block_q8_0, 1, 16>"
    assert site_function_name("gemv<x<int, 2>,4>(int)") == "gemv<x<int, 2>, 4>"
    assert bare_name("ggml::cpu::repack::gemv<block_q4_0, 8l, 8l>") == "gemv"


def test_tensor_type_of_kernel() -> None:
    types = ["q8_0", "q4_0", "f16", "f32"]
    assert tensor_type_of_kernel("ggml_vec_dot_q4_0_q8_0", types) == ["q4_0"]
    assert tensor_type_of_kernel("ggml_vec_dot_f16", types) == ["f16"]
    assert tensor_type_of_kernel("gemv_q4_b32_8x8_q8_0_lut_avx<block_q4_0x8>", types) == ["q4_0"]
    assert tensor_type_of_kernel("tinygemm_kernel_vnni<block_q8_0, float, 1, 4>", types) == ["q8_0"]
    assert tensor_type_of_kernel("ggml_compute_forward_soft_max", types) == []


def test_in_spans() -> None:
    times = np.array([5, 10, 15, 25, 31, 40], dtype=np.uint64)
    mask = in_spans(times, [(10, 20), (30, 35)])
    assert mask.tolist() == [False, True, True, False, True, False]
    assert not in_spans(times, []).any()


def test_token_stats() -> None:
    s = token_stats([10_000_000] * 98 + [20_000_000, 30_000_000])
    assert s["count"] == 100 and s["p50_ms"] == 10.0 and 10.0 < s["p99_ms"] <= 30.0
    assert token_stats([])["p50_ms"] is None


def test_parse_cg_annotate() -> None:
    text = """
--------------------------------------------------------------------------------
Ir          I1mr ILmr Dr         D1mr  DLmr  Dw  D1mw DLmw  file:function
--------------------------------------------------------------------------------
1,000,000   10   5    400,000    3,000 2,500 100 1    0     /src/k.c:kernel
   50,000    1   1     10,000       10     0  10 0    0     ???:main
"""
    rows = parse_cg_annotate(text)
    assert rows[0]["function"] == "/src/k.c:kernel" and rows[0]["DLmr"] == 2500
    assert rows[1]["Ir"] == 50000


def test_attribute_weight_bytes_by_type_and_leftovers() -> None:
    from amppatch.profile import attribute_weight_bytes

    type_bytes = {"q4_0": 600, "q6_k": 100, "f32": 1}
    kernels = {
        "ggml_vec_dot_q6_K_q8_K": (["q6_k"], True, 0.05),
        "gemv_q4_b32_8x8_q8_0_lut_avx": ([], True, 0.60),  # type not in its name: takes the unclaimed bytes
        "ggml_compute_forward_soft_max": ([], False, 0.10),  # not a weight kernel: nothing
    }
    out = attribute_weight_bytes(kernels, type_bytes)
    assert out["ggml_vec_dot_q6_K_q8_K"][0] == 100
    assert out["gemv_q4_b32_8x8_q8_0_lut_avx"][0] == 600 and "q4_0" in out["gemv_q4_b32_8x8_q8_0_lut_avx"][1]
    assert "ggml_compute_forward_soft_max" not in out


def test_attribute_weight_bytes_splits_a_type_read_by_two_kernels() -> None:
    from amppatch.profile import attribute_weight_bytes

    out = attribute_weight_bytes({"a_q8_0": (["q8_0"], True, 0.3), "b_q8_0": (["q8_0"], True, 0.1)}, {"q8_0": 400})
    assert out["a_q8_0"][0] == 300 and out["b_q8_0"][0] == 100


def test_parse_cg_annotate_with_percentages() -> None:
    cols = "Ir I1mr ILmr Dr D1mr DLmr Dw D1mw DLmw"
    text = "\n".join([
        "",
        f"{cols}  file:function",
        "-" * 40,
        "64,000,088 (99.56%)   3 ( 0.13%)   1 ( 0.06%)  8 ( 0.01%) 0 0  16 ( 0.05%)  0  0  /src/t.c:worker",
        "",
        "-- Auto-annotated source: /src/t.c",
        "        24 ( 0.00%) 2 ( 0.09%) 1 ( 0.06%)  8 ( 0.01%) 0 0 0 0 0      uint64_t x;",
    ])
    rows = parse_cg_annotate(text)
    assert len(rows) == 1
    assert rows[0]["function"] == "/src/t.c:worker" and rows[0]["Ir"] == 64000088 and rows[0]["Dw"] == 16


def test_moe_kernels_are_named_by_the_products_that_drive_them() -> None:
    from amppatch.profile.derive import matrix_ops, ops_label

    hot = [{"name": "ggml_gemv_q4_K_8x8_q8_K", "share": 0.56}, {"name": "ggml_vec_dot_q8_0_q8_0", "share": 0.07},
           {"name": "ggml_vec_dot_q6_K_q8_K", "share": 0.25}, {"name": "ggml_compute_forward_soft_max", "share": 0.01}]
    types = {"q4_k": 400, "q8_0": 50, "q6_k": 100, "f32": 1}
    named = matrix_ops(hot, types, {"q4_k": 300, "q6_k": 100})
    assert named[0]["ops"] == {"type": "q4_k", "mul_mat_bytes": 100, "mul_mat_id_bytes": 300,
                               "mul_mat_id_share": 0.75}
    assert ops_label(named[0]) == "mul_mat_id 75 % · mul_mat 25 % of the q4_k bytes"
    assert ops_label(named[1]) == "mul_mat (no q8_0 expert tensors)"  # the attention of the MoE model
    assert ops_label(named[2]) == "mul_mat_id (all q6_k bytes are experts)"
    assert "ops" not in named[3] and ops_label(named[3]) == ""  # not a weight kernel
    assert [h["name"] for h in named] == [h["name"] for h in hot]
    # a dense model: nothing is added
    assert matrix_ops(hot, types, {}) == hot
