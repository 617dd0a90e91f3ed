"""`amppatch apply` argument handling (pure: parsing only)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from amppatch.cli import cmd_apply
from amppatch.errors import UsageError


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cmd_apply.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_documented_apply_arguments_parse() -> None:
    args = _parse("--repo", "/r", "--site", "ggml_vec_dot_q8_0_q8_0:0:x[ib]", "--site", "ggml_vec_dot_f16",
                  "--distance", "4096", "--hint", "2", "--tunable", "--dry-run", "--no-build", "--cflags=-O2",
                  "--define", "GGML_NATIVE=OFF", "-o", "/tmp/o")
    assert args.site == ["ggml_vec_dot_q8_0_q8_0:0:x[ib]", "ggml_vec_dot_f16"]
    assert (args.distance, args.hint, args.tunable, args.dry_run, args.no_build) == (4096, 2, True, True, True)
    assert args.define == ["GGML_NATIVE=OFF"] and args.out == Path("/tmp/o")


def test_the_huge_page_lever_parses_alone_and_with_sites() -> None:
    assert _parse("--repo", "/r", "--hugepages").hugepages is True
    both = _parse("--repo", "/r", "--site", "ggml_vec_dot_q8_0_q8_0", "--hugepages", "--dry-run")
    assert (both.site, both.hugepages) == (["ggml_vec_dot_q8_0_q8_0"], True)
    assert _parse("--repo", "/r", "--site", "f").hugepages is False


def test_hint_must_be_a_locality() -> None:
    with pytest.raises(SystemExit):
        _parse("--repo", "/r", "--site", "f", "--hint", "4")


def test_like_excludes_build_flags(tmp_path: Path) -> None:
    args = _parse("--repo", str(tmp_path), "--site", "f", "--like", str(tmp_path), "--cflags=-O1")
    with pytest.raises(UsageError, match="--like"):
        cmd_apply.run(args)


def test_the_suggested_race_never_switches_a_patched_repack_gemv_off() -> None:
    from amppatch.cli.cmd_apply import repack_off_keeps_sites_running

    assert repack_off_keeps_sites_running(["ggml_vec_dot_q8_0_q8_0"])
    # Q4_K_M: the Q4_K repack GEMV and the Q6_K vec_dot together — --repack 0 would switch the GEMV site off
    assert not repack_off_keeps_sites_running(["ggml_gemv_q4_K_8x8_q8_K", "ggml_vec_dot_q6_K_q8_K"])
    assert not repack_off_keeps_sites_running(["gemv_q4_b32_8x8_q8_0_lut_avx<block_q4_0x8>"])
    assert not repack_off_keeps_sites_running(["tinygemm_kernel_vnni<block_q8_0, block_q8_0>::apply"])
