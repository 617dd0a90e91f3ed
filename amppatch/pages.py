"""The huge-page lever: a source patch that puts llama.cpp's mmapped weights on file-backed transparent huge
pages, and the check of how many weight bytes really sit on huge pages once a model is loaded.

Plan → render → apply in reverse byte order → re-parse, like the prefetch sites: tree-sitter finds the
statement `addr = mmap(NULL, <size>, PROT_READ, <flags>, <fd>, 0)` of llama.cpp's POSIX `llama_mmap::impl`
and the start of that struct; two Jinja templates render the helpers (file scope, before the struct) and a
guarded branch in front of the statement, so the original call stays as the `else` and non-Linux builds
compile exactly the stock code. A second apply changes nothing (the marker is found)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from amppatch.errors import AmppatchError, SubprocessError, ToolMissingError, UsageError
from amppatch.hugepages import HugeShare, huge_bytes_in_ranges, parse_smaps, selected_mode
from amppatch.patch.levers import HUGEPAGES, LeverEdit, lever_marker
from amppatch.patch.render import Edit, FileChange, environment, new_marked_lines, splice
from amppatch.source.parse import error_nodes, parse_bytes, walk

if TYPE_CHECKING:
    from amppatch.build import Build

LEVER = HUGEPAGES
MARKER = lever_marker(LEVER)  # "amppatch: hugepages"
ENTRY = "amppatch_thp_wanted"  # the lever's first call in the patched mapping: the gate's proof that it ran
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
# The lever's own bar (it warns below it): at least half the model file's bytes on huge pages in B.
VERIFIED_SHARE = 0.5
STATUSES = ("verified", "small-pages", "thp-never", "not-measured")
_CANDIDATES = ("src/llama-mmap.cpp", "llama-mmap.cpp", "src/llama.cpp", "llama.cpp")


@dataclass(frozen=True)
class MmapSite:
    """Where the weights are mapped: the statement, its arguments, and the struct the helpers go before."""

    relpath: str
    statement_start: int  # byte offset of the line that holds `addr = mmap(...)`
    indent: str
    size: str
    flags: str
    fd: str
    helpers_at: int  # byte offset of the line that opens `struct llama_mmap::impl`


def _line_start(source: bytes, offset: int) -> int:
    return source.rfind(b"\n", 0, offset) + 1


def find_mmap_site(repo: Path) -> MmapSite:
    """The weight mapping of this llama.cpp tree, or a UsageError naming what was looked for."""
    for rel in _CANDIDATES:
        path = repo / rel
        if not path.is_file():
            continue
        source = path.read_bytes()
        if b"llama_mmap" not in source:
            continue
        parsed = parse_bytes(source, "cpp", path)
        calls = []
        helpers_at = None
        for node in walk(parsed.root):
            if node.type == "struct_specifier" and helpers_at is None:
                name = node.child_by_field_name("name")
                if name is not None and parsed.text(name) == "llama_mmap::impl":
                    helpers_at = _line_start(source, node.start_byte)
            if node.type != "expression_statement" or not node.named_children:
                continue
            expr = node.named_children[0]
            if expr.type != "assignment_expression":
                continue
            left, right = expr.child_by_field_name("left"), expr.child_by_field_name("right")
            if left is None or right is None or right.type != "call_expression":
                continue
            fn = right.child_by_field_name("function")
            args = right.child_by_field_name("arguments")
            if fn is None or args is None or parsed.text(fn) != "mmap" or parsed.text(left) != "addr":
                continue
            values = [parsed.text(a) for a in args.named_children]
            if len(values) == 6 and values[2] == "PROT_READ":
                calls.append((node, values))
        if helpers_at is None or not calls:
            continue
        if len(calls) > 1:
            raise UsageError(f"{rel} maps the weights in {len(calls)} places; the huge-page lever patches one",
                             next_step="patch this tree's mapping by hand, or use the pinned llama.cpp")
        node, values = calls[0]
        start = _line_start(source, node.start_byte)
        indent = source[start : node.start_byte].decode()
        return MmapSite(rel, start, indent if not indent.strip() else "        ", values[1], values[3], values[4],
                        helpers_at)
    raise UsageError("this llama.cpp tree has no `addr = mmap(..., PROT_READ, flags, fd, 0)` in llama_mmap::impl "
                     f"(looked in {', '.join(_CANDIDATES)})",
                     next_step="the huge-page lever needs llama.cpp's POSIX weight mapping; run without it")


def render_hugepages(site: MmapSite) -> tuple[str, str]:
    """The helpers (file scope) and the guarded branch in front of the mmap statement."""
    env = environment()
    helpers = env.get_template("hugepages_helpers.cpp.j2").render(marker=MARKER)
    branch = env.get_template("hugepages_map.cpp.j2").render(marker=MARKER, indent=site.indent, size=site.size,
                                                             flags=site.flags, fd=site.fd)
    return helpers.rstrip("\n") + "\n\n", branch.rstrip("\n") + "\n"


def hugepages_change(repo: Path) -> FileChange | None:
    """The lever's edit of the tree, or None when the tree already carries it."""
    lever = hugepages_lever(repo)
    return None if lever is None else lever.change


