"""Loop and stream analysis on amppatch's own fixtures (pure: no compile database, so no subprocess)."""

from __future__ import annotations

from pathlib import Path

import pytest

from amppatch.errors import UsageError
from amppatch.source import analyze_function, default_stream


def test_if_chain_loops_steps_and_indexed_streams(tree: Path) -> None:
    fa = analyze_function(tree, "fx_dot_blocks")
    assert fa.relpath == "ggml/src/ggml-cpu/fx_kernels.c"
    assert [lp.step for lp in fa.loops] == ["4", "2", "1", "1", "1"]
    assert [lp.induction for lp in fa.loops] == ["ib", "ib", "ib", "ib", "j"]
    assert [lp.guard for lp in fa.loops[:3]] == ["#if defined(FX_WIDE)", "#elif defined(FX_MID)",
                                                 "#else (of defined(FX_MID))"]
    wide = fa.loops[0]
    x = wide.stream("x[ib]")
    assert x is not None and x.kind == "indexed" and x.address == "&x[ib]"
    assert x.accesses == ("x[ib]", "x[ib + 1]", "x[ib + 2]", "x[ib + 3]")
    assert x.element_type == "const fx_block" and x.elements_per_iteration_value == 4
    assert wide.stream("y[ib + 2]").base == "y"  # any access names its stream
    assert wide.stream("x").base == "x"  # so does the base pointer
    # nested loop: depth, parent, and no stream of its own (x[ib].vals[j] is indexed by ib, not j)
    inner = fa.loops[4]
    assert (inner.depth, inner.parent) == (1, 3)
    # without a compile database liveness is unknown, and the analysis says so
    assert all(lp.live is None for lp in fa.loops)
    assert any("no compile command" in w for w in fa.warnings)
    # the weight-like stream (first pointer parameter) is the default
    assert default_stream(wide).base == "x"


def test_pointer_bumps_belong_to_the_loop_that_bumps(tree: Path) -> None:
    fa = analyze_function(tree, "fx_bumps")
    outer, inner = fa.loops
    assert [s.expression for s in outer.streams] == ["blocks[i]"]  # lo = blocks[i].lo is covered by it
    lo = inner.stream("lo")
    assert lo is not None and lo.kind == "bump" and lo.elements_per_iteration_value == 64
    assert lo.accesses == ("lo += 32", "lo += 32")
    assert inner.stream("a").elements_per_iteration_value == 16


def test_row_pointer_set_in_outer_loop(tree: Path) -> None:
    fa = analyze_function(tree, "fx_rows")
    outer, inner = fa.loops
    row = outer.stream("row")
    assert row is not None and row.kind == "row" and "base + r * stride" in row.note
    assert row.row_stride == "(stride) * sizeof(*(base))"  # bytes per iteration: float * arithmetic
    assert inner.stream("row[k]").kind == "indexed"


def test_streams_whose_names_are_not_in_scope_at_the_loop_top_are_not_offered(tree: Path) -> None:
    """A prefetch goes first in the loop body: an access built from names declared later in the body
    (or a shadowing redeclaration) cannot be prefetched there (the CI failure of dst_col[iir0 + cn])."""
    fa = analyze_function(tree, "fx_tiled")
    tile, rows, cols, copy = fa.loops
    assert [s.expression for s in tile.streams] == ["dst + t0", "out"]
    reasons = dict(u.split(": ", 1) for u in tile.unplaceable)
    assert reasons["out[t0 - t0 + c]"].startswith("uses c, out,")
    assert reasons["dst[t0 + k]"].startswith("uses k,")  # the block-local k shadows the function's k
    # inner loops see their own names: the same accesses are streams there
    assert cols.stream("wrow[k]") is not None and copy.stream("out[t0 - t0 + c]") is not None
    # a row pointer is prefetched right after its declaration (it does not exist before)
    row = rows.stream("wrow")
    assert row.kind == "row" and row.insert_byte is not None
    text = fa.source[: row.insert_byte].decode()
    assert text.rstrip().endswith("const float * wrow = w + r * row_stride;")


