"""Source analysis of llama.cpp's ggml CPU kernels: find a function, keep only the code the build really
compiles, and describe its loops and the memory streams they walk.

Public API (used by ``amppatch apply`` and by ``amppatch profile`` to map hot source lines onto loops)::

    from amppatch.source import analyze_function, FunctionAnalysis, Loop, Stream

    fa = analyze_function(repo, "ggml_vec_dot_q8_0_q8_0", compile_db=build.dir / "compile_commands.json")
    fa.file, fa.relpath, fa.start_line, fa.end_line      # where the live definition is
    fa.loops                                            # every loop, ordinal 0.. in source order
    loop = fa.loop_for_line(1333)                       # innermost loop containing a source line
    loop.ordinal, loop.start_line, loop.end_line, loop.live   # live: True/False, None if no compile command
    loop.induction, loop.step, loop.step_value           # "ib", "1", 1
    for s in loop.streams:                               # Stream: expression "x[ib]", kind, address "&x[ib]",
        s.element_type, s.element_size, s.bytes_per_iteration   # "const block_q8_0", 34, 34
    fa.default_loop()                                    # the loop a bare `--site FUNCTION` patches
    fa.to_dict()                                         # JSON-ready summary

``analyze_function(repo, function, compile_db=None, *, probe=True)``:

* searches every ``.c/.cpp/.h/.inc`` file under ``ggml/src/ggml-cpu`` of ``repo`` for a definition of
  ``function`` (no hard-coded paths: the backend moved from ``ggml-cpu-quants.c`` to ``arch/<isa>/quants.c``
  in 2025). With a compile database only files it compiles count; without one, definitions under another
  architecture's ``arch/`` directory are ignored;
* parses with tree-sitter (C grammar for ``.c`` where it parses the function with fewer errors, else C++),
  after same-length blanking of grammar-breaking macros (``amppatch.source.parse.BLANKED_MACROS``);
* with a compile database (a path to compile_commands.json or its build dir), decides liveness of each loop
  by preprocessing a marker copy with the unit's real command, and (``probe=True``) compiles a probe that
  reports ``sizeof`` of every stream's element type and the value of macro-valued loop steps. Without one,
  ``live`` and sizes stay ``None`` and ``FunctionAnalysis.warnings`` says so.

Raises ``UsageError`` when the function is not defined anywhere in the CPU backend.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from amppatch.errors import UsageError
from amppatch.source.compiledb import (
    CompileCommand,
    command_for,
    load_compile_db,
    preprocess_markers,
    probe_constants,
)
from amppatch.source.loops import (
    MARKER_WORD,
    UNROLL_INDEX,
    ExistingPrefetch,
    Loop,
    Stream,
    analyze_loops,
    normalize_expression,
)
from amppatch.source.parse import ParsedFile, error_nodes, find_function_definitions, parse_bytes

__all__ = [
    "IN_LAMBDA",
    "MARKER_WORD",
    "UNROLL_INDEX",
    "ExistingPrefetch",
    "FunctionAnalysis",
    "Loop",
    "Stream",
    "analyze_function",
    "canonical_name",
    "closing_angle",
    "find_function_files",
    "member_site_at",
    "member_site_name",
    "normalize_expression",
    "split_member",
]

SOURCE_SUFFIXES = (".c", ".cpp", ".cc", ".h", ".hpp", ".inc")
# platform.machine() -> the arch/ directory of ggml-cpu holding that ISA's kernels.
_ARCH_DIRS = {
    "x86_64": "x86", "amd64": "x86", "i686": "x86", "i386": "x86",
    "aarch64": "arm", "arm64": "arm", "armv7l": "arm",
    "ppc64le": "powerpc", "ppc64": "powerpc", "riscv64": "riscv", "s390x": "s390",
    "loongarch64": "loongarch", "wasm32": "wasm",
}


@dataclass(frozen=True)
class Call:
    """A call from the analyzed function to a function defined in the same file."""

    callee: str  # the callee as a site names it: "gemv_q4_b32_8x8_q8_0_lut_avx<block_q4_0x8>"
    line: int
    live: bool | None


def closing_angle(text: str, open_index: int) -> int:
    """Index of the '>' that closes the '<' at `open_index` (nested pairs counted), or -1."""
    depth = 0
    for i in range(open_index, len(text)):
        depth += (text[i] == "<") - (text[i] == ">")
        if depth == 0:
            return i
    return -1


def split_specialization(function: str) -> tuple[str, tuple[str, ...]]:
    """'gemv<block_q4_0x8, 4>' -> ('gemv', ('block_q4_0x8', '4')); a plain name has no arguments."""
    text = function.strip()
    if "<" not in text:
        return text, ()
    name, rest = text.split("<", 1)
    if not rest.endswith(">"):
        raise UsageError(f"{function!r}: template arguments must end with '>'",
                         next_step="write the specialization as NAME<ARG, ...>, e.g. gemv<block_q4_0x8>")
    args, depth, current = [], 0, ""
    for ch in rest[:-1]:
        if ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
            continue
        depth += (ch in "<([") - (ch in ">)]")
        current += ch
    args.append(current.strip())
    return name.strip(), tuple(" ".join(a.split()) for a in args)


def split_member(function: str) -> tuple[str | None, str]:
    """'tinygemm<block_q8_0, T>::apply' -> ('tinygemm<block_q8_0, T>', 'apply'); 'gemv<X>' -> (None, 'gemv<X>').
    Only a '::' outside template arguments separates a class from its method."""
    text = function.strip()
    depth = 0
    for i in range(len(text) - 1, 0, -1):
        ch = text[i]
        depth += (ch == ">") - (ch == "<")
        if depth == 0 and text[i - 1 : i + 1] == "::":
            return text[: i - 1].strip(), text[i + 1 :].strip()
    return None, text


def canonical_name(function: str) -> str:
    """One spelling per site function: single spaces after commas in template arguments."""
    owner, member = split_member(function)
    if owner is not None:
        name, args = split_specialization(owner)
        return f"{name}<{', '.join(args)}>::{member}" if args else f"{name}::{member}"
    name, args = split_specialization(member)
    return f"{name}<{', '.join(args)}>" if args else name


def _enclosing_class(node):
    """The struct/class specifier a method definition sits in (None for a free function)."""
    current = node.parent
    while current is not None and current.type in ("field_declaration_list", "access_specifier",
                                                     "preproc_if", "preproc_ifdef", "preproc_else",
                                                     "preproc_elif", "declaration_list"):
        current = current.parent
    return current if current is not None and current.type in ("struct_specifier", "class_specifier") else None


def class_pattern(parsed: ParsedFile, cls) -> tuple[str, tuple[str, ...] | None]:
    """(class name, its specialization pattern) — ('tinygemm', ('block_q8_0', 'BLOCK_M')) for a partial
    specialization, (name, None) for a primary template or a plain class."""
    name_node = cls.child_by_field_name("name")
    if name_node is None:
        return "", None
    if name_node.type == "template_type":
        base = name_node.child_by_field_name("name")
        targs = name_node.child_by_field_name("arguments")
        args = tuple(" ".join(parsed.text(a).split()) for a in targs.named_children) if targs is not None else ()
        return (parsed.text(base) if base is not None else ""), args
    return parsed.text(name_node), None


def member_site_name(parsed: ParsedFile, definition) -> str | None:
    """How a site names a method defined in a class body: 'Class<pattern>::method' (a partial
    specialization is named by its own pattern), 'Class::method'; None for a free function."""
    from amppatch.source.parse import function_name

    cls = _enclosing_class(definition)
    method = function_name(definition)
    if cls is None or method is None:
        return None
    name, pattern = class_pattern(parsed, cls)
    if not name:
        return None
    return f"{name}<{', '.join(pattern)}>::{method}" if pattern else f"{name}::{method}"


def _match_owner(parsed: ParsedFile, definition, owner: str) -> tuple[dict[str, str], str | None] | None:
    """Does the method `definition` belong to the class `owner` names ('X', 'X<args>')? Returns the
    template parameters the owner's arguments bind and the guard confining code to that binding, or None.

    A partial specialization's pattern (X<block_q8_0, float, BLOCK_M>) matches arguments that equal its
    concrete entries; an argument in the place of one of its own parameters either repeats the parameter
    (every instantiation: no guard) or binds it (BLOCK_M = 1: guarded). Trailing arguments may be left out."""
    cls = _enclosing_class(definition)
    if cls is None:
        return None
    owner_name, owner_args = split_specialization(owner)
    name, pattern = class_pattern(parsed, cls)
    if name != owner_name:
        return None
    params = _template_parameters(cls) or []
    if pattern is None:
        if not owner_args:
            return {}, None
        if len(owner_args) != len(params):
            return None  # a primary template is named with all its arguments (a partial one may match)
        return _specialize(owner, cls, owner_args)
    kinds = {pname: kind for kind, pname in params}
    if len(owner_args) > len(pattern):
        return None
    mapping: dict[str, str] = {}
    terms: list[str] = []
    for pat, arg in zip(pattern, owner_args, strict=False):
        if pat in kinds:
            if arg != pat:
                mapping[pat] = arg
                terms.append(_guard_term(kinds[pat], pat, arg))
        elif pat.replace(" ", "") != arg.replace(" ", ""):
            return None
    return mapping, (" && ".join(terms) or None)


def _template_parameters(node) -> list[tuple[str, str]] | None:
    """[(kind 'type'|'value', name)] of the template a function (or class) definition belongs to; None if
    none."""
    parent = node.parent
    if parent is None or parent.type != "template_declaration":
        return None
    plist = parent.child_by_field_name("parameters")
    out: list[tuple[str, str]] = []
    for p in plist.named_children if plist is not None else []:
        if p.type in ("type_parameter_declaration", "optional_type_parameter_declaration"):
            ident = next((c for c in p.named_children if c.type == "type_identifier"), None)
            out.append(("type", ident.text.decode() if ident is not None and ident.text else ""))
        elif p.type in ("parameter_declaration", "optional_parameter_declaration"):
            d = p.child_by_field_name("declarator")
            out.append(("value", d.text.decode() if d is not None and d.text else ""))
        else:
            out.append(("other", p.text.decode() if p.text else ""))
    return out


def _guard_term(kind: str, param: str, arg: str) -> str:
    """The C++ condition true only where template parameter `param` is `arg`."""
    return f"std::is_same<{param}, {arg}>::value" if kind == "type" else f"(({param}) == ({arg}))"


def _specialize(function: str, node, args: tuple[str, ...]) -> tuple[dict[str, str], str]:
    params = _template_parameters(node)
    if params is None:
        raise UsageError(f"{function}: the definition is not a template, so it has no specialization",
                         next_step="name the function without <...>")
    if len(params) != len(args) or any(kind == "other" or not name for kind, name in params):
        shown = ", ".join(f"{k} {n}" for k, n in params)
        raise UsageError(f"{function}: the template takes ({shown}); {len(args)} argument(s) given",
                         next_step="give one argument per template parameter (defaults are not filled in)")
    mapping = {name: arg for (_, name), arg in zip(params, args, strict=True)}
    # std::is_same needs <type_traits>, which every C++ unit with such templates already pulls in; a plain
    # `if` (not `if constexpr`) keeps C++11 units valid and still folds to nothing in other specializations.
    terms = [_guard_term(kind, name, arg) for (kind, name), arg in zip(params, args, strict=True)]
    return mapping, " && ".join(terms)


def _same_file_calls(parsed: ParsedFile, node) -> list[tuple[str, int]]:
    """(callee as site name, byte offset) of calls in `node` to functions the same file defines."""
    from amppatch.source.parse import function_definitions, function_name, walk

    defined = {function_name(d) for d in function_definitions(parsed.root)}
    own = function_name(node)
    calls = []
    for n in walk(node):
        if n.type != "call_expression":
            continue
        fn = n.child_by_field_name("function")
        if fn is None:
            continue
        if fn.type == "template_function":
            name_node, targs = fn.child_by_field_name("name"), fn.child_by_field_name("arguments")
            name = parsed.text(name_node) if name_node is not None else ""
            spec = f"{name}<{', '.join(parsed.text(a) for a in targs.named_children)}>" if targs else name
        elif fn.type == "identifier":
            name = spec = parsed.text(fn)
        else:
            continue
        if name in defined and name != own:
            calls.append((spec, n.start_byte))
    return calls


@dataclass(frozen=True)
class FunctionAnalysis:
    function: str
    repo: Path
    file: Path  # absolute path of the file holding the live definition
    relpath: str  # the same, relative to repo
    grammar: str  # "c" or "cpp": the tree-sitter grammar used
    start_line: int
    end_line: int
    start_byte: int
    end_byte: int
    loops: tuple[Loop, ...]
    live: bool | None  # is this definition compiled at all (None: unknown)
    compile_command: tuple[str, ...] | None
    source_sha: str  # hash of the file's bytes that offsets refer to
    warnings: tuple[str, ...] = ()
    candidates: tuple[str, ...] = ()  # every file that defines the function (relpaths)
    parse_errors: int = 0  # ERROR nodes inside the function (after blanking)
    source: bytes = field(default=b"", repr=False, compare=False)
    # A template analyzed for one specialization ("gemv<block_q4_0x8>"): template parameter -> argument,
    # and the C++ condition true only in that specialization (what confines an inserted prefetch to it).
    specialization: dict[str, str] = field(default_factory=dict)
    specialization_guard: str | None = None
    # Calls in the live body to functions defined in the same file (where a wrapper's loops really are).
    calls: tuple[Call, ...] = ()

    def loop(self, ordinal: int) -> Loop:
        for loop in self.loops:
            if loop.ordinal == ordinal:
                return loop
        raise UsageError(f"{self.function} has no loop #{ordinal} (it has {len(self.loops)})",
                         next_step=f"run `amppatch apply --dry-run --site {self.function}` to list its loops")

    def loop_at_line(self, line: int) -> Loop | None:
        """The loop whose header is on `line`, else the innermost loop containing `line`."""
        for loop in self.loops:
            if loop.start_line == line:
                return loop
        return self.loop_for_line(line)

    def loop_for_line(self, line: int) -> Loop | None:
        """The innermost loop whose lines contain `line` (for mapping sampled hot lines onto loops)."""
        inside = [lp for lp in self.loops if lp.start_line <= line <= lp.end_line]
        return max(inside, key=lambda lp: (lp.depth, lp.start_line)) if inside else None

    def default_loop(self) -> Loop | None:
        """What a bare `--site FUNCTION` patches: the first outermost loop (source order) that is not dead,
        parses cleanly and walks a stream of typed elements (else any stream) — the main SIMD loop of
        every ggml vec_dot, the block loop of a repack GEMV; tail loops come after it, dead ISA branches
        are skipped."""
        usable = [lp for lp in self.loops if lp.live is not False and not lp.parse_error and lp.streams]
        if not usable:
            return None
        # A loop that walks typed elements (x[ib] over blocks: bytes per iteration known) is the kernel's
        # streaming loop; an outer loop over rows (a_ptr_start + y * nb) merely sets one up. GEMVs nest
        # the block loop inside row loops, vec_dots have it outermost: both get the block loop.
        walking = [lp for lp in usable if any(s.bytes_per_iteration and not _written(s) for s in lp.streams)]
        # A loop that hands its induction variable to a lambda (ggml's AMX kernels: Unroll<N>{}(compute,
        # i)) carries the lambda's streams; the loops inside the lambda only walk within one iteration.
        calling = [lp for lp in usable if any(s.kind == "tile" for s in lp.streams)]
        usable = calling or walking or usable
        top = min(lp.depth for lp in usable)
        return next(lp for lp in usable if lp.depth == top)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("source")
        data["repo"] = str(self.repo)
        data["file"] = str(self.file)
        for loop in data["loops"]:
            loop["file"] = str(loop["file"])
            for key in ("start_byte", "end_byte", "body_start_byte", "body_end_byte", "body_compound",
                        "body_indent"):
                loop.pop(key, None)
            for stream in loop["streams"]:
                stream.pop("insert_byte", None)
                stream.pop("insert_indent", None)
        return data


def _written(stream: Stream) -> bool:
    """A stream of non-const elements (an output such as `s` of a GEMV): written, not a read to prefetch."""
    return bool(stream.element_type) and not re.search(r"\bconst\b", stream.element_type or "")


def default_stream(loop: Loop) -> Stream | None:
    """The stream a site without a stream key prefetches: the one from the earliest pointer parameter
    (in ggml's vec_dot that is `vx`, the weight row; the activation row `vy` is reused by every row and
    stays in cache), then indexed/offset streams before bumps and row pointers."""
    if not loop.streams:
        return None
    kind_rank = {"indexed": 0, "offset": 1, "row": 2, "bump": 3, "tile": 0}
    return min(loop.streams, key=lambda s: (_written(s), _activation_tile(s),
                                            s.param_index if s.param_index is not None else 99,
                                            kind_rank.get(s.kind, 9), s.line))


def _activation_tile(stream: Stream) -> bool:
    """A lambda's stream of activations: in ggml's GEMM micro-kernels (the AMX buffer's) the activation
    operand comes first (A) and is f32 or the quantized vec_dot type (block_q8_0/q8_1/q8_K), the weights
    second (packed bytes, F16): parameter order would pick the activations, element type does not."""
    return stream.kind == "tile" and bool(re.search(r"\b(float|block_q8_[01K])\b", stream.element_type or ""))


def find_function_files(repo: Path, function: str) -> list[Path]:
    """Files under ggml/src/ggml-cpu whose text mentions `function(` (cheap filter before parsing)."""
    root = Path(repo) / "ggml" / "src" / "ggml-cpu"
    if not root.is_dir():
        raise UsageError(f"{repo} has no ggml/src/ggml-cpu directory", next_step="pass a llama.cpp tree")
    pattern = re.compile(rb"\b" + re.escape(function.encode()) + rb"\s*\(")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(SOURCE_SUFFIXES):
                path = Path(dirpath) / name
                if pattern.search(path.read_bytes()):
                    found.append(path)
    return found


def _host_arch_dir() -> str | None:
    return _ARCH_DIRS.get(platform.machine().lower())


def _parse_best(path: Path, source: bytes, function: str, owner: str | None = None) -> tuple[ParsedFile, list] | None:
    """Parse with the grammar that gives the function's definitions the fewest ERROR nodes (only methods
    of the class `owner` names, when given)."""
    grammars = ["c", "cpp"] if path.suffix == ".c" and owner is None else ["cpp"]
    best = None
    for g in grammars:
        parsed = parse_bytes(source, g, path)
        defs = find_function_definitions(parsed, function)
        if owner is not None:
            defs = [d for d in defs if _match_owner(parsed, d, owner) is not None]
            # as in C++, a matching partial specialization wins over the primary template
            partial = [d for d in defs if class_pattern(parsed, _enclosing_class(d))[1] is not None]
            defs = partial or defs
        if not defs:
            continue
        errors = sum(len(error_nodes(d)) for d in defs)
        if best is None or errors < best[2]:
            best = (parsed, defs, errors)
        if errors == 0:
            break
    return (best[0], best[1]) if best else None


def analyze_function(repo: Path, function: str, compile_db: Path | list[dict] | None = None, *,
                     probe: bool = True) -> FunctionAnalysis:
    """Analyze the live definition of `function` in `repo` (see the module docstring)."""
    import hashlib

    repo = Path(repo).resolve()
    db = load_compile_db(compile_db) if isinstance(compile_db, (str, Path)) else compile_db
    owner, member = split_member(function)
    spec_name, spec_args = split_specialization(member) if owner is None else (member, ())
    function = canonical_name(function)
    files = find_function_files(repo, spec_name)
    warnings: list[str] = []
    candidates: list[tuple[Path, ParsedFile, list]] = []
    for path in files:
        parsed_defs = _parse_best(path, path.read_bytes(), spec_name, owner)
        if parsed_defs is not None:
            candidates.append((path, *parsed_defs))
    if owner is not None:
        # Several partial specializations may match a loose name (X::apply): say which, do not guess.
        # (The same specialization in two #if branches is one name and stays for the liveness check.)
        names = sorted({member_site_name(pf, d) or "" for _, pf, ds in candidates for d in ds})
        if len(names) > 1:
            raise UsageError(f"{function} matches {len(names)} class specializations: {'; '.join(names)}",
                             next_step="name one of them, e.g. --site '" + names[0] + ":LOOP:STREAM'")
    if not candidates:
        raise UsageError(
            f"no definition of {function} under {repo / 'ggml/src/ggml-cpu'}",
            next_step="check the function name (e.g. ggml_vec_dot_q8_0_q8_0); `amppatch profile` lists hot ones",
        )
    all_rel = tuple(str(p.relative_to(repo)) for p, _, _ in candidates)
    arch = _host_arch_dir()

    def in_other_arch(path: Path) -> bool:
        parts = path.relative_to(repo / "ggml" / "src" / "ggml-cpu").parts
        return len(parts) > 1 and parts[0] == "arch" and arch is not None and parts[1] != arch

    pool = candidates
    if db is not None:
        in_db = [c for c in candidates if command_for(db, repo, str(c[0].relative_to(repo))) is not None]
        if in_db:
            pool = in_db
        else:
            warnings.append(f"none of {', '.join(all_rel)} is a translation unit in the compile database; "
                            "using the host architecture's copy")
    if pool is candidates:
        pool = [c for c in candidates if not in_other_arch(c[0])] or candidates

    # Decide among the remaining definitions (and later, loops) with the real compile command.
    chosen = None
    for path, parsed, defs in pool:
        rel = str(path.relative_to(repo))
        command = command_for(db, repo, rel) if db is not None else None
        loops_by_def = [(d, analyze_loops(parsed, d)) for d in defs]
        calls_by_def = [_same_file_calls(parsed, d) for d in defs]
        live_flags: list[bool | None] = [None] * len(defs)
        loop_live: list[list[bool | None]] = [[None] * len(lps) for _, lps in loops_by_def]
        call_live: list[list[bool | None]] = [[None] * len(cs) for cs in calls_by_def]
        if command is not None:
            positions = ([d.start_byte for d in defs] + [lp.start_byte for _, lps in loops_by_def for lp in lps]
                         + [b for cs in calls_by_def for _, b in cs])
            marks = preprocess_markers(command, parsed.source, positions)
            live_flags = list(marks[: len(defs)])
            rest = marks[len(defs):]
            for i, (_, lps) in enumerate(loops_by_def):
                loop_live[i], rest = list(rest[: len(lps)]), rest[len(lps):]
            for i, cs in enumerate(calls_by_def):
                call_live[i], rest = list(rest[: len(cs)]), rest[len(cs):]
        for i, d in enumerate(defs):
            if live_flags[i] is False:
                continue
            calls = tuple(Call(spec, parsed.source.count(b"\n", 0, b) + 1, lv)
                          for (spec, b), lv in zip(calls_by_def[i], call_live[i], strict=True))
            chosen = (path, parsed, d, loops_by_def[i][1], loop_live[i], live_flags[i], command, calls)
            break
        if chosen:
            break
    if chosen is None:
        raise UsageError(f"every definition of {function} ({', '.join(all_rel)}) is in a preprocessor branch "
                         "this build does not compile", next_step="check the build options (e.g. GGML_NATIVE)")
    path, parsed, node, loops, live, fn_live, command, calls = chosen
    if owner is not None:
        mapping, guard = _match_owner(parsed, node, owner) or ({}, None)
    else:
        mapping, guard = _specialize(function, node, spec_args) if spec_args else ({}, None)
    if command is None:
        warnings.append("no compile command for this file: which #if branch is live is unknown, "
                        "and sizes are not probed (pass a build's compile_commands.json)")
    loops = [replace(lp, live=lv) for lp, lv in zip(loops, live, strict=True)]
    if probe and command is not None:
        loops = _fill_sizes(loops, command, warnings, mapping)
    rel = str(path.relative_to(repo))
    return FunctionAnalysis(
        function=function, repo=repo, file=path, relpath=rel, grammar=parsed.grammar,
        start_line=node.start_point[0] + 1, end_line=node.end_point[0] + 1,
        start_byte=node.start_byte, end_byte=node.end_byte, loops=tuple(loops), live=fn_live,
        compile_command=command.argv if command else None,
        source_sha=hashlib.sha256(parsed.source).hexdigest(), warnings=tuple(warnings), candidates=all_rel,
        parse_errors=len(error_nodes(node)), source=parsed.source, specialization=mapping,
        specialization_guard=guard, calls=calls,
    )


def _substitute(text: str, mapping: dict[str, str]) -> str:
    for name, arg in mapping.items():
        text = re.sub(rf"\b{re.escape(name)}\b", arg, text)
    return text


def _fill_sizes(loops: list[Loop], command: CompileCommand, warnings: list[str],
                mapping: dict[str, str] | None = None) -> list[Loop]:
    """sizeof(element type) and macro-valued steps/bumps, from one compiled probe of the unit
    (element types of a template specialization with its arguments substituted)."""
    mapping = mapping or {}
    if mapping:
        loops = [replace(lp, streams=tuple(replace(s, element_type=_substitute(s.element_type, mapping))
                                           if s.element_type else s for s in lp.streams)) for lp in loops]
    exprs: list[str] = []
    for lp in loops:
        if lp.live is False:
            continue
        if lp.step is not None and lp.step_value is None and _constant_looking(lp.step):
            exprs.append(lp.step)
        for s in lp.streams:
            if s.element_type:
                exprs.append(f"sizeof({s.element_type})")
            if s.kind == "bump" and s.elements_per_iteration and s.elements_per_iteration_value is None \
                    and _constant_looking(s.elements_per_iteration):
                exprs.append(s.elements_per_iteration)
    values = probe_constants(command, exprs) if exprs else {}
    missing = [e for e in dict.fromkeys(exprs) if e not in values]
    if missing:
        warnings.append(f"the compiled probe could not evaluate: {', '.join(missing[:6])}")
    out = []
    for lp in loops:
        step_value = lp.step_value if lp.step_value is not None else values.get(lp.step or "")
        streams = []
        for s in lp.streams:
            size = values.get(f"sizeof({s.element_type})") if s.element_type else None
            per = s.elements_per_iteration_value
            if per is None and s.kind in ("indexed", "offset") and s.elements_per_iteration == lp.step:
                per = step_value
            if per is None and s.kind == "bump" and s.elements_per_iteration:
                per = values.get(s.elements_per_iteration)
            nbytes = size * per if size is not None and per is not None else None
            streams.append(replace(s, element_size=size, elements_per_iteration_value=per,
                                   bytes_per_iteration=nbytes))
        out.append(replace(lp, step_value=step_value, streams=tuple(streams)))
    return out


def _constant_looking(expr: str) -> bool:
    """Macro names, literals and sizeof: worth asking the compiler about (locals are not)."""
    return bool(re.fullmatch(r"[\w\s()+\-*/<>&|~]+", expr)) and not re.search(r"\b[a-z_][a-z0-9_]*\b(?!\s*\()",
                                                                              re.sub(r"\bsizeof\b", "", expr))


IN_LAMBDA = "<lambda>"  # member_site_at: the line is in a lambda body (its caller's frame names the site)


@lru_cache(maxsize=16)
def _lookup_index(path: str, mtime_ns: int) -> tuple[ParsedFile, list, list[bytes]]:
    """One parse per file version, with its function definitions and lines (profile asks line by line)."""
    from amppatch.source.parse import function_definitions

    parsed = parse_bytes(Path(path).read_bytes(), "c" if path.endswith(".c") else "cpp", Path(path))
    return parsed, function_definitions(parsed.root), parsed.source.split(b"\n")


def member_site_at(path: Path, line: int) -> str | None:
    """The site name of the method whose body holds `line` of `path` ('X<pattern>::m'), IN_LAMBDA when the
    line is inside a lambda (a sampled frame there belongs to the loop that calls the lambda), or None
    for a free function (its symbol names it) or a line outside any definition.

    Why by position: DWARF names an inlined method by its bare name ('apply'), and a partial
    specialization's instantiation by its arguments ('<block_q8_0, block_q8_0, float, 1, 128, 32>');
    the definition the line sits in is the one source specialization it came from."""
    try:
        parsed, definitions, lines = _lookup_index(str(path), Path(path).stat().st_mtime_ns)
    except OSError:
        return None
    row = line - 1
    inside = [d for d in definitions if d.start_point[0] <= row <= d.end_point[0]]
    if not inside:
        return None
    definition = max(inside, key=lambda d: d.start_byte)
    text = lines[row] if row < len(lines) else b""
    col = len(text) - len(text.lstrip())  # the line's first token, not the whitespace of an outer block
    node = parsed.root.named_descendant_for_point_range((row, col), (row, col))
    while node is not None and node != definition:
        if node.type == "lambda_expression":
            return IN_LAMBDA
        node = node.parent
    return member_site_name(parsed, definition)