def hugepages_lever(repo: Path) -> LeverEdit | None:
    """The lever's edit of the tree as `apply` commits it (the change and where it went), or None when the
    tree already carries it."""
    site = find_mmap_site(repo)
    source = (repo / site.relpath).read_bytes()
    if MARKER.encode() in source:
        return None
    change = _edit(site, source)
    where = {"file": site.relpath, "line": source[: site.statement_start].count(b"\n") + 1, "size": site.size,
             "flags": site.flags, "fd": site.fd, "indent": site.indent,
             "struct_line": source[: site.helpers_at].count(b"\n") + 1}
    return LeverEdit(LEVER, change, where)


def _edit(site: MmapSite, source: bytes) -> FileChange:
    helpers, branch = render_hugepages(site)
    after = splice(source, [Edit(site.helpers_at, helpers), Edit(site.statement_start, branch)])
    before_errors = len(error_nodes(parse_bytes(source, "cpp").root))
    after_errors = len(error_nodes(parse_bytes(after, "cpp").root))
    if after_errors > before_errors:
        raise AmppatchError(f"the edited {site.relpath} parses with {after_errors - before_errors} new ERROR "
                            "node(s); nothing was written",
                            next_step="report this tree's llama_mmap layout; run without the huge-page lever")
    return FileChange(site.relpath, source, after, new_marked_lines(source, after))


# ----------------------------------------------------------------------------------------------------------
# Verification: how much of the weights really sits on huge pages


def file_share(smaps_text: str, file: Path) -> HugeShare:
    """Huge-page bytes of the mappings of `file` in a smaps text (pure)."""
    want = str(file)
    ranges = [(m.start, m.end) for m in parse_smaps(smaps_text) if m.path == want]
    return huge_bytes_in_ranges(smaps_text, ranges)


def watch_share(pid: int, file: Path, *, interval: float = 0.05,
                alive: Callable[[], bool] | None = None) -> HugeShare:
    """Poll /proc/PID/smaps until the process ends; returns the largest huge-page share seen (the weights are
    mapped once and stay mapped until exit, so the peak is the loaded state)."""
    best = HugeShare(0, 0, 0, 0, 0, True)
    smaps = Path(f"/proc/{pid}/smaps")
    while True:
        try:
            text = smaps.read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return best
        current = file_share(text, file.resolve())
        if (current.huge_bytes, current.range_bytes) > (best.huge_bytes, best.range_bytes):
            best = current
        if alive is not None and not alive():
            return best
        time.sleep(interval)


def measure_share(build: Build, model: Path, *, threads: int = 1, tokens: int = 16,
                  bench_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                  timeout: float = 900.0) -> tuple[HugeShare, list[str]]:
    """Run `llama-bench` of `build` on `model` and watch its smaps: how many bytes of the model file's mapping
    sit on huge pages once loaded, and the lever's own log lines (`amppatch: huge pages: ...`)."""
    import subprocess
    import tempfile

    from amppatch.build import run_env, runtime_args
    from amppatch.proc import describe_returncode

    argv = [str(build.binary("llama-bench")), "-m", str(model), "-p", "0", "-n", str(tokens), "-r", "1",
            "-t", str(threads), *runtime_args(build, bench_args), *bench_args]
    child_env = {**run_env(build), **(env or {})}
    with tempfile.TemporaryFile(mode="w+") as err:
        try:
            child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                     env=child_env, text=True)
        except FileNotFoundError as exc:
            raise ToolMissingError(f"cannot run `{argv[0]}`: not found",
                                   next_step="rebuild with `amppatch build`") from exc
        deadline = time.monotonic() + timeout
        share = watch_share(child.pid, model,
                            alive=lambda: child.poll() is None and time.monotonic() < deadline)
        if child.poll() is None:
            child.kill()
        code = child.wait()
        err.seek(0)
        log = err.read()
    if code != 0:
        raise SubprocessError(f"llama-bench failed while its huge pages were measured: {describe_returncode(code)}",
                              returncode=code, output_tail="\n".join(log.splitlines()[-15:]))
    return share, [ln.strip() for ln in log.splitlines() if "amppatch: huge pages" in ln]


# ----------------------------------------------------------------------------------------------------------
# apply's record of the lever: the manifest's `hugepages` section


