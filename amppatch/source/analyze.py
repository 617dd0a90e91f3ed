"""Find the live definition of a function in a llama.cpp tree and analyze it (`analyze_function`): every
file of the CPU backend that defines it, the copy this build compiles (compile database, else the host
architecture's), the definition in the live preprocessor branch, its loops with their liveness, its calls
to same-file helpers, and the sizes a compiled probe reports.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from tree_sitter import Node

from amppatch.errors import UsageError
from amppatch.source.compiledb import CompileCommand, command_for, load_compile_db, preprocess_markers
from amppatch.source.function import Call, FunctionAnalysis
from amppatch.source.loops import analyze_loops
from amppatch.source.names import canonical_name, split_member, split_specialization
from amppatch.source.parse import (
    ParsedFile,
    error_nodes,
    find_function_definitions,
    function_definitions,
    function_name,
    parse_bytes,
    walk,
)
from amppatch.source.records import Loop
from amppatch.source.sizes import fill_sizes
from amppatch.source.specialization import class_pattern, enclosing_class, match_owner, member_site_name, specialize

SOURCE_SUFFIXES = (".c", ".cpp", ".cc", ".h", ".hpp", ".inc")
# platform.machine() -> the arch/ directory of ggml-cpu holding that ISA's kernels.
_ARCH_DIRS = {
    "x86_64": "x86", "amd64": "x86", "i686": "x86", "i386": "x86",
    "aarch64": "arm", "arm64": "arm", "armv7l": "arm",
    "ppc64le": "powerpc", "ppc64": "powerpc", "riscv64": "riscv", "s390x": "s390",
    "loongarch64": "loongarch", "wasm32": "wasm",
}


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
    """The arch/ directory of ggml-cpu holding this machine's kernels (None: an ISA not listed)."""
    return _ARCH_DIRS.get(platform.machine().lower())


def _parse_best(path: Path, source: bytes, function: str,
                owner: str | None = None) -> tuple[ParsedFile, list[Node]] | None:
    """Parse with the grammar that gives the function's definitions the fewest ERROR nodes (only methods
    of the class `owner` names, when given)."""
    grammars = ["c", "cpp"] if path.suffix == ".c" and owner is None else ["cpp"]
    best = None
    for g in grammars:
        parsed = parse_bytes(source, g, path)
        defs = find_function_definitions(parsed, function)
        if owner is not None:
            defs = [d for d in defs if match_owner(parsed, d, owner) is not None]
            # as in C++, a matching partial specialization wins over the primary template
            partial = [d for d in defs
                       if (cls := enclosing_class(d)) is not None and class_pattern(parsed, cls)[1] is not None]
            defs = partial or defs
        if not defs:
            continue
        errors = sum(len(error_nodes(d)) for d in defs)
        if best is None or errors < best[2]:
            best = (parsed, defs, errors)
        if errors == 0:
            break
    return (best[0], best[1]) if best else None


def _same_file_calls(parsed: ParsedFile, node: Node) -> list[tuple[str, int]]:
    """(callee as site name, byte offset) of calls in `node` to functions the same file defines."""
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


# A file that defines the function: its path, its parse, and the definitions in it (one per #if branch).
_Candidate = tuple[Path, ParsedFile, list[Node]]


class _Chosen(NamedTuple):
    """The definition the build compiles, with what the marker preprocessing said about its parts."""

    path: Path
    parsed: ParsedFile
    node: Node
    loops: list[Loop]
    loop_live: list[bool | None]
    live: bool | None
    command: CompileCommand | None
    calls: tuple[Call, ...]


def analyze_function(repo: Path, function: str, compile_db: Path | list[dict] | None = None, *,
                     probe: bool = True) -> FunctionAnalysis:
    """Analyze the live definition of `function` in `repo` (see the package docstring)."""
    repo = Path(repo).resolve()
    db = load_compile_db(compile_db) if isinstance(compile_db, (str, Path)) else compile_db
    owner, member = split_member(function)
    spec_name, spec_args = split_specialization(member) if owner is None else (member, ())
    function = canonical_name(function)
    warnings: list[str] = []
    candidates = _candidates(repo, function, spec_name, owner)
    all_rel = tuple(str(p.relative_to(repo)) for p, _, _ in candidates)
    chosen = _choose_live(_compiled_copies(repo, candidates, db, warnings), repo, db)
    if chosen is None:
        raise UsageError(f"every definition of {function} ({', '.join(all_rel)}) is in a preprocessor branch "
                         "this build does not compile", next_step="check the build options (e.g. GGML_NATIVE)")
    path, parsed, node, command = chosen.path, chosen.parsed, chosen.node, chosen.command
    if owner is not None:
        mapping, guard = match_owner(parsed, node, owner) or ({}, None)
    else:
        mapping, guard = specialize(function, node, spec_args) if spec_args else ({}, None)
    if command is None:
        warnings.append("no compile command for this file: which #if branch is live is unknown, "
                        "and sizes are not probed (pass a build's compile_commands.json)")
    loops = [replace(lp, live=lv) for lp, lv in zip(chosen.loops, chosen.loop_live, strict=True)]
    if probe and command is not None:
        loops = fill_sizes(loops, command, warnings, mapping)
    rel = str(path.relative_to(repo))
    return FunctionAnalysis(
        function=function, repo=repo, file=path, relpath=rel, grammar=parsed.grammar,
        start_line=node.start_point[0] + 1, end_line=node.end_point[0] + 1,
        start_byte=node.start_byte, end_byte=node.end_byte, loops=tuple(loops), live=chosen.live,
        compile_command=command.argv if command else None,
        source_sha=hashlib.sha256(parsed.source).hexdigest(), warnings=tuple(warnings), candidates=all_rel,
        parse_errors=len(error_nodes(node)), source=parsed.source, specialization=mapping,
        specialization_guard=guard, calls=chosen.calls,
    )


def _candidates(repo: Path, function: str, spec_name: str, owner: str | None) -> list[_Candidate]:
    """Every file of the CPU backend that defines the function (methods: of the class `owner` names);
    a UsageError when there is none, or when a loose class name matches several specializations."""
    candidates: list[_Candidate] = []
    for path in find_function_files(repo, spec_name):
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
    return candidates


def _compiled_copies(repo: Path, candidates: list[_Candidate], db: list[dict] | None,
                     warnings: list[str]) -> list[_Candidate]:
    """The candidates this build compiles: those the compile database lists; without a database (or when
    it lists none of them), all but the copies under another architecture's arch/ directory."""
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
    return pool


def _choose_live(pool: list[_Candidate], repo: Path, db: list[dict] | None) -> _Chosen | None:
    """The first definition the real compile command does not drop (any, without a command), with the
    liveness of its loops and calls — one marker preprocessing per file answers all three."""
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
            return _Chosen(path, parsed, d, loops_by_def[i][1], loop_live[i], live_flags[i], command, calls)
    return None
