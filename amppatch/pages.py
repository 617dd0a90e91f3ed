"""The huge-page lever: a source patch that puts llama.cpp's mmapped weights on file-backed transparent huge
pages, and the check of how many weight bytes really sit on huge pages once a model is loaded.

Plan → render → apply in reverse byte order → re-parse, like the prefetch sites: tree-sitter finds the
statement `addr = mmap(NULL, <size>, PROT_READ, <flags>, <fd>, 0)` of llama.cpp's POSIX `llama_mmap::impl`
and the start of that struct; two Jinja templates render the helpers (file scope, before the struct) and a
guarded branch in front of the statement, so the original call stays as the `else` and non-Linux builds
compile exactly the stock code. A second apply changes nothing (the marker is found)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from amppatch.errors import AmppatchError, SubprocessError, ToolMissingError, UsageError
from amppatch.hugepages import HugeShare, huge_bytes_in_ranges, parse_smaps
from amppatch.patch.render import Edit, FileChange, environment, new_marked_lines, splice
from amppatch.source.parse import error_nodes, parse_bytes, walk

if TYPE_CHECKING:
    from amppatch.build import Build

LEVER = "hugepages"
MARKER = "amppatch: hugepages"
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
    site = find_mmap_site(repo)
    source = (repo / site.relpath).read_bytes()
    if MARKER.encode() in source:
        return None
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
