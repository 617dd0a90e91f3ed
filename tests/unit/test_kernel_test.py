"""Which patched functions llama.cpp's test-quantize-fns checks, and what its output says."""

from __future__ import annotations

import pytest

from amppatch.gate import cpu_type_traits, parse_quantize_fns, quantize_fns_applicability

# The shape of ggml-cpu.c's table in the pinned tree (trimmed): casts, NULL and commented-out quantizers.
TRAITS = """
static const struct ggml_type_traits_cpu type_traits_cpu[GGML_TYPE_COUNT] = {
    [GGML_TYPE_F16] = {
        .from_float               = (ggml_from_float_t) ggml_cpu_fp32_to_fp16,
        .vec_dot                  = (ggml_vec_dot_t) ggml_vec_dot_f16,
        .vec_dot_type             = GGML_TYPE_F16,
        .nrows                    = 1,
    },
    [GGML_TYPE_Q8_0] = {
        .from_float               = quantize_row_q8_0,
        .vec_dot                  = ggml_vec_dot_q8_0_q8_0,
        .vec_dot_type             = GGML_TYPE_Q8_0,
    },
    [GGML_TYPE_Q4_K] = {
        .from_float               = quantize_row_q4_K,
        .vec_dot                  = ggml_vec_dot_q4_K_q8_K,
    },
    [GGML_TYPE_IQ2_XXS] = {
        .from_float               = NULL,
        .vec_dot                  = ggml_vec_dot_iq2_xxs_q8_K,
    },
    [GGML_TYPE_IQ3_S] = {
        //.from_float               = quantize_row_iq3_s,
        .vec_dot                  = ggml_vec_dot_iq3_s_q8_K,
    },
};
static const struct other_table other[GGML_TYPE_COUNT] = {
    [GGML_TYPE_Q5_0] = { .vec_dot = not_the_cpu_traits, .from_float = x },
};
"""


def test_traits_table_is_read_with_null_and_commented_quantizers_untested():
    traits = cpu_type_traits(TRAITS)
    assert traits["ggml_vec_dot_q8_0_q8_0"].type == "q8_0" and traits["ggml_vec_dot_q8_0_q8_0"].tested
    assert traits["quantize_row_q8_0"].role == "from_float"
    assert traits["ggml_vec_dot_q4_K_q8_K"].type == "q4_K"
    assert traits["ggml_vec_dot_f16"].tested
    assert not traits["ggml_vec_dot_iq2_xxs_q8_K"].tested and not traits["ggml_vec_dot_iq3_s_q8_K"].tested
    assert "not_the_cpu_traits" not in traits  # the table ends at its own brace
    assert cpu_type_traits("int main(void) { return 0; }") == {}


@pytest.mark.parametrize(("function", "type_", "why"), [
    ("ggml_vec_dot_q8_0_q8_0", "q8_0", "vec_dot of q8_0"),
    ("ggml_vec_dot_q4_K_q8_K", "q4_K", "vec_dot of q4_K"),
    ("ggml_vec_dot_f16", "f16", "vec_dot of f16"),
    ("quantize_row_q8_0", "q8_0", "quantization error"),
    ("ggml_vec_dot_iq2_xxs_q8_K", None, "skips"),
    ("ggml_gemv_q4_0_8x8_q8_0", None, "repack"),
    ("ggml_gemm_q4_K_8x8_q8_K", None, "repack"),
    ("gemv_q4_b32_8x8_q8_0_lut_avx<block_q4_0x8>", None, "repack"),
    ("tinygemm_kernel_vnni<block_q8_0, block_q8_0>::apply", None, "AMX"),
    ("tinygemm_kernel_avx<float, ggml_fp16_t>::apply", None, "AMX"),
    ("ggml_compute_forward_flash_attn_ext_f16_one_chunk", None, "flash attention"),
    ("ggml_vec_mad_f32", None, "not a type's vec_dot"),
])
def test_applicability_per_site_kind(function: str, type_: str | None, why: str):
    got_type, reason = quantize_fns_applicability(function, cpu_type_traits(TRAITS))
    assert got_type == type_ and why in reason


# What test-quantize-fns -v prints (the pinned tree's format), one type failing.
OUTPUT = """\
 f32 vec_dot n=   1:                 ok (ref=2.048 got=2.048 err=0.000000)
 f32 vec_dot n=  17:                 ok (ref=1.5 got=1.5 err=0.000000)
Testing f16
  f16 absolute quantization error:    ok (0.000000)
  f16 reference implementation error: ok (0.000000)
  f16 dot product error:              ok (0.000002)
Testing q8_0
 q8_0 absolute quantization error:    ok (0.000090)
 q8_0 reference implementation error: ok (0.000000)
 q8_0 dot product error:              FAILED (0.250000)
 q8_0 dot product error (nrc=2):    ok (0.000100)
Testing iq2_xxs
1 tests failed
"""


def test_output_is_parsed_per_type_and_check():
    run = parse_quantize_fns(OUTPUT, 1)
    assert run.types == ("f16", "q8_0", "iq2_xxs")
    assert run.failed_types == ["q8_0"]
    assert ("dot product error (nrc=2)", True) in run.checks["q8_0"]
    assert run.checks["f32"][1] == ("vec_dot n= 17", True)
    assert run.passed_checks() == 8 and run.failed_checks() == 1
    assert "iq2_xxs" not in run.checks  # announced, nothing checked


