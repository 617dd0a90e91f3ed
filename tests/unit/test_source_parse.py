"""Parsing with same-length macro blanking (pure: no subprocess)."""

from __future__ import annotations

from pathlib import Path

from amppatch.source.parse import (
    BLANKED_MACROS,
    blank_macros,
    error_nodes,
    find_function_definitions,
    function_name,
    parse_bytes,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_blanking_keeps_every_offset() -> None:
    src = b"void f(float * GGML_RESTRICT s, const void * RESTRICT vx) { GGML_TENSOR_BINARY_OP_LOCALS\n int x; }"
    out = blank_macros(src)
    assert len(out) == len(src)
    assert b"RESTRICT" not in out and b"LOCALS" not in out
    # everything outside the macros is untouched, byte for byte
    assert out.replace(b" ", b"") == src.replace(b"GGML_RESTRICT", b"").replace(b"RESTRICT", b"").replace(
        b"GGML_TENSOR_BINARY_OP_LOCALS", b"").replace(b" ", b"")


def test_blanking_does_not_touch_longer_identifiers() -> None:
    src = b"int GGML_RESTRICTED = 1; int MY_RESTRICT_X = 2;"
    assert blank_macros(src) == src


def test_restrict_macro_breaks_the_grammar_until_blanked() -> None:
    from tree_sitter import Parser

    from amppatch.source.parse import language

    src = b"void k(int n, float * RESTRICT s, const void * RESTRICT vx) { for (int i = 0; i < n; i++) s[i] = 0; }"
    raw = Parser(language("c")).parse(src)
    assert error_nodes(raw.root_node), "the fixture must really break the grammar"
    parsed = parse_bytes(src, "c")
    assert error_nodes(parsed.root) == []
    (fn,) = find_function_definitions(parsed, "k")
    assert function_name(fn) == "k"
    # texts come from the original source, not the blanked copy
    assert "RESTRICT" in parsed.text(fn)


def test_finds_every_fixture_function_in_both_grammars() -> None:
    src = (FIXTURES / "fx_kernels.c").read_bytes()
    for grammar in ("c", "cpp"):
        parsed = parse_bytes(src, grammar)
        for name in ("fx_dot_blocks", "fx_bumps", "fx_rows", "fx_prefetched", "fx_braceless", "fx_while"):
            assert len(find_function_definitions(parsed, name)) == 1, (grammar, name)


def test_blanked_macro_list_names_the_ggml_qualifier() -> None:
    assert "GGML_RESTRICT" in BLANKED_MACROS
