"""Loop and stream analysis of one parsed function (pure: no subprocess; sizes are filled in later).

A *stream* is memory a loop walks through as its induction variable advances:

* ``indexed`` — ``x[ib]``, ``y[ib + 1]`` (one stream per base pointer; every access is listed);
* ``offset``  — pointer arithmetic ``x + i`` (also inside macro arguments such as ``LOAD(x + i + j*EPR)``);
* ``bump``    — a pointer advanced in the loop body, ``q4 += 32`` or ``p++``;
* ``row``     — a pointer declared in the body from the induction variable (``row = base + r*stride``),
  i.e. a row pointer that inner loops then walk;
* ``tile``    — memory a lambda reads when the loop body calls it with the induction variable, directly
  (``f(i)``) or once per unrolled index (``Unroll<N>{}(f, i)``, ggml's AMX kernels: one packed tile per
  column per iteration). The address is the lambda's, rewritten in the loop's names (its parameters
  replaced by the call's arguments and the unrolled index by ``amppatch_u``, its locals inlined).

The work is split by question: `scope` (which declaration a name means where), `induction` (the loop's
variable and step), `streams` (what the body itself walks), `lambdas` (tiles of lambdas the body calls);
`records` holds the results (re-exported here, where callers have always imported them from).
"""

from __future__ import annotations

from tree_sitter import Node

from amppatch.source.context import LoopContext
from amppatch.source.induction import induction_and_step
from amppatch.source.parse import ParsedFile, error_nodes
from amppatch.source.records import MARKER_WORD, UNROLL_INDEX, ExistingPrefetch, Loop, Stream, normalize_expression
from amppatch.source.scope import Decl, collect_declarations
from amppatch.source.streams import find_streams
from amppatch.source.syntax import NodeIndex, int_value

__all__ = [
    "MARKER_WORD",
    "PREFETCH_CALLS",
    "UNROLL_INDEX",
    "ExistingPrefetch",
    "Loop",
    "Stream",
    "analyze_loops",
    "normalize_expression",
]

PREFETCH_CALLS = ("__builtin_prefetch", "_mm_prefetch", "_m_prefetch", "_mm_prefetchw", "__prefetch")


def analyze_loops(parsed: ParsedFile, function: Node) -> list[Loop]:
    """Every loop of `function` with its induction variable, streams and existing prefetches."""
    index_ = NodeIndex(parsed, function)
    decls = collect_declarations(parsed, function, index_)
    if function.child_by_field_name("body") is None:
        return []
    loops: list[Loop] = []
    open_loops: list[tuple[Node, int]] = []  # (node, ordinal) of the loops enclosing the current one
    for ordinal, node in enumerate(index_.loops):
        while open_loops and open_loops[-1][0].end_byte <= node.start_byte:
            open_loops.pop()
        parent = open_loops[-1][1] if open_loops else None
        loops.append(_analyze_loop(parsed, node, ordinal, len(open_loops), parent, decls, function, index_))
        open_loops.append((node, ordinal))
    return loops