def test_row_stride_in_bytes_only_when_certain(tree: Path) -> None:
    (loop,) = analyze_function(tree, "fx_byte_rows").loops
    assert loop.stream("k_row").row_stride == "nb1"  # char arithmetic: the stride is already bytes
    assert loop.stream("half").row_stride is None  # ic * nb1 / 2: not a plain factor


def test_lambda_parameters_and_range_for_variables_are_scoped(tree: Path) -> None:
    outer = analyze_function(tree, "fx_lambda_rows").loops[0]
    assert outer.streams == ()
    reasons = dict(u.split(": ", 1) for u in outer.unplaceable)
    assert reasons["x[i + j]"].startswith("uses j,") and reasons["x[i + k]"].startswith("uses k,")


def test_existing_prefetch_is_reported(tree: Path) -> None:
    (loop,) = analyze_function(tree, "fx_prefetched").loops
    (pf,) = loop.prefetches
    assert pf.text == "__builtin_prefetch(&a[i] + 64, 0, 1)" and not pf.by_amppatch
    assert loop.step == "FX_STEP" and loop.step_value is None  # a macro: only the compiler knows


def test_braceless_body_and_offset_stream(tree: Path) -> None:
    (loop,) = analyze_function(tree, "fx_braceless").loops
    assert not loop.body_compound
    assert loop.stream("a + i").kind == "offset"


def test_while_loop_induction(tree: Path) -> None:
    (loop,) = analyze_function(tree, "fx_while").loops
    assert (loop.kind, loop.induction, loop.step) == ("while", "i", "2")
    assert loop.stream("v[i]") is not None


def test_grammar_breaking_macro_marks_the_loop(tree: Path) -> None:
    (loop,) = analyze_function(tree, "fx_broken").loops
    assert loop.parse_error is not None and "ERROR" in loop.parse_error


def test_cpp_offset_stream_inside_macro_argument(tree: Path) -> None:
    fa = analyze_function(tree, "fx_vec_dot_half")
    assert fa.grammar == "cpp"
    main = fa.loops[2]
    assert main.step == "FX_STEP"
    assert [s.expression for s in main.streams] == ["x + i", "y + i"]
    assert fa.loop_for_line(main.start_line + 2).ordinal == 3  # a line of the inner loop maps to it
    assert fa.loop_at_line(main.start_line).ordinal == 2


def test_unknown_function_is_a_usage_error(tree: Path) -> None:
    with pytest.raises(UsageError, match="no definition"):
        analyze_function(tree, "fx_does_not_exist")


def test_other_architectures_copy_is_ignored(tree: Path) -> None:
    import platform

    from amppatch.source import _ARCH_DIRS

    ours = _ARCH_DIRS.get(platform.machine().lower())
    other = "powerpc" if ours != "powerpc" else "x86"
    d = tree / "ggml" / "src" / "ggml-cpu" / "arch" / other
    d.mkdir(parents=True)
    (d / "k.c").write_text("float fx_only_elsewhere(int n, const float * a) {\n"
                           "    float s = 0; for (int i = 0; i < n; i++) s += a[i]; return s; }\n")
    home = tree / "ggml" / "src" / "ggml-cpu" / "arch" / (ours or "x86")
    home.mkdir(parents=True, exist_ok=True)
    (home / "k.c").write_text("float fx_only_elsewhere(int n, const float * a) {\n"
                              "    float s = 0;\n    for (int i = 0; i < n; i += 2) s += a[i];\n    return s;\n}\n")
    fa = analyze_function(tree, "fx_only_elsewhere")
    assert fa.relpath.endswith(f"arch/{ours or 'x86'}/k.c")
    assert len(fa.candidates) == 2


