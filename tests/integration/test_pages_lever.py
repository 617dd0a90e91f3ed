"""The huge-page lever's rendered C++, compiled into our own stand-in for llama.cpp's weight mapping and run:
the patched mapping sits on huge pages where this kernel maps read-only files with PMDs, computes what stock
computes, and where THP is `never` it says so and maps like stock."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from amppatch.pages import hugepages_change, thp_enabled_mode

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures_pages" / "llama-mmap.cpp"
SIZE = 64 << 20


def _compile(source: Path, exe: Path) -> None:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler (ci/setup.sh installs g++)")
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-DFX_MAIN", "-o", str(exe),
                    str(source)], check=True, capture_output=True, text=True)


def _run(exe: Path, data: Path, **env: str) -> tuple[int, str, str]:
    done = subprocess.run([str(exe), str(data)], capture_output=True, text=True, check=True,
                          env={**os.environ, **env})
    m = re.fullmatch(r"pmd_kib=(\d+) sum=(\d+)\n", done.stdout)
    assert m, done.stdout
    return int(m.group(1)) * 1024, m.group(2), done.stderr


def test_lever_maps_the_weights_on_huge_pages_and_reads_the_same(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    shutil.copy(FIXTURE, tmp_path / "src" / "llama-mmap.cpp")
    stock_exe, patched_exe = tmp_path / "stock", tmp_path / "patched"
    _compile(tmp_path / "src" / "llama-mmap.cpp", stock_exe)
    change = hugepages_change(tmp_path)
    assert change is not None
    (tmp_path / change.relpath).write_bytes(change.after)
    _compile(tmp_path / "src" / "llama-mmap.cpp", patched_exe)

    data = tmp_path / "weights.bin"
    data.write_bytes(bytes(range(256)) * (SIZE // 256))
    _, stock_sum, _ = _run(stock_exe, data)  # leaves the file cached in small pages
    pmd, patched_sum, log = _run(patched_exe, data)
    assert patched_sum == stock_sum
    if thp_enabled_mode({}) == "never" or "THP is not available" in log:
        assert pmd == 0 and "weights stay on 4 KiB pages" in log
    else:
        # cached small by the stock run: the lever drops the clean pages once and maps them again
        assert pmd * 2 >= SIZE, log
        assert "of the weights on huge pages" in log

    never = tmp_path / "enabled"
    never.write_text("always madvise [never]\n")
    pmd_never, never_sum, log_never = _run(patched_exe, data, AMPPATCH_THP_ENABLED_PATH=str(never))
    assert never_sum == stock_sum and "THP is 'never' here" in log_never
    off_pmd, _, log_off = _run(patched_exe, data, AMPPATCH_HUGEPAGES="0")
    assert "huge pages" not in log_off
    assert pmd_never <= off_pmd + (2 << 20)  # like stock: whatever the file's cached pages already are
