"""amppatch apply: plan → render → edit → verify → commit/export → build A and B → correctness gate.

* **Sites** are keyed by function + loop (0-based ordinal in source order, or ``L<line>``) + stream (the
  address expression, e.g. ``x[ib]``, or its base pointer). ``--site FUNCTION[:LOOP[:STREAM]]`` defaults
  the loop to the function's first live outermost streaming loop and the stream to the one coming from the
  earliest pointer parameter (the weight row of a ggml vec_dot). ``--profile profile.json`` takes the
  profile's ``sites`` (``function``, ``loop``, ``stream``, ``distance_bytes``, ``hint``, ``inputs``).
* **Defaults** for manual sites: 2048 bytes ahead, locality 3 (``DEFAULT_DISTANCE``, ``DEFAULT_HINT``). The
  Q8_0 weight stream gains most from a prefetch several KiB ahead with locality 3 at 1 thread
  (docs/RESULTS.md, "tune"); 2 KiB is ~60 Q8_0 blocks, several memory latencies of consumption at
  one thread's streaming rate, and still well inside the L1/L2 reach of the hardware prefetchers' pages.
* **Rendering** uses the Jinja templates in ``amppatch/templates`` with StrictUndefined; each inserted line
  carries ``/* amppatch: <site key> ... */``. Edits are spliced in reverse byte order; the file is
  re-parsed and must not have more ERROR nodes than before. A loop that already carries this site's marker
  is left alone, so a second apply changes nothing.
* **Git**: a dirty tree is refused; the patch is committed on ``amppatch/<id>`` without touching the
  user's branch, index or working files (blobs, a temporary index and ``commit-tree``); ``<id>`` hashes the
  base commit, the resolved sites and parameters and the tool version, so the same request finds its
  branch. The commit is deterministic (fixed identity, the base's date), so a branch is reused only when
  its tip is the very commit the request makes; a reset, amended or extended branch is refused.
  ``<id>.patch`` (format-patch) and ``<id>.json`` (the manifest) go to the output directory, after
  ``check_export`` found them consistent (commit, base, files, added lines, each site's parameters).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import jinja2

from amppatch import __version__
from amppatch.build import BuildOptions
from amppatch.errors import AmppatchError, BuildError, SubprocessError, UsageError
from amppatch.inputs import LEARNED, PROFILE, read_json
from amppatch.machine import cpu_model
from amppatch.paths import cache_dir, write_text_atomic
from amppatch.proc import progress
from amppatch.source import (
    FunctionAnalysis,
    Loop,
    Stream,
    analyze_function,
    closing_angle,
    default_stream,
    find_function_files,
    normalize_expression,
    split_member,
    split_specialization,
)
from amppatch.source.loops import MARKER_WORD, UNROLL_INDEX
from amppatch.source.parse import error_nodes, parse_bytes

SCHEMA_VERSION = 1
DEFAULT_DISTANCE = 2048
DEFAULT_HINT = 3
MAX_DISTANCE = 1 << 20
TUNABLES_HEADER = "ggml/src/ggml-cpu/amppatch-tunables.h"
BRANCH_PREFIX = "amppatch/"
_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "amppatch",
    "GIT_AUTHOR_EMAIL": "amppatch@localhost",
    "GIT_COMMITTER_NAME": "amppatch",
    "GIT_COMMITTER_EMAIL": "amppatch@localhost",
}


# ----------------------------------------------------------------------------------------------------------
# Requests and options


@dataclass(frozen=True)
class SiteRequest:
    """What the user (or the profile) asked for; loop/stream None = default."""

    function: str
    loop: int | str | None = None  # ordinal, or "L<line>"
    stream: str | None = None  # expression, base name, or "*" for every stream of the loop
    distance_bytes: int = DEFAULT_DISTANCE
    hint: int = DEFAULT_HINT
    origin: str = "manual"  # manual | profile | learned
    inputs: dict = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        loop = "default loop" if self.loop is None else f"loop {self.loop}"
        stream = "default stream" if self.stream is None else f"stream {self.stream}"
        return f"{self.function} ({loop}, {stream})"


@dataclass(frozen=True)
class ApplyOptions:
    repo: Path
    sites: tuple[str, ...] = ()
    profile: Path | None = None
    # learned.json files from `amppatch tune`: their winners, baked in as constants
    learned: tuple[Path, ...] = ()
    distance: int | None = None  # overrides every site's distance (manual default DEFAULT_DISTANCE)
    hint: int | None = None
    tunable: bool = False
    dry_run: bool = False
    build: bool = True
    # Options both arms are built with (ref and name are set per arm); None = the build layer's defaults.
    build_options: BuildOptions | None = None
    like: Path | None = None  # the build whose options build_options copies (its compile db serves --no-build)
    out: Path | None = None
    compile_db: Path | None = None
    gate: bool = True
    gate_model: Path | None = None
    gate_args: tuple[str, ...] = ()
    line_size: int | None = None  # cache line size; None = this machine's (sysfs), else 64

    def __post_init__(self) -> None:
        if isinstance(self.learned, (str, Path)):  # one file given the pre-tuple way
            object.__setattr__(self, "learned", (Path(self.learned),))


def parse_loop_key(text: str | int | None) -> int | str | None:
    """An ordinal ("3", 3), a source line ("L1330", "@1330", "line:1330"), or None/"" for the default."""
    if text is None or isinstance(text, int):
        return text
    t = str(text).strip()
    if t in ("", "*", "default"):
        return None
    if t.isdigit():
        return int(t)
    m = re.fullmatch(r"(?:L|@|line:?)(\d+)", t, re.IGNORECASE)
    if m:
        return f"L{int(m.group(1))}"
    raise UsageError(f"loop {text!r} is neither an ordinal nor a line",
                     next_step="use an ordinal (0, 1, ...) or L<line>, e.g. L1330")


def _check_params(distance: int, hint: int, where: str) -> None:
    if not isinstance(distance, int) or not 0 < distance <= MAX_DISTANCE:
        raise UsageError(f"{where}: distance {distance!r} is not a byte count in 1..{MAX_DISTANCE}",
                         next_step="pass --distance BYTES, e.g. 2048")
    if hint not in (0, 1, 2, 3):
        raise UsageError(f"{where}: hint {hint!r} is not a locality 0-3",
                         next_step="pass --hint 0..3 (3 = keep in all cache levels)")


def parse_site_spec(spec: str, distance: int | None, hint: int | None) -> SiteRequest:
    """FUNCTION[:LOOP[:STREAM]] (the stream may contain ':' only in C++ scopes, so it takes the rest);
    FUNCTION may be one specialization of a template, NAME<ARG, ...>."""
    # A template specialization (gemv<block_q4_0x8>) may hold '::' in its arguments: split after the '>'.
    head = ""
    if "<" in spec.split(":", 1)[0]:
        close = closing_angle(spec, spec.index("<"))
        head, spec = spec[: close + 1], spec[close + 1 :]
    # a method: CLASS<ARGS>::METHOD or CLASS::METHOD (the '::' is not a field separator)
    member = re.match(r"::[A-Za-z_]\w*" if head else r"[A-Za-z_]\w*::[A-Za-z_]\w*", spec)
    if member and (head or not spec[member.end():].startswith("::")):
        head, spec = head + member.group(0), spec[member.end():]
    parts = spec.split(":", 2)
    function = (head + parts[0]).strip()
    if not re.fullmatch(r"[A-Za-z_]\w*(<[^<>]*(<[^<>]*>[^<>]*)*>)?(::[A-Za-z_]\w*)?", function):
        raise UsageError(f"--site {head + spec!r}: {function!r} is not a function name",
                         next_step="use --site FUNCTION[:LOOP[:STREAM]], e.g. ggml_vec_dot_q8_0_q8_0:0:x[ib], "
                                   "or TEMPLATE<ARGS>:LOOP:STREAM for one specialization")
    loop = parse_loop_key(parts[1]) if len(parts) > 1 else None
    stream = parts[2].strip() if len(parts) > 2 and parts[2].strip() else None
    d = DEFAULT_DISTANCE if distance is None else distance
    h = DEFAULT_HINT if hint is None else hint
    _check_params(d, h, f"--site {spec}")
    return SiteRequest(function, loop, stream, d, h, "manual")


def sites_from_profile(path: Path, distance: int | None, hint: int | None) -> tuple[list[SiteRequest], dict]:
    """The profile's `sites` as requests (--distance/--hint override theirs), and the profile itself."""
    profile = read_json(path, PROFILE)
    sites = profile.get("sites") if isinstance(profile, dict) else None
    if not isinstance(sites, list):
        raise UsageError(f"{path} has no `sites` list", next_step="pass a profile.json written by `amppatch profile`")
    if not sites:
        raise UsageError(f"{path} lists no sites (no hot streaming loop was found)",
                         next_step="profile a workload whose kernels stream memory, or pass --site")
    out = []
    for i, s in enumerate(sites):
        if not isinstance(s, dict) or "function" not in s:
            raise UsageError(f"{path}: site {i} has no `function`", next_step="regenerate the profile")
        d = distance if distance is not None else s.get("distance_bytes", DEFAULT_DISTANCE)
        h = hint if hint is not None else s.get("hint", DEFAULT_HINT)
        _check_params(d, h, f"{path} site {i}")
        out.append(SiteRequest(str(s["function"]), parse_loop_key(s.get("loop")), s.get("stream") or None,
                               int(d), int(h), "profile", dict(s.get("inputs") or {})))
    return out, profile


