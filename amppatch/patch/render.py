"""Rendering and editing: the Jinja templates turn a planned site into the lines inserted at the top of
its loop body, edits splice them into the file's bytes, and each changed file becomes a `FileChange`."""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jinja2

from amppatch import __version__
from amppatch.errors import AmppatchError, UsageError
from amppatch.patch.plan import Plan, PlannedSite
from amppatch.source.loops import MARKER_WORD, UNROLL_INDEX
from amppatch.source.parse import error_nodes, parse_bytes

TUNABLES_HEADER = "ggml/src/ggml-cpu/amppatch-tunables.h"


def comment_safe(text: str) -> str:
    """`text` fit to sit inside a C comment: a site key may hold `*/` (a stream `a*/b`) or a newline."""
    return text.replace("*/", "* /").replace("\n", " ")


def environment() -> jinja2.Environment:
    """The Jinja environment of amppatch's templates: StrictUndefined, so a missing variable fails the
    render instead of silently emitting empty C."""
    root = resources.files("amppatch") / "templates"

    def load(name: str) -> str:
        return (root / name).read_text()

    return jinja2.Environment(loader=jinja2.FunctionLoader(load), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False,
                              autoescape=False)


def marker(site: PlannedSite) -> str:
    """The comment text that tags every line inserted for `site` (and makes a second apply a no-op)."""
    return f"{MARKER_WORD} {comment_safe(site.key)}"


def render_site(site: PlannedSite, *, tunable: bool, line_size: int, env: jinja2.Environment | None = None) -> str:
    """The lines inserted at the top of the site's loop body (no trailing newline)."""
    env = env or environment()
    indent = site.stream.insert_indent or site.loop.body_indent
    common = {"indent": indent, "marker": marker(site), "address": site.stream.address,
              "distance": site.request.distance_bytes, "hint": site.request.hint, "guard": site.guard}
    stride = site.stream.row_stride  # bytes per iteration of a strided row stream (set on row streams only)
    if site.stream.tile_step is not None:  # a lambda's tile: its own template, constant or tunable
        text = env.get_template("prefetch_tiles.c.j2").render(
            **common, tile_step=site.stream.tile_step, unroll=site.stream.unroll, unroll_index=UNROLL_INDEX,
            line_size=line_size, tunable=tunable, slug=site.slug, env_distance=site.env_distance,
            env_hint=site.env_hint)
    elif tunable:
        text = env.get_template("prefetch_tunable.c.j2").render(
            **common, slug=site.slug, env_distance=site.env_distance, env_hint=site.env_hint, stride=stride)
    elif stride:
        text = env.get_template("prefetch_rows.c.j2").render(**common, lines=site.lines, line_size=line_size,
                                                             stride=stride)
    elif site.lines > 1:
        text = env.get_template("prefetch_lines.c.j2").render(**common, lines=site.lines, line_size=line_size)
    else:
        text = env.get_template("prefetch_single.c.j2").render(**common)
    return text.rstrip("\n")


def render_tunables_header(sites: list[PlannedSite], line_size: int, env: jinja2.Environment | None = None) -> str:
    env = env or environment()
    items = [{"key": comment_safe(s.key), "slug": s.slug, "env_distance": s.env_distance, "env_hint": s.env_hint,
              "distance": s.request.distance_bytes, "hint": s.request.hint, "lines": s.lines,
              "stride": s.stream.row_stride, "tile": s.stream.tile_step is not None} for s in sites]
    return env.get_template("tunables.h.j2").render(sites=items, line_size=line_size,
                                                    tool_version=__version__).rstrip("\n") + "\n"


@dataclass(frozen=True)
class Edit:
    offset: int
    text: str
    delete: int = 0  # bytes replaced at offset (whitespace only: a line break is inserted instead)


def splice(source: bytes, edits: list[Edit]) -> bytes:
    """Apply insertions in reverse byte order, so earlier offsets stay valid."""
    out = bytearray(source)
    for e in sorted(edits, key=lambda e: e.offset, reverse=True):
        out[e.offset : e.offset + e.delete] = e.text.encode()
    return bytes(out)


def site_edits(site: PlannedSite, source: bytes, rendered: str) -> list[Edit]:
    """Insert `rendered` as the first lines of the loop body (wrapping a brace-less body in braces), or
    for a row pointer right after its declaration."""
    loop = site.loop

    def after(offset: int, indent: str) -> Edit:
        # Code on the same line after the insertion point (`{ s += x[i];`) must not end up behind the
        # inserted `#endif`, where the preprocessor would drop it: it moves to a line of its own.
        end = source.find(b"\n", offset)
        rest = source[offset : end if end >= 0 else len(source)]
        if not rest.strip():
            return Edit(offset, "\n" + rendered)
        return Edit(offset, "\n" + rendered + "\n" + indent, delete=len(rest) - len(rest.lstrip()))

    if site.stream.insert_byte is not None:  # a row pointer: right after its declaration
        return [after(site.stream.insert_byte, site.stream.insert_indent or loop.body_indent)]
    if loop.body_compound:
        return [after(loop.body_start_byte + 1, loop.body_indent)]
    line_start = source.rfind(b"\n", 0, loop.body_start_byte) + 1
    indent = source[line_start : loop.body_start_byte].decode()
    indent = indent if indent.strip() == "" else loop.body_indent
    return [Edit(loop.body_start_byte, "{ /* " + marker(site) + " */\n" + rendered + "\n" + indent),
            Edit(loop.body_end_byte, " } /* " + marker(site) + " */")]


