"""ChildPages against real child processes: it reads the mapping of the child the block starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from amppatch.childpages import ChildPages, children


def test_child_pages_reads_the_mapping_child_past_an_older_zombie(tmp_path: Path) -> None:
    """A child left unreaped by an earlier command (a zombie: empty smaps) must not hide the child that maps
    the file."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"\0" * (1 << 20))
    zombie = subprocess.Popen(["true"])
    time.sleep(0.2)  # `true` has exited and nobody waited: a zombie child of this process
    assert zombie.pid in children(os.getpid())
    mapper = ("import mmap, sys, time\n"
              "f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ); m[0]\n"
              "time.sleep(0.5)\n")
    try:
        with ChildPages(model) as watch:
            subprocess.run([sys.executable, "-c", mapper, str(model)], check=True)
    finally:
        zombie.wait()
    assert watch.result is not None and watch.result.range_bytes == 1 << 20
