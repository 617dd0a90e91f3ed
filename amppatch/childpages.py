"""Watch the huge pages of a file in the child processes this process starts, without changing how they start.

ab-test's warmup and profile's traced run start their child through `amppatch.proc` (or a test's stand-in),
which does not hand out the child's pid. `ChildPages` is a context manager whose thread finds the children of
this process that the block starts (/proc/self/task/*/children, else a scan of /proc/*/stat for our pid as
parent) and reads every live one's smaps for the file (`amppatch.pages.file_share`) on each look — often until
the file is mapped, seldom after — keeping the largest huge-page share seen; None when no child appeared (a
fake runner, a child that ended between two looks). Children that were already there when the block began
(an unreaped zombie of an earlier command, a long-lived helper) are never read: a zombie's smaps is empty and
would otherwise pass for a child that never mapped the file. What ab-test and profile record of it is
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
        self._before: set[int] = set()
        self._thread = threading.Thread(target=self._watch, name="amppatch-child-pages", daemon=True)

    def __enter__(self) -> ChildPages:
        self._before = children(os.getpid())
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

    def _look(self, pid: int) -> HugeShare | None:
        """The file's share in `pid`'s smaps now; None once the child has ended."""
        from amppatch.pages import file_share

        try:
            return file_share(Path(f"/proc/{pid}/smaps").read_text(), self.file)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None

    def _watch(self) -> None:
        """Every live child started inside the block is read on each look, so a short-lived child seen first
        (a helper, a child between fork and exec that ends) never hides the one that maps the file. Looks are
        often while no child has the file mapped yet, then seldom, so a long run is not slowed by its own
        observer."""
        me = os.getpid()
        ended: set[int] = set()
        while not self._stop.is_set():
            mapped = False
            for pid in sorted(children(me) - self._before - ended):
                share = self._look(pid)
                if share is None:
                    ended.add(pid)
                    continue
                self._keep(share)
                mapped = mapped or share.range_bytes > 0
            self._stop.wait(SLOW if mapped else FAST)
