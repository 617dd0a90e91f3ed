"""Huge-page text parsing on recorded text: sysfs THP modes, /proc/meminfo, smaps, the probe's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amppatch.errors import UsageError
from amppatch.hugepages import (
    HugePagesReport,
    HugeShare,
    HugetlbPool,
    ThpModes,
    filesystem_of,
    huge_bytes_in_ranges,
    merge_ranges,
    parse_probe_output,
    parse_smaps,
    selected_mode,
)

PROBE_OUT = (Path(__file__).parent / "data" / "hugepage_probe.out").read_text()
MIB = 1 << 20

# /proc/meminfo of a machine with a hugetlb pool of 1 GiB pages (the recorded one has none).
MEMINFO = """\
MemTotal:       24589392 kB
MemFree:         1221676 kB
AnonHugePages:    129024 kB
ShmemHugePages:        0 kB
FileHugePages:     16384 kB
FilePmdMapped:     16384 kB
HugePages_Total:       4
HugePages_Free:        3
HugePages_Rsvd:        0
HugePages_Surp:        0
Hugepagesize:    1048576 kB
Hugetlb:         4194304 kB
"""

# Two mappings of a llama.cpp process: the model file (half on PMDs) and an anonymous repack buffer.
SMAPS = """\
7f0000000000-7f0004000000 r--s 00000000 fe:00 123 /models/m.gguf
Size:              65536 kB
KernelPageSize:        4 kB
Rss:               65536 kB
AnonHugePages:         0 kB
FilePmdMapped:     32768 kB
THPeligible:           0
VmFlags: rd sh mr mw me ms hg
7f0010000000-7f0011000000 rw-p 00000000 00:00 0
Size:              16384 kB
AnonHugePages:     16384 kB
FilePmdMapped:         0 kB
VmFlags: rd wr mr mw me ac hg
"""


def test_selected_mode_reads_the_bracketed_choice():
    assert selected_mode("always [madvise] never\n") == "madvise"
    assert selected_mode("always defer defer+madvise [madvise] never") == "madvise"
    assert selected_mode("always within_size advise [never] deny force") == "never"
    assert selected_mode(None) == "unknown" and selected_mode("  ") == "unknown"
    assert selected_mode("always") == "always"


def test_thp_modes_round_trip():
    modes = ThpModes.parse("[always] madvise never", "always defer [defer+madvise] madvise never", None)
    assert modes == ThpModes("always", "defer+madvise", "unknown")
    assert ThpModes.from_json(json.loads(json.dumps(modes.to_json()))) == modes


def test_hugetlb_pool_from_meminfo():
    pool = HugetlbPool.parse_meminfo(MEMINFO)
    assert (pool.total_pages, pool.free_pages, pool.page_size_bytes) == (4, 3, 1 << 30)
    assert pool.total_bytes == 4 << 30 and pool.free_bytes == 3 << 30
    assert HugetlbPool.from_json(pool.to_json()) == pool
    assert HugetlbPool.parse_meminfo("") == HugetlbPool(0, 0, 0)


def test_parse_smaps_reads_headers_fields_and_flags():
    maps = parse_smaps(SMAPS)
    assert len(maps) == 2
    model, anon = maps
    assert (model.start, model.end, model.perms, model.path) == (0x7F0000000000, 0x7F0004000000, "r--s",
                                                                 "/models/m.gguf")
    assert model.size == 64 * MIB and model.file_pmd_bytes == 32 * MIB and model.fields["THPeligible"] == 0
    assert "hg" in model.vm_flags and anon.path == "" and anon.anon_huge_bytes == 16 * MIB


def test_merge_ranges_coalesces_and_drops_empty():
    assert merge_ranges([(10, 20), (0, 5), (15, 30), (40, 40), (5, 8)]) == [(0, 8), (10, 30)]


def test_huge_bytes_of_whole_mappings_are_exact():
    share = huge_bytes_in_ranges(SMAPS, [(0x7F0000000000, 0x7F0004000000), (0x7F0010000000, 0x7F0011000000)])
    assert share == HugeShare(80 * MIB, 80 * MIB, 32 * MIB, 16 * MIB, 2, True)
    assert share.huge_bytes == 48 * MIB and share.share == pytest.approx(0.6)
    assert HugeShare.from_json(json.loads(json.dumps(share.to_json()))) == share


def test_huge_bytes_of_part_of_a_mapping_are_prorated():
    # the second quarter of the model mapping, plus 16 MiB where nothing is mapped
    start = 0x7F0000000000 + 16 * MIB
    share = huge_bytes_in_ranges(SMAPS, [(start, start + 16 * MIB), (0x7F0020000000, 0x7F0021000000)])
    assert share.range_bytes == 32 * MIB and share.mapped_bytes == 16 * MIB
    assert share.file_pmd_bytes == 8 * MIB and share.anon_huge_bytes == 0 and not share.exact


def test_huge_bytes_of_no_range_is_zero():
    share = huge_bytes_in_ranges(SMAPS, [])
    assert share.range_bytes == 0 and share.share == 0.0 and share.mappings == 0


def test_filesystem_of_takes_the_longest_mount_point():
    mounts = "/dev/vda / ext4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\n/dev/vdb /data/u\\040x xfs rw 0 0\n"
    assert filesystem_of("/srv/cache/amppatch/models", mounts) == "ext4"
    assert filesystem_of("/tmp/a", mounts) == "tmpfs" and filesystem_of("/tmpx", mounts) == "ext4"
    assert filesystem_of("/data/u x/m", mounts) == "xfs"
    assert filesystem_of("/x", "") == "unknown"


def test_recorded_probe_output_file_thp_works_collapse_anon_only():
    files, collapses = parse_probe_output(PROBE_OUT)
    assert len(files) == 1
    probe = files[0]
    assert probe.test == "file_thp" and probe.bytes == 16 * MIB and probe.aligned
    assert probe.file_pmd_bytes == 16 * MIB and probe.cached_before_touch == 0 and probe.works
    by_kind = {c.on: c for c in collapses}
    assert by_kind["anon"].accepted and by_kind["anon"].huge_bytes == 4 * MIB
    assert not by_kind["file"].accepted and by_kind["file"].errno == "EINVAL" and by_kind["file"].huge_bytes == 0


def _report(text: str) -> HugePagesReport:
    files, collapses = parse_probe_output(text)
    return HugePagesReport(ThpModes("madvise", "madvise", "never"), HugetlbPool(0, 0, 2 * MIB), "/cache/models",
                           "ext4", files, collapses)


def test_report_summary_and_round_trip():
    report = _report(PROBE_OUT)
    assert report.file_thp_works and report.collapse_accepted("anon") and report.collapse_accepted("file") is False
    assert report.summary().startswith("file-backed THP: works — 16.0 MiB of a 16.0 MiB")
    data = json.loads(json.dumps(report.to_json()))
    assert data["schema_version"] == 1 and data["file_thp_works"] is True
    assert HugePagesReport.from_json(data) == report


def test_report_without_pmds_says_it_does_not_work():
    text = PROBE_OUT.replace("FilePmdMapped:     16384 kB", "FilePmdMapped:         0 kB")
    report = _report(text)
    assert not report.file_thp_works
    assert report.summary().startswith("file-backed THP: does not work — 0 of 16.0 MiB")


def test_report_that_works_only_aligned_says_so():
    unaligned = PROBE_OUT.replace("FilePmdMapped:     16384 kB", "FilePmdMapped:         0 kB")
    first = unaligned.splitlines()[0]
    record = json.loads(first)
    aligned = dict(record, test="file_thp_aligned", aligned=1)
    block = PROBE_OUT.split("#smaps-begin file_thp\n", 1)[1].split("#smaps-end file_thp\n", 1)[0]
    text = (unaligned.replace(first, json.dumps(dict(record, aligned=0)))
            + json.dumps(aligned) + "\n#smaps-begin file_thp_aligned\n" + block + "#smaps-end file_thp_aligned\n")
    report = _report(text)
    assert not report.file_thp_works
    assert "works only at a 2 MiB-aligned address" in report.summary()


def test_probe_error_lines_are_kept():
    text = '{"test":"file_thp","bytes":16777216,"error":"cannot write a 16777216-byte file in /x: No space left"}\n'
    report = _report(text)
    assert not report.file_thp_works and "No space left" in report.summary()


def test_from_json_refuses_another_schema_version():
    data = _report(PROBE_OUT).to_json()
    with pytest.raises(UsageError, match="schema_version 2"):
        HugePagesReport.from_json({**data, "schema_version": 2})


def test_doctor_lines_for_huge_pages():
    from amppatch.doctor import huge_page_checks

    checks = {c.name: c for c in huge_page_checks(_report(PROBE_OUT))}
    assert set(checks) == {"file-backed THP", "MADV_COLLAPSE", "hugetlb pool"}
    assert checks["file-backed THP"].ok and checks["file-backed THP"].detail.startswith("works — 16.0 MiB")
    assert checks["MADV_COLLAPSE"].ok and "file: refused (EINVAL)" in checks["MADV_COLLAPSE"].detail
    assert not checks["hugetlb pool"].ok and checks["hugetlb pool"].detail == "0 of 0 pages free, 2048 KiB each"
    assert not any(c.required for c in checks.values())