def sites_from_learned(paths: Sequence[Path]) -> tuple[list[SiteRequest], list[dict]]:
    """The winners of one or more learned.json files (what `amppatch tune` kept), with their tuned distance
    and hint. Several files combine tune runs of different kernels into one build; a site two files both
    tuned must agree, else there is no telling which result to bake."""
    out: list[SiteRequest] = []
    sources: list[dict] = []
    seen: dict[tuple, tuple[Path, int, int]] = {}
    for path in paths:
        learned = read_json(path, LEARNED)
        winners = learned.get("winners") if isinstance(learned, dict) else None
        if not isinstance(winners, list):
            raise UsageError(f"{path} has no `winners` list",
                             next_step="pass a learned.json written by `amppatch tune`")
        if not winners:
            dropped = "; ".join(f"{d.get('key')}: {d.get('reason')}" for d in learned.get("dropped", []))
            raise UsageError(f"{path} keeps no site: tune found no prefetch that beats 'off' beyond the noise"
                             + (f" ({dropped})" if dropped else ""),
                             next_step="keep the stock build, or tune longer (a larger --budget) or other sites"
                             + (" (or leave this file out)" if len(paths) > 1 else ""))
        for i, w in enumerate(winners):
            if not isinstance(w, dict) or "function" not in w:
                raise UsageError(f"{path}: winner {i} has no `function`", next_step="rerun `amppatch tune`")
            d, h = w.get("distance_bytes"), w.get("hint")
            _check_params(d, h, f"{path} winner {i}")
            loop = parse_loop_key(w.get("loop"))
            identity = (str(w["function"]), loop, w.get("stream") or None)
            if identity in seen:
                other, od, oh = seen[identity]
                if (od, oh) != (int(d), int(h)):
                    raise UsageError(f"{identity[0]} (loop {loop}, stream {identity[2]}) was tuned in both {other} "
                                     f"({od} B, hint {oh}) and {path} ({d} B, hint {h})",
                                     next_step="pass only the learned.json whose result you want baked")
                continue
            seen[identity] = (path, int(d), int(h))
            inputs = {"learned": str(path), "ratio": w.get("ratio"), "ci95": w.get("ci95"),
                      "ratio_by_threads": w.get("ratio_by_threads")}
            out.append(SiteRequest(identity[0], loop, identity[2], int(d), int(h), "learned", inputs))
        sources.append(learned)
    return out, sources


def cache_line_size() -> int:
    """L1D line size from sysfs (64 on every x86 and most ARM parts when sysfs is silent)."""
    try:
        value = int(Path("/sys/devices/system/cpu/cpu0/cache/index0/coherency_line_size").read_text())
        if value > 0 and value & (value - 1) == 0:
            return value
    except (OSError, ValueError):
        pass
    return 64


# ----------------------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class PlannedSite:
    request: SiteRequest
    function: str
    loop: Loop
    stream: Stream
    file: str  # relpath
    key: str  # "ggml_vec_dot_q8_0_q8_0#0 x[ib]"
    slug: str
    lines: int  # prefetches per iteration (cache lines the stream consumes per iteration)
    existing_prefetches: tuple[str, ...]
    guard: str | None = None  # C++ condition confining the prefetch to one template specialization

    @property
    def env_distance(self) -> str:
        return f"AMPPATCH_{self.slug.upper()}_DISTANCE"

    @property
    def env_hint(self) -> str:
        return f"AMPPATCH_{self.slug.upper()}_HINT"

    def to_dict(self, *, tunable: bool = False) -> dict:
        s = self.stream
        data = {
            "key": self.key, "function": self.function, "requested": self.request.function, "file": self.file,
            "loop": self.loop.ordinal,
            "loop_line": self.loop.start_line, "loop_end_line": self.loop.end_line, "guard": self.loop.guard,
            "live": self.loop.live, "induction": self.loop.induction, "step": self.loop.step,
            "stream": s.expression, "stream_kind": s.kind, "address": s.address,
            "tile_step": s.tile_step, "unroll": s.unroll,
            "element_type": s.element_type, "element_size": s.element_size,
            "bytes_per_iteration": s.bytes_per_iteration, "lines_per_iteration": self.lines,
            "distance_bytes": self.request.distance_bytes, "hint": self.request.hint,
            "origin": self.request.origin, "inputs": self.request.inputs,
            "existing_prefetches": list(self.existing_prefetches), "specialization_guard": self.guard,
        }
        if tunable:
            data["env"] = {"distance": self.env_distance, "hint": self.env_hint}
        return data


@dataclass(frozen=True)
class Skipped:
    request: SiteRequest
    reason: str

    def to_dict(self) -> dict:
        return {"site": self.request.describe(), "reason": self.reason}


@dataclass
class Plan:
    sites: list[PlannedSite]
    skipped: list[Skipped]
    analyses: dict[str, FunctionAnalysis]
    warnings: list[str]


