"""Requests and planning: what was asked for (``--site``, a profile's sites, tune's winners) and the live
loop and stream of the analyzed function each request resolves to. Pure but for reading the request files
and the source analysis."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from amppatch.errors import UsageError
from amppatch.learned import Learned
from amppatch.proc import progress
from amppatch.profiledoc import Profile, ProfileSite
from amppatch.source import (
    FunctionAnalysis,
    Loop,
    Stream,
    analyze_function,
    closing_angle,
    default_stream,
    normalize_expression,
)

DEFAULT_DISTANCE = 2048
DEFAULT_HINT = 3
MAX_DISTANCE = 1 << 20


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


def _check_params(distance: object, hint: object, where: str) -> tuple[int, int]:
    """The distance and hint, checked (they may come from a file): returned typed."""
    if not isinstance(distance, int) or not 0 < distance <= MAX_DISTANCE:
        raise UsageError(f"{where}: distance {distance!r} is not a byte count in 1..{MAX_DISTANCE}",
                         next_step="pass --distance BYTES, e.g. 2048")
    if not isinstance(hint, int) or hint not in (0, 1, 2, 3):
        raise UsageError(f"{where}: hint {hint!r} is not a locality 0-3",
                         next_step="pass --hint 0..3 (3 = keep in all cache levels)")
    return distance, hint


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


def sites_from_profile(path: Path, distance: int | None, hint: int | None) -> tuple[list[SiteRequest], Profile]:
    """The profile's `sites` as requests (--distance/--hint override theirs), and the profile itself (read only
    through `Profile.read`, the shared checker's way)."""
    profile = Profile.read(path)
    if not profile.sites:
        raise UsageError(f"{path} lists no sites (no hot streaming loop was found)",
                         next_step="profile a workload whose kernels stream memory, or pass --site")
    return requests_from_profile_sites(profile.sites, distance, hint, str(path)), profile


def requests_from_profile_sites(sites: Sequence[ProfileSite], distance: int | None, hint: int | None,
                                where: str = "profile") -> list[SiteRequest]:
    """Typed profile sites as requests: a site's own distance and hint (the defaults where it gives none)
    unless --distance/--hint override them."""
    out = []
    for i, s in enumerate(sites):
        d, h = _check_params(
            distance if distance is not None else (s.distance_bytes if s.has("distance_bytes") else DEFAULT_DISTANCE),
            hint if hint is not None else (s.hint if s.has("hint") else DEFAULT_HINT), f"{where} site {i}")
        out.append(SiteRequest(str(s.function), parse_loop_key(s.loop), s.stream or None, int(d), int(h),
                               "profile", dict(s.inputs)))
    return out


def sites_from_learned(paths: Sequence[Path]) -> tuple[list[SiteRequest], list[dict]]:
    """The winners of one or more learned.json files (what `amppatch tune` kept), with their tuned distance
    and hint. Several files combine tune runs of different kernels into one build; a site two files both
    tuned must agree, else there is no telling which result to bake."""
    out: list[SiteRequest] = []
    sources: list[dict] = []
    seen: dict[tuple, tuple[Path, int, int]] = {}
    for path in paths:
        learned = Learned.read(path)
        winners = learned.winners
        if not winners:
            dropped = "; ".join(f"{d.get('key')}: {d.get('reason')}" for d in learned.dropped)
            raise UsageError(f"{path} keeps no site: tune found no prefetch that beats 'off' beyond the noise"
                             + (f" ({dropped})" if dropped else ""),
                             next_step="keep the stock build, or tune longer (a larger --budget) or other sites"
                             + (" (or leave this file out)" if len(paths) > 1 else ""))
        for i, w in enumerate(winners):
            d, h = _check_params(w.distance_bytes, w.hint, f"{path} winner {i}")
            loop = parse_loop_key(w.loop)
            identity = (str(w.function), loop, w.stream or None)
            if identity in seen:
                other, od, oh = seen[identity]
                if (od, oh) != (d, h):
                    raise UsageError(f"{identity[0]} (loop {loop}, stream {identity[2]}) was tuned in both {other} "
                                     f"({od} B, hint {oh}) and {path} ({d} B, hint {h})",
                                     next_step="pass only the learned.json whose result you want baked")
                continue
            seen[identity] = (path, d, h)
            inputs = {"learned": str(path), "ratio": w.get("ratio"), "ci95": w.get("ci95"),
                      "ratio_by_threads": w.get("ratio_by_threads")}
            out.append(SiteRequest(identity[0], loop, identity[2], d, h, "learned", inputs))
        sources.append(learned.to_json())
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
            deeper = _follow_calls(repo, callee, compile_db, depth - 1) if depth > 1 else None
            if deeper is None:
                continue
            callee = deeper
        note = (f"{fa.function} has no streaming loop of its own; its work is done in {callee.function} "
                f"(called at {fa.relpath}:{call.line}), which is patched instead")
        progress(f"apply: {note}")
        return replace(callee, warnings=(*callee.warnings, note))
    return None