def test_template_specialization_names_and_guard(tree: Path) -> None:
    from amppatch.source import split_specialization

    assert split_specialization("g") == ("g", ())
    assert split_specialization("g<a,  b<c, d>, 4>") == ("g", ("a", "b<c, d>", "4"))
    fa = analyze_function(tree, "fx_gemv_tmpl<fx_pack8,8>")
    assert fa.function == "fx_gemv_tmpl<fx_pack8, 8>"
    assert fa.specialization == {"block_t": "fx_pack8", "ROWS": "8"}
    assert fa.specialization_guard == "std::is_same<block_t, fx_pack8>::value && ((ROWS) == (8))"
    with pytest.raises(UsageError, match=r"takes \(type block_t, value ROWS\); 1 argument"):
        analyze_function(tree, "fx_gemv_tmpl<fx_pack8>")
    with pytest.raises(UsageError, match="not a template"):
        analyze_function(tree, "fx_rows<int>")
    # the wrappers' calls to it are seen, with the template arguments as written
    assert [c.callee for c in analyze_function(tree, "fx_gemv_pack8").calls] == [
        "fx_gemv_tmpl<fx_pack4, 4>", "fx_gemv_tmpl<fx_pack8, 8>"]


def test_class_specialization_methods_and_lambda_tiles(tree: Path) -> None:
    """A method of a partial specialization is named by its pattern (or a prefix of it); the loop that
    hands its induction variable to a lambda carries the lambda's streams, rewritten in the loop's names."""
    from amppatch.source import UNROLL_INDEX, default_stream, split_member

    assert split_member("X<a::b, c>::apply") == ("X<a::b, c>", "apply")
    assert split_member("gemv<a::b>") == (None, "gemv<a::b>")
    fa = analyze_function(tree, "fx_tile_kernel<float,fx_tile_block>::apply")
    assert fa.function == "fx_tile_kernel<float, fx_tile_block>::apply" and fa.specialization_guard is None
    loop = fa.default_loop()
    assert loop is not None and loop.induction == "i" and loop.depth == 0  # not the k loop in the lambda
    tile = default_stream(loop)
    assert tile is not None and (tile.kind, tile.expression) == ("tile", "b_ptr")
    assert tile.address == f"B + FX_TILE_INDEX({UNROLL_INDEX}, i, KB, TILE_SIZE)"
    # bytes per iteration: the address at i = step minus at i = 0, column 0 (loop-invariant: folds)
    assert tile.tile_step == ("(long)((const char *)(B + FX_TILE_INDEX(0, (1), KB, TILE_SIZE)) - "
                              "(const char *)(B + FX_TILE_INDEX(0, 0, KB, TILE_SIZE)))")
    assert tile.unroll == "COLS"
    shared = loop.stream("A[i]")  # read by every column: one prefetch, not one per unrolled copy
    assert shared is not None and shared.unroll is None and shared.address == "&A[i]"
    # binding the specialization's own parameter confines the site to that instantiation
    bound = analyze_function(tree, "fx_tile_kernel<float, fx_tile_block, 4>::apply")
    assert bound.specialization_guard == "((COLS_T) == (4))"
    # F16-like: locals of the lambda (col = idx % COLS) are inlined; the weights beat the f32 activations
    half = analyze_function(tree, "fx_tile_kernel<float, uint16_t, COLS_T>::apply")
    weights = default_stream(half.default_loop())
    assert weights is not None and weights.address.startswith(f"B + ({UNROLL_INDEX} % COLS) * K + k")
    assert "(0 % COLS) * K + (16)" in (weights.tile_step or "")
    direct = analyze_function(tree, "fx_direct_lambda").default_loop()
    assert direct is not None and [(s.expression, s.address) for s in direct.streams] == [("x[j]", "&x[i]")]
    with pytest.raises(UsageError, match="matches 2 class specializations"):
        analyze_function(tree, "fx_tile_kernel::apply")


def test_member_site_at_names_the_definition_a_sampled_line_is_in(tree: Path) -> None:
    from amppatch.source import IN_LAMBDA, member_site_at

    path = tree / "ggml/src/ggml-cpu/fx_tiles.cpp"
    lines = path.read_text().splitlines()
    in_lambda = next(n for n, t in enumerate(lines, 1) if "acc[col] += a *" in t)
    in_loop = next(n for n, t in enumerate(lines, 1) if "Unroll<COLS>{}(compute, i);" in t)
    free = next(n for n, t in enumerate(lines, 1) if "s += at(i);" in t)
    assert member_site_at(path, in_lambda) == IN_LAMBDA
    assert member_site_at(path, in_loop) == "fx_tile_kernel<float, fx_tile_block, COLS_T>::apply"
    assert member_site_at(path, free) is None  # a free function: its symbol names it
