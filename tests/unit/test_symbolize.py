"""Symbolization: addr2line parsing, line choice in inline chains, and module placement."""

from __future__ import annotations

from pathlib import Path

from amppatch.symbolize import Frame, Placer, parse_addr2line, pick_line
from amppatch.tracer.reader import MapsEntry, Module, Trace

A2L = """0x0000000000001330
_mm512_dpbusd_epi32
/usr/lib/gcc/x86_64-linux-gnu/12/include/avx512vnniintrin.h:50
mul_sum_i8_pairs_float
/src/ggml/src/ggml-cpu/arch/x86/quants.c:200 (discriminator 3)
ggml_vec_dot_q8_0_q8_0
/src/ggml/src/ggml-cpu/arch/x86/quants.c:1333
0x0000000000002000
??
??:0
"""


def test_parse_addr2line_inline_chains() -> None:
    out = parse_addr2line(A2L)
    chain = out[0x1330]
    assert [f.function for f in chain] == ["_mm512_dpbusd_epi32", "mul_sum_i8_pairs_float", "ggml_vec_dot_q8_0_q8_0"]
    assert chain[1].line == 200  # the discriminator is not part of the number
    assert out[0x2000] == [Frame("??", "??", 0)]


def test_pick_line_skips_compiler_headers() -> None:
    chain = parse_addr2line(A2L)[0x1330]
    assert pick_line(chain) == Frame("mul_sum_i8_pairs_float", "/src/ggml/src/ggml-cpu/arch/x86/quants.c", 200)


def test_pick_line_falls_back_to_innermost() -> None:
    chain = [Frame("f", "/usr/include/x.h", 3)]
    assert pick_line(chain) == chain[0]


def _trace(modules: list[Module], maps: list[MapsEntry], exe: str = "/bin/prog") -> Trace:
    return Trace(Path("t"), 1, {"exe": exe}, [], [], [], modules, maps, True)


def test_placer_uses_module_bases_and_the_exe_for_the_empty_name() -> None:
    mods = [
        Module("", 0x555500000000, ((0x555500001000, 0x555500005000),)),
        Module("/lib/libggml-cpu.so", 0x7F0000000000, ((0x7F0000010000, 0x7F0000090000),)),
    ]
    p = Placer(_trace(mods, []))
    assert p.place(0x555500001234).module == "/bin/prog"
    assert p.place(0x555500001234).vaddr == 0x1234
    assert p.place(0x7F0000010010).vaddr == 0x10010
    assert p.place(0x7F0000090000) is None  # end is exclusive
    assert p.place(0x10) is None


def test_placer_from_maps_uses_the_elf_program_headers(tmp_path: Path) -> None:
    # a real ELF (this Python interpreter) placed as if mapped at an arbitrary address
    import sys

    from elftools.elf.elffile import ELFFile

    exe = Path(sys.executable).resolve()
    with open(exe, "rb") as fh:
        segs = [s for s in ELFFile(fh).iter_segments() if s["p_type"] == "PT_LOAD" and s["p_flags"] & 1]
    seg = segs[0]
    page_off = seg["p_offset"] & ~0xFFF
    start = 0x7000_0000_0000
    maps = [MapsEntry(start, start + seg["p_filesz"] + 0x1000, "r-xp", page_off, str(exe))]
    p = Placer(_trace([], maps))
    pc = start + (seg["p_offset"] - page_off) + 0x10
    placed = p.place(pc)
    assert placed is not None and placed.module == str(exe)
    assert placed.vaddr == seg["p_vaddr"] + 0x10


def test_normalize_function_gives_one_spelling() -> None:
    from amppatch.symbolize import normalize_function

    long = "void gemv_q4_b32_8x8_q8_0_lut_avx<block<4, 8> >(int, float*, unsigned long, void const*)"
    assert normalize_function(long) == normalize_function("gemv_q4_b32_8x8_q8_0_lut_avx<block<4, 8> >")
    assert normalize_function("ns::C::get(ggml_tensor const*) const") == "ns::C::get"
    assert normalize_function("void (anonymous namespace)::f<int>(int)") == "(anonymous namespace)::f<int>"
    assert normalize_function("??") == "??"