def thp_enabled_mode(environ: Mapping[str, str] | None = None) -> str:
    """The THP mode the patched code sees: the file `AMPPATCH_THP_ENABLED_PATH` names (a test's stand-in, read
    the same way the lever reads it), else sysfs; "unavailable" when that file cannot be read."""
    environ = os.environ if environ is None else environ
    path = environ.get("AMPPATCH_THP_ENABLED_PATH") or THP_ENABLED
    try:
        return selected_mode(Path(path).read_text())
    except OSError:
        return "unavailable"


def _small_pages_reason(mode: str, b: HugeShare, switched_off: bool) -> str:
    if switched_off:
        return "AMPPATCH_HUGEPAGES=0 was set, so the lever ran the stock mapping"
    if mode == "unavailable":
        return "this kernel offers no transparent huge pages, so the lever ran the stock mapping"
    if b.range_bytes == 0:
        return "B was never seen with the model file mapped (weights read without mmap?)"
    if b.range_bytes < 2 << 20:
        return f"the model file ({b.range_bytes} B) is smaller than one 2 MiB huge page"
    return ("the kernel kept the file on small pages (its filesystem may not cache it in huge folios, or no free "
            "2 MiB blocks were at hand)")


def share_record(mode: str, a: HugeShare | None, b: HugeShare | None, log_b: Sequence[str] = (), *,
                 switched_off: bool = False, not_measured: str = "") -> dict:
    """The manifest's `hugepages` section from the measured shares and the lever's own log lines in B (pure).
    Fail safe: THP `never` and pages that come out small are statuses with their reason in `note`, not
    errors — the correctness gate alone decides whether B is right."""
    record: dict = {"thp_enabled": mode, "status": "not-measured",
                    "share_a": None if a is None else round(a.share, 4),
                    "share_b": None if b is None else round(b.share, 4),
                    "huge_bytes_b": None if b is None else b.huge_bytes,
                    "weight_bytes": None if b is None else b.range_bytes, "note": not_measured or "not measured"}
    shares = "" if a is None or b is None else (
        f" (model file on huge pages: A {a.share:.0%}, B {b.share:.0%}, {b.huge_bytes >> 20} of "
        f"{b.range_bytes >> 20} MiB)")
    said = "; ".join(dict.fromkeys(line.split("amppatch: huge pages: ", 1)[-1] for line in log_b))
    said = f"; the lever reported: {said}" if said else ""
    if mode == "never":
        record.update(status="thp-never", note="THP is 'never' here: the lever runs the stock mapping and the "
                                               f"weights stay on 4 KiB pages, as in stock{shares}{said}")
    elif b is None:
        pass
    elif b.share >= VERIFIED_SHARE:
        record.update(status="verified", note=f"the lever put the weights on huge pages{shares}{said}")
    else:
        record.update(status="small-pages", note=_small_pages_reason(mode, b, switched_off) + shares + said)
    return record


def _drop_cached(model: Path) -> None:
    """Evict the file's clean cached pages, so build A starts from what stock meets on a cold start."""
    try:
        fd = os.open(model, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # a filesystem without it: A then starts from whatever is cached
    finally:
        os.close(fd)


def _while_loaded(measure: Callable[..., tuple[HugeShare, list[str]]], build: Build,
                  model: Path) -> tuple[HugeShare, list[str]]:
    """One measured run that lasted long enough for its smaps to be read with the model mapped: a tiny
    model's run can end between two polls, so a run that was never seen mapped is redone with more tokens.
    (`-v`: llama-bench passes llama.cpp's log, the lever's lines among it, only when verbose.)"""
    for tokens in _TOKENS:
        share, log = measure(build, model, tokens=tokens, bench_args=("-v",))
        if share.range_bytes:
            break
    return share, log


_TOKENS = (256, 1024, 4096)


def verify_hugepages(build_a: Build, build_b: Build, model: Path, *,
                     measure: Callable[..., tuple[HugeShare, list[str]]] = measure_share,
                     environ: Mapping[str, str] | None = None) -> dict:
    """apply's measurement of the lever on `model`: the share of the model file on huge pages once loaded, in
    A (stock, from a cold page cache) and then in B (the lever, meeting the file as A left it cached), as
    `share_record`. `measure` runs one build (a fake replaces it in tests)."""
    from amppatch.proc import progress

    environ = os.environ if environ is None else environ
    mode = thp_enabled_mode(environ)
    _drop_cached(model)
    progress(f"apply: measuring the huge-page share of {model.name} in A and B (THP {mode}) ...")
    share_a, _ = _while_loaded(measure, build_a, model)
    share_b, log_b = _while_loaded(measure, build_b, model)
    record = share_record(mode, share_a, share_b, log_b, switched_off=environ.get("AMPPATCH_HUGEPAGES") == "0")
    progress(f"apply: huge pages: {record['status']}: {record['note']}")
    return record
