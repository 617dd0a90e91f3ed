"""Patched fixture kernels compiled and run: the analysis offers only addresses that compile, and the rendered
arithmetic does what it says (needs a C and C++ compiler, so it lives in the integration tier)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from amppatch.patch import SiteRequest, analyze_requests, parse_site_spec, plan_sites, render_site

ApplyOnce = Callable[..., tuple]  # the `apply_once` fixture of tests/conftest.py
TILE_SPECS = ["fx_tile_kernel<float, fx_tile_block, COLS_T>::apply::*", "fx_tile_kernel<float, uint16_t>::apply::*",
              "fx_direct_lambda::*"]


def test_strided_rows_round_the_distance_up_to_whole_rows(tree: Path) -> None:
    """The row pointer of fx_rows moves `stride` floats per iteration: the prefetch goes a whole number of
    rows ahead, in bytes (stride * sizeof(*row)), right after the row's declaration. The arithmetic is
    checked by running it: 1000 B ahead over rows of 3 floats (12 B) rounds up to 84 rows = 1008 B."""
    requests = [parse_site_spec("fx_rows:0:row", 1000, 3)]
    (site,) = plan_sites(requests, analyze_requests(tree, requests, None), 64).sites
    text = render_site(site, tunable=False, line_size=64)
    assert "((1000 + (__SIZE_TYPE__)((stride) * sizeof(*(base))) - 1)" in text
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (ci/setup.sh installs gcc)")
    line = next(ln for ln in text.splitlines() if "__builtin_prefetch" in ln)
    offset_expr = line.split("__builtin_prefetch(", 1)[1].rsplit(", 0, 3);", 1)[0]
    program = tree / "stride.c"
    program.write_text("#include <stdio.h>\nint main(void) { static float base[4096]; long stride = 3;\n"
                       "const float * row = base;\n"
                       f"printf(\"%ld\\n\", (long)(({offset_expr}) - (const char *) row)); return 0; }}\n")
    exe = tree / "stride"
    subprocess.run([cc, "-std=gnu11", str(program), "-o", str(exe)], check=True)
    assert subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.strip() == "1008"


@pytest.mark.parametrize("tunable", [False, True])
def test_lambda_tiles_compile_compute_the_same_and_apply_twice_is_a_no_op(
        tree: Path, tmp_path: Path, tunable: bool, apply_once: ApplyOnce) -> None:
    """Every tile stream of the AMX-shaped fixture, patched: the C++ compiles warning-free, the program
    prints exactly what the unpatched one prints, the prefetch loops really run (one per unrolled copy),
    and a second apply changes nothing."""
    cxx = shutil.which("c++") or shutil.which("g++")
    source = tree / "ggml/src/ggml-cpu/fx_tiles.cpp"
    main = tmp_path / "main.cpp"
    main.write_text('#include <cstdio>\n#include <vector>\n#include "fx_tiles.cpp"\n'
                    "int main() {\n  const int KB = 64;\n  std::vector<float> A(KB * 16 + 16, 0.5f);\n"
                    "  std::vector<char> B(6 * KB * 16 * 34);\n"
                    "  for (size_t i = 0; i < B.size(); ++i) B[i] = (char) (i * 7 % 23);\n"
                    "  float C[16] = {};\n  float s = fx_tiles_run(KB, A.data(), B.data(), C);\n"
                    '  for (float c : C) std::printf("%.9g ", c);\n  std::printf("%.9g\\n", s);\n}\n')

    def run() -> str:
        exe = tmp_path / "fx"
        subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{source.parent}", "-o", str(exe), str(main)],
                       check=True, capture_output=True, text=True)
        return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout

    if cxx is None:
        pytest.skip("no C++ compiler (ci/setup.sh installs g++)")
    before = run()
    _, _, applied = apply_once(tree, TILE_SPECS, tunable=tunable)
    assert {(s.function, s.stream.expression) for s in applied} == {
        ("fx_tile_kernel<float, fx_tile_block, COLS_T>::apply", "A[i]"),
        ("fx_tile_kernel<float, fx_tile_block, COLS_T>::apply", "b_ptr"),
        ("fx_tile_kernel<float, uint16_t>::apply", "A[k + e]"),
        ("fx_tile_kernel<float, uint16_t>::apply", "B + col * K + k + e"),
        ("fx_direct_lambda", "x[j]")}
    text = source.read_text()
    assert text.count("for (int amppatch_u = 0; amppatch_u < (int)(COLS); amppatch_u++)") == 2  # b_ptr, B + ...
    assert run() == before
    _, changes2, applied2 = apply_once(tree, TILE_SPECS, tunable=tunable)
    assert changes2 == [] and applied2 == []


@pytest.mark.parametrize("tunable", [False, True])
def test_every_offered_stream_compiles_once_patched(tree: Path, tunable: bool, apply_once: ApplyOnce) -> None:
    """Apply a prefetch to every stream of every loop of the C fixtures and compile the result: the
    analysis offers only addresses that are valid C at the insertion point (a parse is not enough)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (ci/setup.sh installs gcc)")
    functions = ["fx_dot_blocks", "fx_bumps", "fx_rows", "fx_prefetched", "fx_braceless", "fx_while", "fx_tiled",
                 "fx_byte_rows", "fx_sameline"]
    probe = [SiteRequest(f) for f in functions]
    analyses = analyze_requests(tree, probe, None)
    specs = [f"{f}:{lp.ordinal}:*" for f in functions for lp in analyses[f].loops if lp.streams]
    _, _, applied = apply_once(tree, specs, tunable=tunable)
    assert len(applied) >= 15 and any(s.stream.kind == "row" and s.stream.row_stride for s in applied)
    source = tree / "ggml/src/ggml-cpu/fx_kernels.c"
    text = source.read_text()  # code that shared a line with the insertion point keeps a line of its own
    assert "\n        s += 1.0f;\n" in text and "\n        s += row[0];\n" in text
    for define in ([], ["-DFX_WIDE"], ["-DFX_MID"]):  # each #if branch of fx_dot_blocks in turn
        done = subprocess.run([cc, "-fsyntax-only", "-std=gnu11", "-Wall", "-Werror", *define, str(source)],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
    # the C++ fixtures: specializations under their guard, a wrapper resolved to its callee
    cxx = shutil.which("c++") or shutil.which("g++")
    cpp_specs = ["fx_vec_dot_half", "fx_gemv_pack4", "fx_gemv_tmpl<fx_pack8, 8>:1:*", "fx_lambda_rows"]
    _, _, cpp_applied = apply_once(tree, [s for s in cpp_specs], tunable=tunable)
    assert {s.function for s in cpp_applied} >= {"fx_gemv_tmpl<fx_pack4, 4>", "fx_gemv_tmpl<fx_pack8, 8>"}
    if cxx is not None:
        done = subprocess.run([cxx, "-fsyntax-only", "-std=c++11", "-Wall", "-Werror",
                               str(tree / "ggml/src/ggml-cpu/fx_vec.cpp")], capture_output=True, text=True,
                              check=False)
        assert done.returncode == 0, done.stderr


