"""The huge-page probe and the roofline probe on this machine (the roofline against the pinned native build)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amppatch.build import Build
from amppatch.cli import main
from amppatch.doctor import probe_huge_pages
from amppatch.errors import UsageError
from amppatch.machine import read_caches
from amppatch.roofline import RooflineOptions, load_results, measure_roofline

MIB = 1 << 20


def test_huge_page_probe_measures_and_leaves_nothing_behind(tmp_path: Path):
    report = probe_huge_pages(tmp_path, mib=8)
    assert report.probe_error == ""
    assert list(tmp_path.iterdir()) == []  # the probe's files were removed
    plain = report.file_thp[0]
    assert plain.test == "file_thp" and plain.bytes == 8 * MIB and plain.error == ""
    assert plain.cached_before_touch < plain.bytes  # POSIX_FADV_DONTNEED dropped the written pages
    assert 0 <= plain.file_pmd_bytes <= plain.bytes and plain.file_pmd_bytes % (2 * MIB) == 0
    assert report.file_thp_works == (plain.file_pmd_bytes > 0)
    assert report.summary().startswith("file-backed THP: ")
    kinds = {c.on: c for c in report.collapse}
    assert set(kinds) == {"anon", "file"}
    for probe in kinds.values():
        assert probe.error == ""
        assert probe.accepted or probe.errno  # refused calls say why
    if kinds["anon"].accepted:
        assert kinds["anon"].huge_bytes == 4 * MIB
    assert report.hugetlb.page_size_bytes > 0


def test_doctor_writes_a_versioned_huge_pages_section(tmp_path: Path, capsys):
    assert main(["doctor", "-o", str(tmp_path / "doctor.json")]) == 0
    out = capsys.readouterr().out
    assert sum("file-backed THP" in line for line in out.splitlines()) == 1
    section = json.loads((tmp_path / "doctor.json").read_text())["huge_pages"]
    assert section["schema_version"] == 1
    assert set(section["thp"]) == {"enabled", "defrag", "shmem_enabled"}
    assert section["file_thp_works"] == any(p["file_pmd_bytes"] > 0 for p in section["file_thp"]
                                            if p["test"] == "file_thp")


def _llc() -> int:
    return max(c.size_bytes for c in read_caches() if c.type != "Instruction")


def test_roofline_q4_0_runs_the_repack_buffer_as_llama_cpp_does(native_build: Build):
    result = measure_roofline(RooflineOptions(build=native_build.dir, type="q4_0", width=2048, threads=1,
                                              stream_bytes=2 * _llc(), repeats=3, seconds=0.05,
                                              stream_ceiling_gbps=1e6))
    offered = dict(result.buffers_offered)
    expected = "CPU_REPACK" if offered.get("CPU_REPACK") else "CPU"
    assert result.buffer_type == expected and result.kernel_type == "q4_0" and result.threads == 1
    assert len(result.in_cache.gbps) == 3 and len(result.streaming.gbps) == 3
    assert all(g > 0 for g in result.in_cache.gbps + result.streaming.gbps)
    assert result.in_cache.bytes <= _llc() // 2 and result.streaming.bytes >= 2 * _llc() * 0.99
    assert result.streaming.huge_page_bytes < result.streaming.bytes // 100  # 4 KiB pages
    assert result.binds == "kernel"  # nothing consumes 1 PB/s


def test_roofline_cli_plain_buffer_writes_results(native_build: Build, tmp_path: Path, capsys):
    out = tmp_path / "r.json"
    code = main(["roofline", "--build", str(native_build.dir), "--type", "q8_0", "--buffer", "cpu",
                 "--stream-mib", str(2 * _llc() // MIB), "--repeats", "3", "--seconds", "0.05",
                 "--ceiling", "0.001", "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == str(out.resolve()) and any(line.startswith("| q8_0 | 2048 | 1 | CPU →") for line in printed)
    (result,) = load_results(out)
    assert result.buffer_type == "CPU" and result.kernel_path.startswith("vec_dot") and result.binds == "memory"


def test_roofline_refuses_what_is_not_cache_resident(native_build: Build):
    with pytest.raises(UsageError, match="not cache-resident"):
        measure_roofline(RooflineOptions(build=native_build.dir, cache_bytes=_llc(), repeats=3))
    with pytest.raises(UsageError, match="offers no buffer type named NOPE"):
        measure_roofline(RooflineOptions(build=native_build.dir, buffer="NOPE", stream_bytes=2 * _llc(),
                                         repeats=3, seconds=0.01))