def _analyze_loop(parsed: ParsedFile, node: Node, ordinal: int, depth: int, parent: int | None,
                  decls: dict[str, list[Decl]], function: Node, index_: NodeIndex) -> Loop:
    """One loop: `ordinal` in source order, `depth` and `parent` (ordinal) among the loops enclosing it."""
    var, step = induction_and_step(parsed, node)
    body = node.child_by_field_name("body")
    if node.type == "do_statement" and body is None:
        body = next((c for c in node.named_children if c.type == "compound_statement"), None)
    streams: dict[str, Stream] = {}
    unplaceable: dict[str, str] = {}
    if body is not None and var is not None:
        ctx = LoopContext(parsed, node, body, var, step, decls, index_)
        find_streams(ctx)
        streams, unplaceable = ctx.streams, ctx.unplaceable
    errors = error_nodes(node)
    parse_error = None
    if errors:
        lines = sorted({e.start_point[0] + 1 for e in errors})
        parse_error = (f"the loop parses with {len(errors)} ERROR/MISSING node(s) at line(s) "
                       f"{', '.join(map(str, lines[:5]))} (a macro the grammar cannot see through)")
    kind = {"for_statement": "for", "while_statement": "while", "do_statement": "do",
            "for_range_loop": "for_range"}[node.type]
    ordered = sorted(streams.values(), key=lambda s: (s.line, s.expression))
    return Loop(
        ordinal=ordinal, kind=kind, file=parsed.path, start_line=node.start_point[0] + 1,
        end_line=node.end_point[0] + 1, depth=depth, parent=parent, induction=var, step=step,
        step_value=int_value(step), guard=_guard(parsed, node, function), streams=tuple(ordered),
        prefetches=_prefetches(parsed, body, index_) if body is not None else (), parse_error=parse_error,
        start_byte=node.start_byte, end_byte=node.end_byte,
        body_start_byte=body.start_byte if body is not None else node.end_byte,
        body_end_byte=body.end_byte if body is not None else node.end_byte,
        body_compound=body is not None and body.type == "compound_statement",
        body_indent=_body_indent(parsed, body) if body is not None else "    ",
        unplaceable=tuple(f"{expr}: {why}" for expr, why in unplaceable.items()),
    )


def _guard(parsed: ParsedFile, node: Node, stop: Node) -> str | None:
    """The innermost preprocessor condition around `node` (up to `stop`): "#if defined(__AVX2__)"."""
    current = node.parent
    while current is not None and current != stop:
        t = current.type
        if t in ("preproc_if", "preproc_elif"):
            cond = current.child_by_field_name("condition")
            return f"#{'if' if t == 'preproc_if' else 'elif'} {parsed.text(cond).strip() if cond else ''}"
        if t in ("preproc_ifdef", "preproc_elifdef"):
            name = current.child_by_field_name("name")
            keyword = parsed.text(current.children[0]).strip() if current.children else "#ifdef"
            return f"{keyword} {parsed.text(name) if name else ''}"
        if t == "preproc_else":
            owner = current.parent
            cond = owner.child_by_field_name("condition") or owner.child_by_field_name("name") if owner else None
            return f"#else (of {parsed.text(cond).strip() if cond else '?'})"
        current = current.parent
    return None


def _prefetches(parsed: ParsedFile, body: Node, index_: NodeIndex) -> tuple[ExistingPrefetch, ...]:
    """Prefetch calls already in the body: the kernel's own, and ours (their line carries the marker)."""
    found = []
    for node in index_.within("call_expression", body):
        fn = node.child_by_field_name("function")
        name = parsed.text(fn) if fn is not None else ""
        if name in PREFETCH_CALLS or "prefetch" in name.lower():
            start = parsed.source.rfind(b"\n", 0, node.start_byte) + 1
            end = parsed.source.find(b"\n", node.end_byte)
            line_text = parsed.source[start : end if end >= 0 else len(parsed.source)]
            by_us = MARKER_WORD.encode() in line_text
            found.append(ExistingPrefetch(node.start_point[0] + 1, parsed.text(node), by_us))
    return tuple(found)


def _body_indent(parsed: ParsedFile, body: Node) -> str:
    """The indentation of the body's first statement (an inserted first statement gets the same), else
    one level deeper than the line the body starts on."""
    for child in body.named_children:
        if child.type == "comment":
            continue
        line_start = parsed.source.rfind(b"\n", 0, child.start_byte) + 1
        prefix = parsed.source[line_start : child.start_byte]
        if prefix.strip() == b"":
            return prefix.decode()
        break
    line_start = parsed.source.rfind(b"\n", 0, body.start_byte) + 1
    rest = parsed.source[line_start:]
    lead = rest[: len(rest) - len(rest.lstrip(b" \t"))].decode()
    return lead + "    "
