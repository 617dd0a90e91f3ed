"""Watch the huge pages of a file in the child processes this process starts, without changing how they start.

ab-test's warmup and profile's traced run start their child through `amppatch.proc` (or a test's stand-in),
which does not hand out the child's pid. `ChildPages` is a context manager whose thread finds the children of
this process while the block runs (/proc/self/task/*/children, else a scan of /proc/*/stat for our pid as
parent) and reads each one's smaps for the file (`amppatch.pages.file_share`) until it ends — often until the
file is mapped, seldom after — keeping the largest huge-page share seen; None when no child appeared (a fake
runner, a child that ended between two looks). What ab-test and profile record of it is
`amppatch.weightpages.WeightPages`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

from amppatch.hugepages import HugeShare

FAST = 0.01  # seconds between looks until the file shows up in a child's smaps: a tiny model loads in ms
SLOW = 0.25  # then: the weights stay mapped until exit, so only a late promotion to huge pages is left to see


def children(pid: int, proc: Path = Path("/proc")) -> set[int]:
    """Pids of the live children of `pid`."""
    found: set[int] = set()
    listed = False
    try:
        for task in (proc / str(pid) / "task").iterdir():
            try:
                found.update(int(p) for p in (task / "children").read_text().split())
                listed = True
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    if listed:
        return found
    for entry in proc.iterdir():  # kernels without CONFIG_PROC_CHILDREN
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        if len(fields) > 1 and fields[1] == str(pid):
            found.add(int(entry.name))
    return found


class ChildPages:
    """`with ChildPages(model) as watch: run(...)`; then `watch.result` is the HugeShare of `model`'s mapping
    in the child that mapped most of it on huge pages (None: no child was seen)."""

    def __init__(self, file: Path) -> None:
        self.file = Path(file).resolve()
        self.result: HugeShare | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="amppatch-child-pages", daemon=True)

    def __enter__(self) -> ChildPages:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _keep(self, share: HugeShare) -> None:
        best = self.result
        if best is None or (share.huge_bytes, share.range_bytes) > (best.huge_bytes, best.range_bytes):
            self.result = share

    def _follow(self, pid: int) -> None:
        """Read the child's smaps until it ends (or the block does): often until the file is mapped, then
        seldom, so a long run is not slowed by its own observer."""
        from amppatch.pages import file_share

        smaps = Path(f"/proc/{pid}/smaps")
        while not self._stop.is_set():
            try:
                share = file_share(smaps.read_text(), self.file)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                return
            self._keep(share)
            self._stop.wait(SLOW if share.range_bytes else FAST)

    def _watch(self) -> None:
        me = os.getpid()
        seen: set[int] = set()
        while not self._stop.is_set():
            for pid in sorted(children(me) - seen):
                seen.add(pid)
                self._follow(pid)
            self._stop.wait(FAST)
