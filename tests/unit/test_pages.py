"""The huge-page lever's source edit (plan → render → splice → re-parse) and the smaps readers, on our own
stand-in for llama.cpp's weight mapping."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from amppatch.errors import UsageError
from amppatch.hugepages import HugeShare
from amppatch.pages import (
    MARKER,
    STATUSES,
    file_share,
    find_mmap_site,
    hugepages_change,
    hugepages_lever,
    share_record,
    thp_enabled_mode,
    verify_hugepages,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures_pages" / "llama-mmap.cpp"


@pytest.fixture()
def mmap_tree(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    shutil.copy(FIXTURE, tmp_path / "src" / "llama-mmap.cpp")
    return tmp_path


def test_finds_the_weight_mapping_and_its_arguments(mmap_tree: Path) -> None:
    site = find_mmap_site(mmap_tree)
    assert (site.relpath, site.size, site.flags, site.fd, site.indent) == (
        "src/llama-mmap.cpp", "file->size()", "flags", "fd", "        ")
    source = (mmap_tree / site.relpath).read_bytes()
    assert source[site.statement_start:].startswith(b"        addr = mmap(NULL, file->size()")
    assert source[site.helpers_at:].startswith(b"struct llama_mmap::impl {")


def test_edit_only_inserts_and_a_second_apply_changes_nothing(mmap_tree: Path) -> None:
    change = hugepages_change(mmap_tree)
    assert change is not None
    before, after = change.before.decode().splitlines(), change.after.decode().splitlines()
    kept = [ln for i, ln in enumerate(after, start=1) if i not in set(change.inserted_lines)]
    assert kept == before  # not one stock line touched
    branch = after.index("        addr = mmap(NULL, file->size(), PROT_READ, flags, fd, 0);")
    assert after[branch - 3:branch] == [
        f"        if (amppatch_thp_wanted()) {{ /* {MARKER} */",
        "            addr = amppatch_thp_map(fd, file->size(), flags);",
        f"        }} else /* {MARKER}: otherwise the stock mapping */"]
    (mmap_tree / change.relpath).write_bytes(change.after)
    assert hugepages_change(mmap_tree) is None


def test_a_tree_without_the_mapping_is_refused_with_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "llama-mmap.cpp").write_text("struct llama_mmap { int x; };\n")
    with pytest.raises(UsageError, match="no `addr = mmap"):
        find_mmap_site(tmp_path)


SMAPS = """\
55d0c0000000-55d0c4000000 r--s 00000000 fe:01 1234                       /models/m.gguf
Size:              65536 kB
Rss:               65536 kB
FilePmdMapped:     61440 kB
AnonHugePages:         0 kB
7f0000000000-7f0000200000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                2048 kB
AnonHugePages:      2048 kB
7f1000000000-7f1000400000 r--s 04000000 fe:01 1234                       /models/m.gguf
Size:               4096 kB
Rss:                1024 kB
FilePmdMapped:         0 kB
"""


def test_huge_pages_are_summed_over_the_mappings_of_one_file() -> None:
    share = file_share(SMAPS, Path("/models/m.gguf"))
    assert (share.range_bytes, share.file_pmd_bytes, share.anon_huge_bytes, share.mappings) == (
        68 << 20, 60 << 20, 0, 2)
    assert share.share == pytest.approx(60 / 68)
    assert file_share(SMAPS, Path("/other.gguf")).share == 0.0


# ----------------------------------------------------------------------------------------------------------
# apply's record of the lever (the manifest's `hugepages` section)

MIB = 1 << 20


def _share(range_mib: int, huge_mib: int) -> HugeShare:
    return HugeShare(range_mib * MIB, range_mib * MIB, huge_mib * MIB, 0, 1 if range_mib else 0, True)


def test_a_mapping_mostly_on_huge_pages_is_verified() -> None:
    rec = share_record("madvise", _share(18, 0), _share(18, 16),
                       ["llama_model_load: amppatch: huge pages: 18 of 18 MiB of the weights on huge pages"])
    assert list(rec) == ["thp_enabled", "status", "share_a", "share_b", "huge_bytes_b", "weight_bytes", "note"]
    assert (rec["thp_enabled"], rec["status"], rec["share_a"], rec["share_b"]) == ("madvise", "verified", 0.0,
                                                                                    round(16 / 18, 4))
    assert (rec["huge_bytes_b"], rec["weight_bytes"]) == (16 * MIB, 18 * MIB)
    assert "A 0%, B 89%" in rec["note"] and "the lever reported: 18 of 18 MiB" in rec["note"]


@pytest.mark.parametrize(("mode", "b", "off", "says"), [
    ("madvise", _share(64, 2), False, "kernel kept the file on small pages"),
    ("madvise", _share(1, 0), False, "smaller than one 2 MiB huge page"),
    ("madvise", _share(0, 0), False, "never seen with the model file mapped"),
    ("madvise", _share(64, 0), True, "AMPPATCH_HUGEPAGES=0 was set"),
    ("unavailable", _share(64, 0), False, "no transparent huge pages"),
])
def test_pages_that_come_out_small_are_a_status_with_the_reason(mode: str, b: HugeShare, off: bool,
                                                                 says: str) -> None:
    rec = share_record(mode, _share(64, 0), b, switched_off=off)
    assert rec["status"] == "small-pages" and says in rec["note"]


def test_thp_never_is_a_status_not_an_error_and_not_measured_says_why() -> None:
    rec = share_record("never", _share(18, 0), _share(18, 0), ["amppatch: huge pages: THP is 'never' here; ..."])
    assert rec["status"] == "thp-never" and "runs the stock mapping" in rec["note"]
    assert "THP is 'never' here; ..." in rec["note"]
    rec = share_record("madvise", None, None, not_measured="apply ran with --no-build")
    assert rec == {"thp_enabled": "madvise", "status": "not-measured", "share_a": None, "share_b": None,
                   "huge_bytes_b": None, "weight_bytes": None, "note": "apply ran with --no-build"}
    assert {share_record(m, _share(8, 0), b)["status"] for m, b in [
        ("always", _share(8, 8)), ("madvise", _share(8, 0)), ("never", _share(8, 8))]} < set(STATUSES)


def test_the_thp_mode_is_read_where_the_lever_reads_it(tmp_path: Path) -> None:
    fake = tmp_path / "enabled"
    fake.write_text("always madvise [never]\n")
    assert thp_enabled_mode({"AMPPATCH_THP_ENABLED_PATH": str(fake)}) == "never"
    assert thp_enabled_mode({"AMPPATCH_THP_ENABLED_PATH": str(tmp_path / "missing")}) == "unavailable"


def test_verify_measures_a_cold_then_b_and_redoes_a_run_never_seen_mapped(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"\0" * 4096)
    calls: list[tuple[str, int]] = []

    def measure(build: str, path: Path, *, tokens: int, bench_args: tuple[str, ...]) -> tuple[HugeShare, list[str]]:
        assert path == model and bench_args == ("-v",)  # verbose: llama-bench passes the lever's log only then
        calls.append((build, tokens))
        if build == "A" and len(calls) == 1:
            return _share(0, 0), []  # the run ended between two polls of its smaps
        return (_share(18, 0), []) if build == "A" else (_share(18, 18), ["amppatch: huge pages: 18 of 18 MiB"])

    rec = verify_hugepages("A", "B", model, measure=measure, environ={})  # type: ignore[arg-type]
    assert [c[0] for c in calls] == ["A", "A", "B"] and calls[1][1] > calls[0][1]
    assert (rec["status"], rec["share_a"], rec["share_b"]) == ("verified", 0.0, 1.0)


def test_the_lever_records_where_it_went_and_a_second_apply_changes_nothing(mmap_tree: Path) -> None:
    lever = hugepages_lever(mmap_tree)
    assert lever is not None and lever.name == "hugepages"
    assert lever.where == {"file": "src/llama-mmap.cpp", "line": 52, "size": "file->size()", "flags": "flags",
                           "fd": "fd", "indent": "        ", "struct_line": 40}
    assert lever.message_line().startswith("Lever: hugepages (src/llama-mmap.cpp:52): ")
    entry = lever.file_entry()
    assert entry["lever"] == "hugepages" and entry["inserted_lines"] == lever.change.inserted_lines
    (mmap_tree / lever.change.relpath).write_bytes(lever.change.after)
    assert hugepages_lever(mmap_tree) is None