def already_applied(site: PlannedSite, source: bytes) -> bool:
    body = source[site.loop.start_byte : site.loop.end_byte]
    return f"/* {marker(site)} ".encode() in body or f"/* {marker(site)} */".encode() in body


def include_edit(parsed_source: bytes, grammar: str, relpath: str, marker_text: str,
                 env: jinja2.Environment, before: int | None = None) -> Edit | None:
    """`#include` of the tunables header after the file's last top-level include that comes before
    `before` (the first site's edit: a file may include more headers further down, after a template that
    already calls the helpers), or at the top; None if already included."""
    header_rel = os.path.relpath(TUNABLES_HEADER, os.path.dirname(relpath))
    if f'#include "{header_rel}"'.encode() in parsed_source:
        return None
    parsed = parse_bytes(parsed_source, grammar)
    includes = [c for c in parsed.root.children if c.type == "preproc_include"
                and (before is None or c.end_byte <= before)]
    text = env.get_template("tunable_include.c.j2").render(header=header_rel, marker=marker_text).rstrip("\n")
    if includes:
        end = includes[-1].end_byte
        # preproc_include ends after its newline; insert at the start of the next line
        if parsed_source[end - 1 : end] != b"\n":
            nl = parsed_source.find(b"\n", end)
            end = len(parsed_source) if nl < 0 else nl + 1
        return Edit(end, text + "\n")
    return Edit(0, text + "\n")


@dataclass
class FileChange:
    relpath: str
    before: bytes
    after: bytes
    inserted_lines: list[int]  # 1-based lines of `after` that amppatch inserted


def build_changes(plan: Plan, repo: Path, *, tunable: bool,
                  line_size: int) -> tuple[list[FileChange], list[PlannedSite]]:
    """Render every site and edit its file; returns the changed files and the sites that changed them."""
    env = environment()
    by_file: dict[str, list[PlannedSite]] = {}
    for site in plan.sites:
        by_file.setdefault(site.file, []).append(site)
    changes: list[FileChange] = []
    applied: list[PlannedSite] = []
    for rel, sites in by_file.items():
        fa = next(plan.analyses[s.function] for s in sites)
        source = (repo / rel).read_bytes()
        if hashlib.sha256(source).hexdigest() != fa.source_sha:
            raise UsageError(f"{rel} changed while amppatch was planning", next_step="run apply again")
        edits: list[Edit] = []
        for site in sites:
            if already_applied(site, source):
                plan.warnings.append(f"{site.key}: already carries its amppatch prefetch; unchanged")
                continue
            edits.extend(site_edits(site, source, render_site(site, tunable=tunable, line_size=line_size, env=env)))
            applied.append(site)
        if not edits:
            continue
        if tunable:
            inc = include_edit(source, fa.grammar, rel, f"{MARKER_WORD} tunables header", env,
                               before=min(e.offset for e in edits))
            if inc is not None:
                edits.append(inc)
        after = splice(source, edits)
        before_errors = len(error_nodes(parse_bytes(source, fa.grammar).root))
        after_errors = len(error_nodes(parse_bytes(after, fa.grammar).root))
        if after_errors > before_errors:
            raise AmppatchError(
                f"the edited {rel} parses with {after_errors - before_errors} new ERROR node(s); nothing was written",
                next_step="report this site (the loop's shape confuses the inserter) and patch another loop",
            )
        changes.append(FileChange(rel, source, after, new_marked_lines(source, after)))
    if tunable and applied:
        header_text = render_tunables_header(sorted(applied, key=lambda s: s.key), line_size, env)
        header_path = repo / TUNABLES_HEADER
        before = header_path.read_bytes() if header_path.is_file() else b""
        if before != header_text.encode():
            changes.append(FileChange(TUNABLES_HEADER, before, header_text.encode(),
                                      list(range(1, header_text.count("\n") + 1))))
    return changes, applied


def new_marked_lines(before: bytes, after: bytes) -> list[int]:
    """1-based lines of `after` that are not in `before` (inserted or rewritten by an edit)."""
    matcher = difflib.SequenceMatcher(a=before.decode(errors="replace").splitlines(),
                                      b=after.decode(errors="replace").splitlines(), autojunk=False)
    lines: list[int] = []
    for tag, _i1, _i2, j1, j2 in matcher.get_opcodes():
        if tag in ("insert", "replace"):
            lines.extend(range(j1 + 1, j2 + 1))
    return lines


def unified_diff(changes: list[FileChange]) -> str:
    """The changes as one unified diff (what apply --dry-run prints)."""
    out: list[str] = []
    for ch in changes:
        out.extend(difflib.unified_diff(
            ch.before.decode(errors="replace").splitlines(keepends=True),
            ch.after.decode(errors="replace").splitlines(keepends=True),
            fromfile=f"a/{ch.relpath}" if ch.before else "/dev/null", tofile=f"b/{ch.relpath}"))
    return "".join(out)