def _no_side_build(*_args, **_kw):
    raise AssertionError("test-quantize-fns must not be built when it does not apply")


def test_tree_without_the_test_records_not_available(monkeypatch: pytest.MonkeyPatch, tmp_path):
    import amppatch.build as build_mod
    from amppatch.build import Build
    from amppatch.gate import kernel_test

    monkeypatch.setattr(build_mod, "source_text", lambda _b, _rel: None)
    monkeypatch.setattr(build_mod, "build_side_target", _no_side_build)
    b = Build(tmp_path, {}, tmp_path)
    record = kernel_test(b, b, ["ggml_vec_dot_q8_0_q8_0"])
    assert record["status"] == "not available" and "tests/test-quantize-fns.cpp" in record["reason"]


def test_sites_it_does_not_cover_record_not_applicable_with_reasons(monkeypatch: pytest.MonkeyPatch, tmp_path):
    import amppatch.build as build_mod
    from amppatch.build import Build
    from amppatch.gate import kernel_test

    texts = {"tests/test-quantize-fns.cpp": "int main() {}", "ggml/src/ggml-cpu/ggml-cpu.c": TRAITS}
    monkeypatch.setattr(build_mod, "source_text", lambda _b, rel: texts.get(rel))
    monkeypatch.setattr(build_mod, "build_side_target", _no_side_build)
    b = Build(tmp_path, {}, tmp_path)
    functions = ["ggml_gemv_q4_0_8x8_q8_0", "tinygemm_kernel_vnni<block_q8_0, block_q8_0>::apply",
                 "ggml_compute_forward_flash_attn_ext_f16_one_chunk"]
    record = kernel_test(b, b, functions)
    assert record["status"] == "not applicable"
    assert [record["sites"][f]["covered"] for f in functions] == [False, False, False]
    assert "repack" in record["sites"][functions[0]]["reason"]
    assert "AMX" in record["sites"][functions[1]]["reason"]
    assert "flash attention" in record["sites"][functions[2]]["reason"]


def _fake_runs(monkeypatch: pytest.MonkeyPatch, tmp_path, outputs: dict[str, tuple[str, int]]):
    """kernel_test with the tree's texts and test-quantize-fns' runs on A and B replaced (pure)."""
    import amppatch.build as build_mod
    import amppatch.gate as gate_mod
    from amppatch.build import Build

    texts = {"tests/test-quantize-fns.cpp": "int main() {}", "ggml/src/ggml-cpu/ggml-cpu.c": TRAITS}
    monkeypatch.setattr(build_mod, "source_text", lambda _b, rel: texts.get(rel))
    a, b = Build(tmp_path / "A", {}, tmp_path), Build(tmp_path / "B", {}, tmp_path)

    def fake(parent, _timeout):
        text, code = outputs[parent.dir.name]
        return parse_quantize_fns(text, code), ["test-quantize-fns", "-v"], str(parent.dir) + "-tests"

    monkeypatch.setattr(gate_mod, "_run_quantize_fns", fake)
    return a, b


PASSING = OUTPUT.replace("FAILED (0.250000)", "ok (0.000100)")


def test_a_type_failing_in_b_only_is_a_correctness_error_naming_it(monkeypatch: pytest.MonkeyPatch, tmp_path):
    from amppatch.errors import CorrectnessError
    from amppatch.gate import kernel_test

    a, b = _fake_runs(monkeypatch, tmp_path, {"A": (PASSING, 0), "B": (OUTPUT, 1)})
    with pytest.raises(CorrectnessError, match=r"fails in B for type q8_0 \(passes in A\).*dot product error"):
        kernel_test(a, b, ["ggml_vec_dot_q8_0_q8_0"])


def test_a_type_failing_in_a_too_is_recorded_not_blamed(monkeypatch: pytest.MonkeyPatch, tmp_path):
    from amppatch.gate import kernel_test

    a, b = _fake_runs(monkeypatch, tmp_path, {"A": (OUTPUT, 1), "B": (OUTPUT, 1)})
    record = kernel_test(a, b, ["ggml_vec_dot_q8_0_q8_0", "ggml_vec_dot_f16"])
    assert record["failing_in_a_too"] == ["q8_0"]
    assert record["sites"]["ggml_vec_dot_q8_0_q8_0"]["status"].startswith("fails in A too")
    assert record["sites"]["ggml_vec_dot_f16"]["status"] == "passed" and record["status"] == "passed"


def test_passing_run_records_each_covered_sites_checks(monkeypatch: pytest.MonkeyPatch, tmp_path):
    from amppatch.gate import kernel_test

    a, b = _fake_runs(monkeypatch, tmp_path, {"B": (PASSING, 0)})  # A is not run when B passes
    record = kernel_test(a, b, ["ggml_vec_dot_q8_0_q8_0", "ggml_gemv_q4_0_8x8_q8_0"])
    assert record["status"] == "passed" and "failing_in_a_too" not in record
    q8 = record["sites"]["ggml_vec_dot_q8_0_q8_0"]
    assert q8["status"] == "passed" and "dot product error (nrc=2): ok" in q8["checks"]
    assert record["sites"]["ggml_gemv_q4_0_8x8_q8_0"]["covered"] is False
    assert "q8_0" in record["summary"]
