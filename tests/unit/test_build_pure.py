from pathlib import Path

import pytest

from amppatch.build import _error_excerpt, _kernel_flags_cmake, declared_cmake_options, load_build
from amppatch.cli.cmd_build import parse_define
from amppatch.errors import UsageError
from amppatch.features import FEATURES, IsaReport, disable_flags


def test_disable_flags_removes_only_faulting_features_with_dependants():
    report = IsaReport(
        compiler="gcc",
        advertised=("avx2", "avx512f", "amx-tile", "amx-int8"),
        executes={"avx2": True, "avx512f": True, "amx-tile": False, "amx-int8": False},
        detail={},
    )
    flags = disable_flags(report)
    assert "-mno-amx-tile" in flags and "-mno-amx-int8" in flags and "-mno-amx-bf16" in flags
    assert not any("avx512f" in f or "avx2" in f for f in flags)
    assert len(flags) == len(set(flags))


def test_disable_flags_empty_when_everything_runs():
    names = tuple(f.name for f in FEATURES)
    report = IsaReport("gcc", names, dict.fromkeys(names, True), {})
    assert disable_flags(report) == ()


def test_kernel_flags_script_targets_ggml_cpu_after_configure():
    text = _kernel_flags_cmake(["-fprefetch-loop-arrays", '-DX="a b"'], ["-fprofile-generate"])
    assert "cmake_language(DEFER DIRECTORY" in text
    assert 'target_compile_options(ggml-cpu PRIVATE "-fprefetch-loop-arrays" "-DX=\\"a b\\""' in text
    assert 'target_link_options(ggml-cpu PRIVATE "-fprofile-generate")' in text


def test_declared_options_are_read_from_cmakelists(tmp_path: Path):
    (tmp_path / "ggml").mkdir()
    (tmp_path / "CMakeLists.txt").write_text('option(LLAMA_BUILD_SERVER "x" ON)\n  option( LLAMA_CURL "y" OFF)\n')
    (tmp_path / "ggml" / "CMakeLists.txt").write_text('option(GGML_NATIVE "n" ON)\n')
    assert declared_cmake_options(tmp_path) == {"LLAMA_BUILD_SERVER", "LLAMA_CURL", "GGML_NATIVE"}


def test_error_excerpt_prefers_compiler_errors():
    lines = ["[1/3] ok", "FAILED: foo.o", "foo.c:3:1: error: expected ';'", "  3 | int x", "ninja: build stopped"]
    excerpt = _error_excerpt(lines)
    assert "error: expected ';'" in excerpt and "FAILED: foo.o" in excerpt


def test_load_build_without_manifest_is_refused(tmp_path: Path):
    with pytest.raises(UsageError, match="not a finished amppatch build"):
        load_build(tmp_path)


@pytest.mark.parametrize("text", ["GGML_NATIVE", "=ON", ""])
def test_define_must_be_key_value(text: str):
    with pytest.raises(UsageError):
        parse_define(text)


def test_define_parses():
    assert parse_define("GGML_AVX512=ON") == ("GGML_AVX512", "ON")


def test_amx_batch1_flags_come_last_and_need_vnni():
    """--amx-batch1 re-adds the AMX flags after the ISA probe's removals (a VM whose tiles fault keeps its
    batch-1 kernels), and is refused on a CPU that cannot run them or on a non-native build."""
    from dataclasses import replace

    from amppatch.build import AMX_FLAGS, ResolvedBuild, _check_amx_batch1

    rb = ResolvedBuild(repo="r", source_dir="s", in_place=False, commit="c", dirty_hash=None, compiler="cc",
                       compiler_version="v", cflags="", kernel_cflags="-O3", cmake_options={}, pgo=False,
                       pgo_training=None, isa_disabled=("-mno-amx-tile", "-mno-amx-int8"), amx_batch1=True)
    assert rb.kernel_flags() == ["-O3", "-mno-amx-tile", "-mno-amx-int8", *AMX_FLAGS]
    assert replace(rb, amx_batch1=False).kernel_flags() == ["-O3", "-mno-amx-tile", "-mno-amx-int8"]
    assert rb.key != replace(rb, amx_batch1=False).key
    runs = IsaReport("gcc", ("avx512vnni",), {"avx512vnni": True}, {"avx512vnni": "executes"})
    _check_amx_batch1({"GGML_NATIVE": "ON"}, runs)
    with pytest.raises(UsageError, match="GGML_NATIVE=ON"):
        _check_amx_batch1({"GGML_NATIVE": "OFF"}, runs)
    with pytest.raises(UsageError, match="AVX512-VNNI"):
        _check_amx_batch1({}, IsaReport("gcc", (), {}, {}))


def test_pgo_training_lists_every_model_and_one_model_reads_as_before():
    from amppatch.build import pgo_training_models

    assert pgo_training_models(None) == ()
    assert pgo_training_models("/m/tiny.gguf:123") == (Path("/m/tiny.gguf"),)
    assert pgo_training_models("/m/a:b.gguf:1;/m/1b-f16.gguf:2") == (Path("/m/a:b.gguf"), Path("/m/1b-f16.gguf"))


def test_amx_batch1_runs_pass_one_token_per_micro_batch(tmp_path: Path) -> None:
    from amppatch.build import Build, runtime_args

    plain = Build(tmp_path, {"amx_batch1": False}, tmp_path)
    amx = Build(tmp_path, {"amx_batch1": True}, tmp_path)
    assert runtime_args(plain) == () and runtime_args(amx) == ("-ub", "1")
    assert runtime_args(amx, ("-ub", "4")) == () and runtime_args(amx, ("--ubatch-size=4",)) == ()
