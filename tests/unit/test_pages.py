"""The huge-page lever's source edit (plan → render → splice → re-parse) and the smaps readers, on our own
stand-in for llama.cpp's weight mapping."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from amppatch.errors import UsageError
from amppatch.pages import MARKER, file_share, find_mmap_site, hugepages_change

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