def _slug(function: str, loop: int, base: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", f"{function}_l{loop}_{base}").strip("_").lower()


def _comment_safe(text: str) -> str:
    return text.replace("*/", "* /").replace("\n", " ")


def _select_loop(fa: FunctionAnalysis, key: int | str | None) -> Loop | None:
    if key is None:
        return fa.default_loop()
    if isinstance(key, int):
        return fa.loop(key)
    return fa.loop_at_line(int(key[1:]))


def plan_sites(requests: list[SiteRequest], analyses: dict[str, FunctionAnalysis], line_size: int) -> Plan:
    """Resolve each request to a live loop and stream of its analyzed function (pure)."""
    planned: list[PlannedSite] = []
    skipped: list[Skipped] = []
    warnings: list[str] = []
    seen: dict[str, SiteRequest] = {}
    for req in requests:
        fa = analyses[req.function]
        loop = _select_loop(fa, req.loop)
        if loop is None:
            where = "" if req.loop is None else f" at {req.loop}"
            skipped.append(Skipped(req, f"no live loop with a memory stream{where} in {fa.function} "
                                        f"({fa.relpath}:{fa.start_line}); loops: " + _loop_summary(fa)))
            continue
        if loop.live is False:
            skipped.append(Skipped(req, f"loop #{loop.ordinal} (line {loop.start_line}, {loop.guard}) is in a "
                                        "preprocessor branch this build does not compile (dead)"))
            continue
        if loop.parse_error:
            skipped.append(Skipped(req, f"loop #{loop.ordinal} (line {loop.start_line}): {loop.parse_error}; "
                                        "not patched because its edit could not be placed reliably"))
            continue
        if loop.live is None:
            warnings.append(f"{fa.function} loop #{loop.ordinal}: liveness unknown (no compile command)")
        if req.stream in (None, ""):
            chosen = [default_stream(loop)]
        elif req.stream.strip() in ("*", "all"):
            chosen = list(loop.streams)
        else:
            chosen = [loop.stream(req.stream)]
        if not chosen or chosen[0] is None:
            names = ", ".join(s.expression for s in loop.streams) or "none"
            why = next((u for u in loop.unplaceable if req.stream and
                        normalize_expression(u.split(": ", 1)[0]) == normalize_expression(req.stream)), None)
            inner = [lp.ordinal for lp in fa.loops if lp.parent == loop.ordinal and lp.streams]
            hint = f"; a nested loop may offer it (loops {', '.join(map(str, inner))})" if inner else ""
            skipped.append(Skipped(req, f"loop #{loop.ordinal} (line {loop.start_line}) has no stream "
                                        f"{req.stream or ''!s} (streams: {names})"
                                        + (f"; not placeable at the top of its body: {why}{hint}" if why else "")))
            continue
        for stream in chosen:
            assert stream is not None
            key = f"{fa.function}#{loop.ordinal} {stream.expression}"
            if key in seen:
                first = seen[key]
                if (first.distance_bytes, first.hint) != (req.distance_bytes, req.hint):
                    # Two spellings of one site (loop 0 / L1330, stream x / x[ib]) with different values:
                    # there is no telling which to bake.
                    raise UsageError(f"site {key} was requested twice with different values: "
                                     f"{first.distance_bytes} B hint {first.hint} ({first.describe()}) and "
                                     f"{req.distance_bytes} B hint {req.hint} ({req.describe()})",
                                     next_step="keep one of the two requests (or learned.json files)")
                warnings.append(f"site {key} requested twice; applied once")
                continue
            seen[key] = req
            lines = 1
            if stream.bytes_per_iteration is not None and stream.bytes_per_iteration > line_size:
                lines = math.ceil(stream.bytes_per_iteration / line_size)
            existing = tuple(f"line {p.line}: {p.text}" for p in loop.prefetches if not p.by_amppatch)
            if existing:
                warnings.append(f"{key}: the loop already prefetches ({'; '.join(existing)}); kept as is")
            planned.append(PlannedSite(req, fa.function, loop, stream, fa.relpath, key,
                                       _slug(fa.function, loop.ordinal, stream.base), lines, existing,
                                       fa.specialization_guard))
    return Plan(planned, skipped, analyses, warnings)


def _loop_summary(fa: FunctionAnalysis) -> str:
    parts = []
    for lp in fa.loops:
        state = {True: "live", False: "dead", None: "liveness unknown"}[lp.live]
        streams = ", ".join(s.expression for s in lp.streams) or "no streams"
        parts.append(f"#{lp.ordinal} line {lp.start_line} ({state}; {streams})")
    return "; ".join(parts) or "none"


# ----------------------------------------------------------------------------------------------------------
# Rendering and editing


def _environment() -> jinja2.Environment:
    root = resources.files("amppatch") / "templates"

    def load(name: str) -> str:
        return (root / name).read_text()

    return jinja2.Environment(loader=jinja2.FunctionLoader(load), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False,
                              autoescape=False)


def marker(site: PlannedSite) -> str:
    return f"{MARKER_WORD} {_comment_safe(site.key)}"


def render_site(site: PlannedSite, *, tunable: bool, line_size: int, env: jinja2.Environment | None = None) -> str:
    """The lines inserted at the top of the site's loop body (no trailing newline)."""
    env = env or _environment()
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
    env = env or _environment()
    items = [{"key": _comment_safe(s.key), "slug": s.slug, "env_distance": s.env_distance, "env_hint": s.env_hint,
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
    env = _environment()
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
        changes.append(FileChange(rel, source, after, _new_marked_lines(source, after)))
    if tunable and applied:
        header_text = render_tunables_header(sorted(applied, key=lambda s: s.key), line_size, env)
        header_path = repo / TUNABLES_HEADER
        before = header_path.read_bytes() if header_path.is_file() else b""
        if before != header_text.encode():
            changes.append(FileChange(TUNABLES_HEADER, before, header_text.encode(),
                                      list(range(1, header_text.count("\n") + 1))))
    return changes, applied


def _new_marked_lines(before: bytes, after: bytes) -> list[int]:
    matcher = difflib.SequenceMatcher(a=before.decode(errors="replace").splitlines(),
                                      b=after.decode(errors="replace").splitlines(), autojunk=False)
    lines = []
    for tag, _i1, _i2, j1, j2 in matcher.get_opcodes():
        if tag in ("insert", "replace"):
            lines.extend(range(j1 + 1, j2 + 1))
    return lines


def unified_diff(changes: list[FileChange]) -> str:
    out = []
    for ch in changes:
        out.extend(difflib.unified_diff(
            ch.before.decode(errors="replace").splitlines(keepends=True),
            ch.after.decode(errors="replace").splitlines(keepends=True),
            fromfile=f"a/{ch.relpath}" if ch.before else "/dev/null", tofile=f"b/{ch.relpath}"))
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------
# Identity, git, manifest


def templates_digest() -> str:
    """Hash of every template's text (names and contents)."""
    root = resources.files("amppatch") / "templates"
    h = hashlib.sha256()
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".j2"):
            h.update(entry.name.encode() + b"\0" + entry.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def request_id(base_commit: str, sites: list[PlannedSite], *, tunable: bool, line_size: int) -> str:
    """Hash of base commit + resolved sites + parameters + tool version: the branch name's suffix."""
    payload = {
        "base": base_commit,
        "tool_version": __version__,
        # The generated code changes with the templates even at one tool version: a reused branch must
        # hold what this version renders.
        "templates": templates_digest(),
        "tunable": tunable,
        "line_size": line_size,
        # everything the rendered text depends on, so a changed analysis (a guard, a stride, another
        # insertion point) never reuses a branch holding the old rendering
        "sites": sorted([s.key, s.file, s.stream.address, s.request.distance_bytes, s.request.hint, s.lines,
                         s.guard or "", s.stream.row_stride or "", s.stream.insert_byte or -1,
                         s.stream.tile_step or "", s.stream.unroll or "",
                         s.loop.body_start_byte,
                         # what the commit message says besides: with these the id determines the whole
                         # commit, so a reused branch can be checked against the commit it must hold
                         s.request.origin, s.stream.kind, s.stream.bytes_per_iteration or ""] for s in sites),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def commit_message(rid: str, base: str, sites: list[PlannedSite], *, tunable: bool) -> str:
    lines = [f"amppatch: software prefetch at {len(sites)} site(s) [{rid}]", ""]
    for s in sites:
        mode = f"tunable via {s.env_distance}/{s.env_hint}, defaults" if tunable else "constant"
        lines.append(f"- {s.key} ({s.file}:{s.loop.start_line}, {s.stream.kind} stream, "
                     f"{s.stream.bytes_per_iteration if s.stream.bytes_per_iteration is not None else '?'} B/iter, "
                     f"{s.lines} line(s)/iter): {mode} distance={s.request.distance_bytes} B hint={s.request.hint} "
                     f"[{s.request.origin}]")
    lines += ["", f"Base: {base}", f"Generated by amppatch {__version__}; id {rid}."]
    return "\n".join(lines) + "\n"


@dataclass
class PatchFile:
    """One file of a format-patch: its path and the lines it adds, by line number in the patched file."""

    path: str
    added: dict[int, str] = field(default_factory=dict)
    removed: int = 0


@dataclass
class ParsedPatch:
    commit: str | None  # the "From <sha>" line
    subject: str
    message: list[str]  # the commit message body, line by line
    files: list[PatchFile]


_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def parse_format_patch(text: str) -> ParsedPatch:
    """The parts of a single-commit `git format-patch` text that a manifest makes claims about (pure).
    Hunks are read by their counts, so a content line that looks like a header is never mistaken for one."""
    lines = text.split("\n")
    m = re.match(r"From ([0-9a-f]{40}) ", lines[0]) if lines else None
    commit = m.group(1) if m else None
    i, subject = 1, ""
    while i < len(lines) and lines[i] != "":  # mail headers; a long Subject continues on indented lines
        if lines[i].startswith("Subject: "):
            subject = lines[i][len("Subject: "):]
            while i + 1 < len(lines) and lines[i + 1].startswith((" ", "\t")):
                i += 1
                subject += " " + lines[i].strip()
        i += 1
    message: list[str] = []
    i += 1
    while i < len(lines) and lines[i] != "---" and not lines[i].startswith("diff --git "):
        message.append(lines[i])
        i += 1
    files: list[PatchFile] = []
    current: PatchFile | None = None
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith("+++ "):
            path = line[4:]
            current = PatchFile(path[2:] if path.startswith("b/") else path)
            files.append(current)
            continue
        hunk = _HUNK.match(line)
        if not hunk or current is None:
            continue
        old_left = int(hunk.group(2) or 1)
        new_left = int(hunk.group(4) or 1)
        new_line = int(hunk.group(3))
        while (old_left > 0 or new_left > 0) and i < len(lines):
            body = lines[i]
            i += 1
            if body.startswith("\\"):  # "\ No newline at end of file"
                continue
            if body.startswith("+"):
                current.added[new_line] = body[1:]
                new_line += 1
                new_left -= 1
            elif body.startswith("-"):
                current.removed += 1
                old_left -= 1
            else:
                new_line += 1
                new_left -= 1
                old_left -= 1
    return ParsedPatch(commit, subject, message, files)


def check_export(patch_text: str, manifest: dict) -> list[str]:
    """What the exported patch and its manifest disagree on (pure; empty = consistent): the commit and its
    base, the files, the line numbers of every added line, and each site's marker lines and parameters
    (and the commit message's line for it). Every added marker line must belong to a site the manifest lists."""
    problems: list[str] = []
    patch = parse_format_patch(patch_text)
    rid, base, commit = manifest.get("id"), manifest.get("base_commit"), manifest.get("commit")
    if patch.commit != commit:
        problems.append(f"the patch is commit {patch.commit or '(none)'}, the manifest says {commit}")
    if f"[{rid}]" not in patch.subject:
        problems.append(f"the patch's subject {patch.subject!r} does not name request {rid}")
    bases = [line[len("Base: "):].strip() for line in patch.message if line.startswith("Base: ")]
    if bases != [base]:
        problems.append(f"the patch's base is {', '.join(bases) or '(none)'}, the manifest says {base}")
    claimed = {f.get("path"): sorted(f.get("inserted_lines") or []) for f in manifest.get("files", [])}
    by_path = {f.path: f for f in patch.files}
    if len(by_path) != len(patch.files) or set(by_path) != set(claimed):
        problems.append(f"the patch changes {sorted(f.path for f in patch.files)}, "
                        f"the manifest lists {sorted(claimed)}")
    for path in sorted(set(by_path) & set(claimed)):
        if sorted(by_path[path].added) != claimed[path]:
            problems.append(f"{path}: the patch adds lines {_ranges(sorted(by_path[path].added))}, the manifest "
                            f"says {_ranges(claimed[path])}")
    sites = manifest.get("sites", [])
    tunable = bool(manifest.get("tunable"))
    keys = [_comment_safe(str(s.get("key"))) for s in sites]

    def owner(line: str) -> str | None:
        # the longest key that matches: a stream may contain spaces, so one key can begin another
        found = [k for k in keys if f"/* {MARKER_WORD} {k} " in line or f"/* {MARKER_WORD} {k} */" in line]
        return max(found, key=len) if found else None

    for path, pf in by_path.items():
        if path == TUNABLES_HEADER:
            continue
        for n, line in pf.added.items():
            if f"/* {MARKER_WORD} " in line and owner(line) is None and f"{MARKER_WORD} tunables header" not in line:
                problems.append(f"{path}:{n} adds a prefetch line for a site the manifest does not list")
    site_lines = [line for line in patch.message if line.startswith("- ")]
    if len(site_lines) != len(sites):
        problems.append(f"the commit message lists {len(site_lines)} site(s), the manifest {len(sites)}")
    header = by_path.get(TUNABLES_HEADER)
    if header is not None:
        listed = {m.group(1) for line in header.added.values()
                  for m in [re.match(r"/\* (.+): \d+ line\(s\) of \d+ B per iteration \*/$", line)] if m}
        if listed != set(keys):
            problems.append(f"the tunables header defines sites {sorted(listed)}, the manifest lists {sorted(keys)}")
    for site, key in zip(sites, keys, strict=True):
        d, h = site.get("distance_bytes"), site.get("hint")
        if not any(line.startswith(f"- {site.get('key')} (") and f"distance={d} B hint={h} " in line + " "
                   for line in site_lines):  # the message names the key as is (no comment escaping)
            problems.append(f"the commit message does not list {key} with distance={d} B hint={h}")
        pf = by_path.get(str(site.get("file")))
        mine = [line for line in (pf.added.values() if pf else ()) if owner(line) == key]
        if not mine:
            problems.append(f"the patch adds no line for site {key} in {site.get('file')}")
            continue
        if tunable:
            env = site.get("env") or {}
            calls = (f'amppatch_env_long("{env.get("distance")}", {d})', f'amppatch_env_hint("{env.get("hint")}", {h})')
            if header is None or not all(any(c in line for line in header.added.values()) for c in calls):
                problems.append(f"the patch's tunables header does not default {key} to distance {d} and hint {h}")
            continue
        found_d = {int(v) for line in mine for v in re.findall(r"\bd=(\d+)", line)}
        found_h = {int(v) for line in mine for v in re.findall(r"\bh=(\d+)", line)}
        if found_d != {d} or found_h != {h}:
            problems.append(f"site {key}: the patch prefetches with distance {sorted(found_d)} and hint "
                            f"{sorted(found_h)}, the manifest says {d} and {h}")
    return problems


def _ranges(numbers: list[int]) -> str:
    """1, 2, 3, 7 -> "1-3, 7" (short error messages for long line lists)."""
    out: list[str] = []
    for n in numbers:
        if out and out[-1].split("-")[-1] == str(n - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out) or "none"


class GitRepo:
    """The few git operations apply needs, none of which touches the user's branch, index or files."""

    def __init__(self, path: Path) -> None:
        import git

        try:
            self.repo = git.Repo(path)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
            raise UsageError(f"{path} is not a git repository",
                             next_step="run `git init && git add -A && git commit -m base` there, or use "
                                       "`amppatch llama fetch`") from exc
        self.path = Path(self.repo.working_tree_dir or path)

    def dirty_files(self) -> list[str]:
        out = self.repo.git.status("--porcelain", "--untracked-files=all")
        return [line[3:] for line in out.splitlines() if line.strip()]

    def head_commit(self) -> str:
        try:
            return self.repo.head.commit.hexsha
        except ValueError as exc:
            raise UsageError(f"{self.path} has no commit yet", next_step="commit the tree first") from exc

    def branch_commit(self, branch: str) -> str | None:
        try:
            return self.repo.git.rev_parse("--verify", "--quiet", f"refs/heads/{branch}^{{commit}}").strip() or None
        except Exception:
            return None

    def make_commit(self, base: str, files: dict[str, bytes], message: str) -> str:
        """The commit of `files` on top of `base`, written to the object database only: no ref moves, no
        checkout. Author, committer and date are fixed (the date is the base's), so the same request
        always yields the same commit id, which is how a reused branch is checked."""
        import git

        try:
            return self._make_commit(base, files, message)
        except git.GitCommandError as exc:
            raise SubprocessError(f"git failed while committing the patch: {exc.command}",
                                  next_step="check the repository (`git fsck`) and that it is writable",
                                  returncode=exc.status if isinstance(exc.status, int) else None,
                                  output_tail=str(exc.stderr)) from exc

    def create_branch(self, branch: str, commit: str) -> None:
        """Point the new `branch` at `commit`; fails (rather than overwrite) if the branch appeared meanwhile."""
        import git

        try:
            self.repo.git.update_ref(f"refs/heads/{branch}", commit, "0" * 40)
        except git.GitCommandError as exc:
            raise SubprocessError(f"git could not create branch {branch}",
                                  next_step=f"if another apply created it meanwhile, run apply again; else "
                                            f"remove it (`git -C {self.path} branch -D {branch}`)",
                                  returncode=exc.status if isinstance(exc.status, int) else None,
                                  output_tail=str(exc.stderr)) from exc

    def _make_commit(self, base: str, files: dict[str, bytes], message: str) -> str:
        from io import BytesIO

        from gitdb.base import IStream

        with tempfile.TemporaryDirectory(prefix="amppatch-index-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            self.repo.git.read_tree(base, env=env)
            for rel, data in files.items():
                sha = self.repo.odb.store(IStream("blob", len(data), BytesIO(data))).binsha.hex()
                mode = "100644"
                try:
                    ls = self.repo.git.ls_tree(base, "--", rel).split()
                    if ls:
                        mode = ls[0]
                except Exception:
                    pass
                self.repo.git.update_index("--add", "--cacheinfo", f"{mode},{sha},{rel}", env=env)
            tree = self.repo.git.write_tree(env=env).strip()
        date = self.repo.commit(base).committed_datetime.isoformat()
        ident = {**_GIT_IDENTITY, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}
        # --no-gpg-sign: a signature (it carries a timestamp) would make the commit id unrepeatable
        return self.repo.git.commit_tree(tree, "-p", base, "--no-gpg-sign", "-m", message, env=ident).strip()

    def branch_mismatch(self, tip: str, expected: str, base: str) -> str:
        """Why `branch`'s tip is not the commit apply makes for this request (for the refusal)."""
        if tip == base:
            return "it points at the base commit itself (reset: it holds no patch)"
        import git

        try:
            if self.repo.is_ancestor(expected, tip):
                extra = int(self.repo.git.rev_list("--count", f"{expected}..{tip}").strip())
                return f"it has {extra} commit(s) on top of the patch"
        except git.GitCommandError:
            pass  # an unreadable history: the generic reason below still holds
        return "its commit differs from the one this request makes (amended or replaced)"

    def delete_branch(self, branch: str) -> None:
        self.repo.git.update_ref("-d", f"refs/heads/{branch}")

    def format_patch(self, commit: str) -> str:
        return self.repo.git.format_patch("-1", "--stdout", "--no-signature", commit) + "\n"

    def show(self, commit: str, rel: str) -> bytes | None:
        try:
            return self.repo.git.show(f"{commit}:{rel}", stdout_as_string=False)
        except Exception:
            return None


# ----------------------------------------------------------------------------------------------------------
# Gate helpers: which model makes a kernel run, and proof that it ran


_KERNEL_TYPES = {"q8_0": "q8_0", "q4_0": "q4_0", "q4_k": "q4_k", "q6_k": "q6_k", "f16": "f16"}


def model_type_for(function: str) -> str | None:
    """The synthetic model type whose weights run `function`: ggml_vec_dot_<type>_..., a repack
    ggml_gemv_<type>_..., or a specialization over block_<type>x<N> (gemv_..._lut_avx<block_q4_0x8>)."""
    text = function.lower()
    owner, _ = split_member(text)
    if owner is not None:
        # a GEMM micro-kernel class X<activation, weight, ...>: the weight type is the last block type
        # (tinygemm_kernel_vnni<block_q8_0, block_q4_0, ...>), F16 weights are ggml_fp16_t
        blocks = re.findall(r"\bblock_([a-z0-9]+_[0-9a-z]+)\b", owner)
        if blocks:
            return _KERNEL_TYPES.get(blocks[-1])
        return "f16" if re.search(r"\bggml_fp16_t\b", owner) else None
    m = (re.match(r"ggml_(?:vec_dot|gemv|gemm)_([a-z0-9]+(?:_[0-9a-z]+)?)", text)
         or re.search(r"<\s*(?:const\s+)?block_([a-z0-9]+_[0-9a-z]+?)x\d+\b", text))
    if not m:
        return None
    name = m.group(1)
    if name.startswith(("f16", "bf16")):
        name = name.split("_")[0]
    return _KERNEL_TYPES.get(name)


def gate_runtime_args(functions: list[str]) -> tuple[str, ...]:
    """vec_dot kernels only run for weights in the plain CPU buffer: turn extra buffers (repack, AMX) off."""
    return ("-nr",) if any(f.startswith("ggml_vec_dot_") for f in functions) else ()


def count_function_hits(build: object, function: str, model: Path, args: tuple[str, ...] = (),
                        n_predict: int = 2, lines: tuple[str, ...] = ()) -> int:
    """How often `function` ran in llama-completion of `build` (gdb breakpoint hit count) — or, given
    `lines` (FILE:LINE of code amppatch inserted), how often the most-run of those lines ran."""
    from amppatch.build import Build, run_env, runtime_args
    from amppatch.proc import require_tool, run

    assert isinstance(build, Build)
    args = (*args, *runtime_args(build, args))
    gdb = require_tool("gdb", install_hint="install gdb (apt-get install -y gdb) to prove the patched kernel ran")
    binary = build.binary("llama-completion")
    specs = list(lines) or [function]
    breaks: list[str] = []
    for n, spec in enumerate(specs, 1):
        breaks += ["-ex", f"break {spec}", "-ex", f"ignore {n} 100000000"]
    argv = [gdb, "-nx", "-batch", "-ex", "set breakpoint pending on", "-ex", "set pagination off",
            "-ex", "set confirm off", *breaks, "-ex", "run",
            "-ex", "info breakpoints", "--args", str(binary), "-m", str(model), "-p", "hello", "-n", str(n_predict),
            "-t", "1", "-c", "64", "--temp", "0", "--seed", "1", "-no-cnv", "--no-warmup", *args]
    done = run(argv, env=run_env(build), timeout=900, check=False, what=f"gdb breakpoint count on {function}")
    if not lines:
        m = re.search(r"breakpoint already hit (\d+) time", done.stdout)
        return int(m.group(1)) if m else 0
    return max(line_breakpoint_hits(done.stdout, specs).values(), default=0)


def line_breakpoint_hits(info: str, specs: list[str]) -> dict[str, int]:
    """Hit counts of gdb's `info breakpoints` for breakpoints 1..N on `specs` (pure). A FILE:LINE counts
    only if every location it resolved to is the line asked for: on a line without code gdb moves it to
    the next line that has some, which may be another function's. A function name counts once resolved."""
    blocks: dict[int, list[str]] = {}
    current = None
    for line in info.splitlines():
        m = re.match(r"^(\d+)\s+breakpoint\s", line)
        if m:
            current = int(m.group(1))
            blocks[current] = [line]
        elif current is not None and (line.startswith(("\t", " ")) or re.match(r"^\d+\.\d+\s", line)):
            blocks[current].append(line)
        else:
            current = None
    out: dict[str, int] = {}
    for n, spec in enumerate(specs, 1):
        text = "\n".join(blocks.get(n, []))
        at = re.findall(r" at \S+:(\d+)\s*$", text, re.MULTILINE)
        hit = re.search(r"breakpoint already hit (\d+) time", text)
        line = re.search(r":(\d+)$", spec)
        # a FILE:LINE must have resolved to that line; a function name (an inlined helper) to anything
        if at and (line is None or all(a == line.group(1) for a in at)):
            out[spec] = int(hit.group(1)) if hit else 0
    return out


# ----------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class ApplyResult:
    id: str | None
    branch: str | None
    commit: str | None
    base_commit: str
    manifest_path: Path | None
    patch_path: Path | None
    diff: str
    sites: list[PlannedSite]
    skipped: list[Skipped]
    warnings: list[str]
    builds: dict[str, str] = field(default_factory=dict)
    gate: dict | None = None
    reused: bool = False


def _resolve_requests(options: ApplyOptions) -> tuple[list[SiteRequest], list[dict]]:
    """The sites to patch and the files they came from (profile.json or learned.json files, for provenance)."""
    if options.profile is not None and options.sites:
        raise UsageError("pass either --profile or --site, not both", next_step="choose one source of sites")
    if options.learned:
        if options.profile is not None or options.sites:
            raise UsageError("--learned brings its own sites; it cannot be combined with --profile or --site",
                             next_step="pass only --learned learned.json")
        if options.distance is not None or options.hint is not None or options.tunable:
            raise UsageError("--learned bakes the tuned distance and hint as constants; --distance, --hint and "
                             "--tunable do not apply", next_step="drop them (or edit learned.json's winners)")
        return sites_from_learned(options.learned)
    if options.profile is not None:
        requests, profile = sites_from_profile(options.profile, options.distance, options.hint)
        return requests, [profile]
    if not options.sites:
        raise UsageError("no sites given", next_step="pass --site FUNCTION[:LOOP[:STREAM]] or --profile profile.json")
    return [parse_site_spec(s, options.distance, options.hint) for s in options.sites], []


def _configure_compile_db(repo: Path, base: str, options: ApplyOptions) -> Path:
    """The compile commands of the baseline build with the arms' options: from its cached build when one
    exists, else from CMake's configure step alone (seconds) with the arms' CMake options, for the
    (seconds). The repo is only read; output goes to the cache."""
    from amppatch.build import resolve
    from amppatch.proc import require_tool, run

    template = _build_options(options, repo, base, "compile commands")
    resolved = resolve(template)
    built = cache_dir("builds") / resolved.key
    if (built / "manifest.json").is_file() and (built / "compile_commands.json").is_file():
        return built / "compile_commands.json"  # the baseline with these options was built before
    key = hashlib.sha256(json.dumps([resolved.key, "configure-only"]).encode()).hexdigest()[:16]
    out = cache_dir("builds") / f"configure-{key}"
    db = out / "compile_commands.json"
    if db.is_file():
        return db
    cmake = require_tool("cmake", install_hint="install CMake (apt-get install -y cmake)")
    defines = [f"-D{k}={v}" for k, v in resolved.cmake_options.items()]
    flags = " ".join(filter(None, [resolved.cflags, *resolved.kernel_flags()]))
    if flags:
        defines += [f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"]
    progress(f"apply: no build of {base[:12]} to take compile commands from; running CMake configure only ...")
    with tempfile.TemporaryDirectory(prefix="configure-", dir=cache_dir("builds")) as tmp:
        run([cmake, "-S", str(repo), "-B", tmp, *defines], timeout=600, what="cmake configure (compile commands)",
            next_step="pass --compile-db from a build of this tree instead")
        written = Path(tmp) / "compile_commands.json"
        if not written.is_file():  # a CMakeLists that declares no targets: checked before the cache dir exists
            raise UsageError(f"CMake configured {repo} but wrote no compile_commands.json (no C/C++ targets?)",
                             next_step="pass --compile-db from a build of this tree, or check that it is llama.cpp")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(written, db)
    return db


def analyze_requests(repo: Path, requests: list[SiteRequest], compile_db: Path | None) -> dict[str, FunctionAnalysis]:
    """The analysis each request's function resolves to. A function without a streaming loop of its own
    that calls a same-file helper which has one (ggml_gemv_q4_0_8x8_q8_0 -> gemv_..._lut_avx<block_q4_0x8>)
    resolves to that helper's specialization: the prefetch goes where the loop is, confined to the
    specialization the wrapper runs."""
    analyses: dict[str, FunctionAnalysis] = {}
    for req in requests:
        if req.function in analyses:
            continue
        progress(f"apply: analyzing {req.function} ...")
        fa = analyze_function(repo, req.function, compile_db)
        if req.loop is None and fa.default_loop() is None:
            fa = _follow_calls(repo, fa, compile_db) or fa
        analyses[req.function] = fa
        analyses.setdefault(fa.function, fa)  # planned sites name the function they really patch
    return analyses


def _follow_calls(repo: Path, fa: FunctionAnalysis, compile_db: Path | None,
                  depth: int = 2) -> FunctionAnalysis | None:
    # calls the build compiles first; without a compile database liveness is unknown (None), tried next
    unknown = {c.callee for c in fa.calls if c.live is None}
    if not any(c.live for c in fa.calls) and len(unknown) > 1:
        raise UsageError(f"{fa.function} has no streaming loop of its own and calls {', '.join(sorted(unknown))}; "
                         "which of those calls the build compiles is unknown (no compile command for "
                         f"{fa.relpath})", next_step="pass --compile-db (a build's compile_commands.json), or "
                                                     "name the specialization: --site 'NAME<ARGS>:LOOP:STREAM'")
    for call in sorted(fa.calls, key=lambda c: c.live is not True):
        if call.live is False:
            continue
        try:
            callee = analyze_function(repo, call.callee, compile_db)
        except UsageError:
            continue
        if callee.default_loop() is None:
            callee = _follow_calls(repo, callee, compile_db, depth - 1) if depth > 1 else None
            if callee is None:
                continue
        note = (f"{fa.function} has no streaming loop of its own; its work is done in {callee.function} "
                f"(called at {fa.relpath}:{call.line}), which is patched instead")
        progress(f"apply: {note}")
        return replace(callee, warnings=(*callee.warnings, note))
    return None


def _build_options(options: ApplyOptions, repo: Path, ref: str, name: str) -> BuildOptions:
    """Identical options for both arms: only the ref (and the human label) differ."""
    template = options.build_options or BuildOptions(repo=repo)
    return replace(template, repo=repo, ref=ref, name=name)


def apply(options: ApplyOptions) -> ApplyResult:
    """Run the whole apply stage (see the module docstring)."""
    from amppatch.workspace import check_llama_tree

    repo = check_llama_tree(options.repo)
    git = GitRepo(repo)
    dirty = git.dirty_files()
    if dirty:
        shown = ", ".join(dirty[:10]) + (f" and {len(dirty) - 10} more" if len(dirty) > 10 else "")
        raise UsageError(f"{repo} has uncommitted changes: {shown}",
                         next_step="commit or stash them first; apply commits on its own branch from a clean tree")
    base = git.head_commit()
    requests, sources = _resolve_requests(options)
    warnings: list[str] = []
    what = "tune result" if options.learned else "profile"
    names = [str(p) for p in options.learned] if options.learned else [str(options.profile)]
    ours = cpu_model()
    for name, source in zip(names, sources, strict=False):
        theirs = (source.get("machine") or {}).get("cpu_model")
        if theirs and ours and theirs != ours:
            warnings.append(f"the {what} {name} was measured on {theirs!r}, this CPU is {ours!r}: its distances and "
                            f"hints may not fit here (re-{'tune' if options.learned else 'profile'} on this machine)")
        learned_base = source.get("base_commit") if options.learned else None
        if learned_base and learned_base != base:
            warnings.append(f"{name} was tuned on commit {learned_base[:12]}, the tree is at {base[:12]}: "
                            "the kernels may have changed (re-tune)")
    warnings = list(dict.fromkeys(warnings))  # the same learned.json passed twice warns once
    for req in requests:  # fail fast, before any build, on a function that does not exist
        owner, member = split_member(req.function)
        if not find_function_files(repo, member if owner is not None else split_specialization(member)[0]):
            raise UsageError(f"{req.function} is not mentioned anywhere under {repo}/ggml/src/ggml-cpu",
                             next_step="check the name; `amppatch profile` lists the hot kernels")
    line_size = options.line_size or cache_line_size()

    build_a = None
    compile_db = options.compile_db
    if options.build and not options.dry_run:
        from amppatch.build import build

        progress("apply: building the baseline (A) ...")
        build_a = build(_build_options(options, repo, base, "A (baseline)"))
        compile_db = compile_db or (build_a.dir / "compile_commands.json")
    if compile_db is None and options.like is not None:
        candidate = Path(options.like) / "compile_commands.json"
        compile_db = candidate if candidate.is_file() else None
    if compile_db is None:
        compile_db = _configure_compile_db(repo, base, options)
    progress(f"apply: deciding live #if branches with {compile_db}")
    analyses = analyze_requests(repo, requests, compile_db)
    plan = plan_sites(requests, analyses, line_size)
    plan.warnings[:0] = warnings
    for fa in {id(fa): fa for fa in analyses.values()}.values():  # a wrapper and its callee share one
        plan.warnings.extend(f"{fa.function}: {w}" for w in fa.warnings)
    for sk in plan.skipped:
        progress(f"apply: skipped {sk.request.describe()}: {sk.reason}")
    for w in plan.warnings:
        progress(f"apply: warning: {w}")
    if not plan.sites:
        raise UsageError("no site could be patched (see the reasons above)",
                         next_step="pick a live loop with --site FUNCTION:LOOP:STREAM (apply --dry-run lists them)")
    changes, applied = build_changes(plan, repo, tunable=options.tunable, line_size=line_size)
    diff = unified_diff(changes)
    result = ApplyResult(None, None, None, base, None, None, diff, applied, plan.skipped, plan.warnings)
    if options.dry_run:
        return result
    if not changes:
        progress("apply: every site already carries its amppatch prefetch; nothing to do")
        return result
    rid = request_id(base, applied, tunable=options.tunable, line_size=line_size)
    branch = f"{BRANCH_PREFIX}{rid}"
    out_dir = Path(options.out or Path.cwd() / "amppatch-out").expanduser().resolve()
    patch_path, manifest_path = out_dir / f"{rid}.patch", out_dir / f"{rid}.json"
    result.id, result.branch = rid, branch
    # The commit is deterministic (fixed identity, the base's date), so the one this request makes can be
    # written to the object database and compared with an existing branch: a branch someone reset, amended
    # or committed to would otherwise be exported and built as if it held this request.
    commit = git.make_commit(base, {c.relpath: c.after for c in changes},
                             commit_message(rid, base, applied, tunable=options.tunable))
    existing = git.branch_commit(branch)
    created = False
    if existing is not None:
        if existing != commit:
            raise UsageError(f"branch {branch} exists but does not hold this request: "
                             f"{git.branch_mismatch(existing, commit, base)} (tip {existing[:12]}, expected "
                             f"{commit[:12]})", next_step=f"remove it with `git -C {repo} branch -D {branch}` "
                                                          "and run apply again")
        progress(f"apply: branch {branch} already holds this request ({commit[:12]}); not committing again")
        result.reused = True
    else:
        git.create_branch(branch, commit)
        created = True
        progress(f"apply: committed {commit[:12]} on {branch}")
    result.commit = commit
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "tool": "amppatch",
        "tool_version": __version__,
        "id": rid,
        "branch": branch,
        "base_commit": base,
        "commit": commit,
        "repo": str(repo),
        "tunable": options.tunable,
        "line_size": line_size,
        "options": _options_json(options),
        "sites": [s.to_dict(tunable=options.tunable) for s in applied],
        "skipped": [s.to_dict() for s in plan.skipped],
        "warnings": plan.warnings,
        "files": [{"path": c.relpath, "inserted_lines": c.inserted_lines} for c in changes],
        "patch": patch_path.name,
    }
    try:
        # Checked before anything is built or written: the exported pair must agree line for line.
        patch_text = git.format_patch(commit)
        problems = check_export(patch_text, manifest)
        if problems:
            raise AmppatchError(f"the patch of {branch} does not match its manifest: " + "; ".join(problems),
                                next_step="nothing was exported; report this with the branch "
                                          f"(`git -C {repo} show {branch}`)")
        if build_a is not None:
            from amppatch.build import build

            progress(f"apply: building the patched branch (B, {branch}) ...")
            try:
                build_b = build(_build_options(options, repo, branch, f"B ({branch})"))
            except BuildError as exc:
                raise BuildError(f"the patched branch does not compile: {exc.message}",
                                 next_step="the patch was rejected and its branch removed; report the site",
                                 returncode=exc.returncode, output_tail=exc.output_tail) from exc
            result.builds = {"a": str(build_a.dir), "b": str(build_b.dir)}
            manifest["builds"] = result.builds
            if options.gate:
                manifest["gate"] = result.gate = _gate(options, build_a, build_b, applied,
                                                       breakpoint_locations(applied, changes))
        if manifest_path.is_file() and result.reused:
            # Evidence an earlier run of the same request gathered (builds, gate) stays when this run did
            # not redo it (e.g. a later --no-build run of the same request).
            try:
                previous = json.loads(manifest_path.read_text())
            except (OSError, ValueError):  # unreadable or not UTF-8/JSON: nothing to carry over
                previous = {}
            if isinstance(previous, dict) and previous.get("commit") == commit:
                for key in ("builds", "gate"):
                    if key not in manifest and key in previous:
                        manifest[key] = previous[key]
        write_text_atomic(patch_path, patch_text)
        write_text_atomic(manifest_path, json.dumps(manifest, indent=2, default=str) + "\n")
    except (AmppatchError, KeyboardInterrupt):  # Ctrl-C during the builds leaves no branch either
        if created:
            git.delete_branch(branch)
            progress(f"apply: removed branch {branch}")
        for p in (patch_path, manifest_path):
            p.unlink(missing_ok=True)
        raise
    result.manifest_path, result.patch_path = manifest_path, patch_path
    return result


def _options_json(options: ApplyOptions) -> dict:
    return json.loads(json.dumps(asdict(options), default=str))


def breakpoint_locations(sites: list[PlannedSite], changes: list[FileChange]) -> dict[str, tuple[str, ...]]:
    """FILE:LINE of the inserted code lines of each site whose function gdb cannot name: a method of a
    class template's partial specialization (`X<pattern>::m`) has no symbol of that spelling, and a
    breakpoint on the inserted lines also proves the prefetch code itself executed. (Several lines:
    which of them carry a statement boundary in the line table is the compiler's choice.)"""
    out: dict[str, tuple[str, ...]] = {}
    by_file = {c.relpath: c for c in changes}
    for site in sites:
        if split_member(site.function)[0] is None or site.function in out or site.file not in by_file:
            continue
        change = by_file[site.file]
        lines = change.after.decode(errors="replace").splitlines()
        found = []
        for n in change.inserted_lines:
            code = lines[n - 1].split("/*", 1)[0].strip()
            if f"/* {marker(site)}" in lines[n - 1] and code and not code.startswith(("#", "}", "{")):
                found.append(f"{site.file}:{n}")
                if f"amppatch_prefetch_{site.slug}(" in code:  # tunable: the inlined helper is the prefetch
                    found.append(f"amppatch_prefetch_{site.slug}")
        if found:
            out[site.function] = tuple(found)
    return out


def _gate(options: ApplyOptions, build_a, build_b, sites: list[PlannedSite],
          locations: dict[str, tuple[str, ...]] | None = None) -> dict:
    """B computes exactly what A computes, and every patched function ran in B.

    Sites on kernels of different weight types (a Q4_0 GEMV and a Q4_K GEMV patched at once) cannot all
    run on one synthetic model: each type gets its own gate run, and kernels of no particular type (flash
    attention) are counted on the first. The first run's fields stay at the top level (scripts read
    `passed`, `tokens_a`, ...); every run is in `runs`."""
    from amppatch.errors import CorrectnessError
    from amppatch.gate import GateOptions, kernel_test, run_gate

    functions = sorted({s.function for s in sites})
    if options.gate_model is not None:
        groups: list[tuple[Path, list[str]]] = [(Path(options.gate_model), functions)]
    else:
        from amppatch.model import SynthOptions, synth_model

        by_type: dict[str, list[str]] = {}
        untyped = []
        for f in functions:
            t = model_type_for(f)
            (by_type.setdefault(t, []) if t else untyped).append(f)
        if not by_type:
            raise UsageError(f"cannot pick a synthetic model type that runs {', '.join(functions)}",
                             next_step="pass --gate-model M (a model whose weights run the patched kernels)")
        groups = []
        for i, (t, fs) in enumerate(sorted(by_type.items())):
            model = synth_model(SynthOptions(type=t, build=build_a))
            groups.append((Path(model), fs + (untyped if i == 0 else [])))
    runs = []
    hits: dict[str, int] = {}
    for model, fs in groups:
        # per group: a vec_dot site needs extra buffers off (-nr), a repack GEMV needs them on
        args = tuple(dict.fromkeys((*gate_runtime_args(fs), *options.gate_args)))
        progress(f"apply: correctness gate on {model.name} (args: {' '.join(args) or 'none'}) ...")
        gate = run_gate(build_a, build_b, GateOptions(model=model, mode="identical", extra_args=args))
        for f in fs:
            progress(f"apply: checking that {f} runs in B (gdb breakpoint count) ...")
            hits[f] = count_function_hits(build_b, f, model, args, lines=(locations or {}).get(f, ()))
            if hits[f] == 0:
                raise CorrectnessError(
                    f"{f} never ran in B on {model.name} with {' '.join(args) or 'no extra args'}: the gate "
                    "compared builds without exercising the patch, so it proves nothing",
                    next_step="pass --gate-model with weights of the kernel's type, or --gate-arg flags that "
                              "route them to it")
        runs.append({**gate.to_json(), "model": str(model), "functions": fs, "args": list(args)})
    # llama.cpp's own check of every vec_dot against its reference, for the patched kernels it covers
    return {**runs[0], "function_hits": hits, "runs": runs, "kernel_test": kernel_test(build_a, build_b, functions)}


def format_summary(result: ApplyResult) -> str:
    """Human summary for stderr."""
    lines = []
    for s in result.sites:
        if s.stream.tile_step is not None:
            copies = f", one per unrolled copy ({s.stream.unroll})" if s.stream.unroll else ""
            per_iter = f"tile bytes/iter computed in place -> every line of the tile{copies}"
        else:
            size = s.stream.bytes_per_iteration if s.stream.bytes_per_iteration is not None else "?"
            per_iter = f"{size} B/iter -> {s.lines} prefetch(es)/iter"
        lines.append(f"  site {s.key}: {s.file}:{s.loop.start_line} ({s.loop.guard or 'no #if'}), "
                     f"{s.stream.kind} stream {s.stream.expression}, {per_iter}, "
                     f"distance {s.request.distance_bytes} B, hint {s.request.hint}")
    return "\n".join(lines)
