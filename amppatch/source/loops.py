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
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from tree_sitter import Node, Query, QueryCursor

from amppatch.source.parse import LOOP_TYPES, ParsedFile, error_nodes, language, walk

PREFETCH_CALLS = ("__builtin_prefetch", "_mm_prefetch", "_m_prefetch", "_mm_prefetchw", "__prefetch")
MARKER_WORD = "amppatch:"  # every line amppatch inserts carries a comment starting with this word

_IDENT_RE = re.compile(r"[A-Za-z_]\w*")
_INT_RE = re.compile(r"^\(?\s*(\d+)[uUlL]*\s*\)?$")


@dataclass(frozen=True)
class Stream:
    expression: str  # the site key's stream part: "x[ib]", "x + i", "q4", "row"
    base: str  # the pointer variable
    kind: str  # indexed | offset | bump | row
    address: str  # C expression of the address the current iteration starts at: "&x[ib]", "q4"
    line: int  # first use (1-based)
    accesses: tuple[str, ...] = ()
    element_type: str | None = None  # "const block_q8_0" (declared pointee type)
    element_size: int | None = None  # sizeof(element_type) from the compiled probe
    elements_per_iteration: str | None = None  # C expression: loop step, or the sum of pointer bumps
    elements_per_iteration_value: int | None = None
    bytes_per_iteration: int | None = None
    param_index: int | None = None  # which function parameter the base pointer comes from (weights first)
    note: str = ""
    # Where the prefetch goes when not at the top of the loop body: right after the declaration of a row
    # pointer (the row does not exist before it). Byte offset of the declaration's end, and its indentation.
    insert_byte: int | None = field(default=None, repr=False)
    insert_indent: str | None = field(default=None, repr=False)
    # A row pointer set as base + var*stride (flash attention's k_data = k->data + ic*nbk1 + ...): C
    # expression of the BYTES it moves per iteration, so a distance can land a whole number of rows ahead.
    row_stride: str | None = None
    # A tile stream: C expression of the bytes one iteration moves (the address at induction value `step`
    # minus the address at 0, unrolled index 0: loop-invariant by construction, so the compiler folds it
    # to a constant and the distance's rounding costs no division in the loop); and how many unrolled
    # copies of the lambda each read their own tile (C expression of Unroll's count; None: a direct call).
    tile_step: str | None = None
    unroll: str | None = None


UNROLL_INDEX = "amppatch_u"  # the unrolled index in a tile stream's address


@dataclass(frozen=True)
class ExistingPrefetch:
    line: int
    text: str
    by_amppatch: bool  # carries an amppatch marker (inserted by an earlier apply)


@dataclass(frozen=True)
class Loop:
    ordinal: int  # 0-based, source order over every loop of the function (dead branches included)
    kind: str  # for | while | do | for_range
    file: Path
    start_line: int  # 1-based line of the loop keyword
    end_line: int
    depth: int  # 0 = outermost loop of the function
    parent: int | None  # ordinal of the enclosing loop
    induction: str | None
    step: str | None  # C expression of the induction step ("1", "2", "GGML_F16_DOT_STEP")
    step_value: int | None
    guard: str | None  # innermost enclosing preprocessor condition, e.g. "#if defined(__AVX2__)"
    streams: tuple[Stream, ...]
    prefetches: tuple[ExistingPrefetch, ...]
    parse_error: str | None  # why the loop's parse cannot be trusted (ERROR nodes), else None
    live: bool | None = None  # compiled by the real command (None: no compile command known)
    # Accesses that advance with the induction variable but cannot be prefetched at the top of the body,
    # because their address uses a name declared later (inside the body or a nested loop), with the reason.
    unplaceable: tuple[str, ...] = ()
    start_byte: int = field(default=0, repr=False)
    end_byte: int = field(default=0, repr=False)
    body_start_byte: int = field(default=0, repr=False)
    body_end_byte: int = field(default=0, repr=False)
    body_compound: bool = field(default=True, repr=False)
    body_indent: str = field(default="    ", repr=False)

    def stream(self, key: str) -> Stream | None:
        """The stream named by `key`: its expression, one of its accesses, or its base name."""
        norm = normalize_expression(key)
        for s in self.streams:
            if normalize_expression(s.expression) == norm or norm in (normalize_expression(a) for a in s.accesses):
                return s
        for s in self.streams:
            if s.base == key.strip():
                return s
        return None


def normalize_expression(text: str) -> str:
    """Whitespace-insensitive form of a C expression (for matching site keys)."""
    return re.sub(r"\s+", "", text)


@dataclass(frozen=True)
class _Decl:
    name: str
    type_text: str
    pointer_depth: int
    is_array: bool
    byte: int  # where the declaration starts
    param_index: int | None
    init: Node | None
    end: int = 0  # where the declaration statement ends (the name is usable after it)
    scope_end: int = 0  # where its block ends (the name is out of scope from there on)


_NODE_KINDS = ("subscript_expression", "binary_expression", "call_expression", "declaration",
               "assignment_expression", "update_expression", "parameter_declaration")


@lru_cache(maxsize=4)
def _index_query(grammar: str) -> Query:
    loops = " ".join(f"({t}) @loop" for t in LOOP_TYPES if t != "for_range_loop" or grammar == "cpp")
    kinds = " ".join(f"({t}) @{t}" for t in _NODE_KINDS)
    return Query(language(grammar), f"{loops} {kinds}")


class _NodeIndex:
    """Every node of interest in a function, found by one tree-sitter query (C speed, not a Python walk),
    sorted by position so each loop takes its slice with a binary search."""

    def __init__(self, parsed: ParsedFile, function: Node) -> None:
        caps = QueryCursor(_index_query(parsed.grammar)).captures(function)
        self.by_kind: dict[str, list[Node]] = {}
        self.starts: dict[str, list[int]] = {}
        marked = _marked_line_starts(parsed.source, function.start_byte, function.end_byte)
        for kind in ("loop", *_NODE_KINDS):
            nodes = sorted(caps.get(kind, []), key=lambda n: n.start_byte)
            if marked and kind != "call_expression":  # calls: existing prefetches are reported, ours too
                # Code amppatch inserted (every such line carries the marker) is not the kernel's: its
                # loops get no ordinal and its addresses are no streams, so a second apply sees the
                # loops and streams the first one saw.
                nodes = [n for n in nodes if parsed.source.rfind(b"\n", 0, n.start_byte) + 1 not in marked]
            self.by_kind[kind] = nodes
            self.starts[kind] = [n.start_byte for n in nodes]
        self.loops = self.by_kind["loop"]

    def within(self, kind: str, node: Node) -> list[Node]:
        starts = self.starts[kind]
        lo = bisect_left(starts, node.start_byte)
        hi = bisect_left(starts, node.end_byte)
        return [n for n in self.by_kind[kind][lo:hi] if n.end_byte <= node.end_byte]

    def innermost_loop(self, node: Node) -> Node | None:
        best = None
        hi = bisect_right(self.starts["loop"], node.start_byte)
        for lp in self.loops[:hi]:
            if lp.end_byte >= node.end_byte and lp.start_byte < node.start_byte:
                best = lp  # later starts are nested deeper
        return best


def _marked_line_starts(source: bytes, start: int, end: int) -> set[int]:
    """Byte offsets where the lines carrying amppatch's marker begin, between `start` and `end`."""
    out: set[int] = set()
    word = MARKER_WORD.encode()
    at = source.find(word, start, end)
    while at >= 0:
        out.add(source.rfind(b"\n", 0, at) + 1)
        at = source.find(word, at + 1, end)
    return out


def _operator(parsed: ParsedFile, left: Node, right: Node) -> str:
    """The operator between the two operands of a binary or assignment expression ('+', '+=', ...)."""
    return parsed.source[left.end_byte : right.start_byte].decode().strip()


def _text(parsed: ParsedFile, node: Node) -> str:
    return parsed.text(node)


def _identifiers(node: Node) -> set[str]:
    return {n.text.decode() for n in walk(node) if n.type == "identifier" and n.text is not None}


def _declarator_shape(node: Node) -> tuple[str | None, int, bool, Node | None]:
    """(name, pointer depth, is array, initializer) of a declarator subtree."""
    depth, is_array, init = 0, False, None
    current: Node | None = node
    while current is not None:
        if current.type == "init_declarator":
            init = current.child_by_field_name("value")
            current = current.child_by_field_name("declarator")
        elif current.type == "pointer_declarator":
            depth += 1
            current = current.child_by_field_name("declarator")
        elif current.type == "array_declarator":
            is_array = True
            current = current.child_by_field_name("declarator")
        elif current.type in ("parenthesized_declarator", "attributed_declarator", "reference_declarator"):
            current = next((c for c in current.named_children if c.type != "attribute_specifier"), None)
        elif current.type in ("identifier", "field_identifier"):
            return (current.text.decode() if current.text else None), depth, is_array, init
        else:
            return None, depth, is_array, init
    return None, depth, is_array, init


def _type_text(parsed: ParsedFile, decl: Node) -> str:
    type_node = decl.child_by_field_name("type")
    if type_node is None:
        return ""
    quals = [parsed.text(c) for c in decl.children if c.type == "type_qualifier" and c.end_byte <= type_node.start_byte]
    quals += [parsed.text(c) for c in decl.children if c.type == "type_qualifier" and c.start_byte >= type_node.end_byte
              and c.start_byte < (decl.child_by_field_name("declarator") or type_node).start_byte]
    return " ".join([*quals, parsed.text(type_node)])


def _collect_declarations(parsed: ParsedFile, function: Node, index_: _NodeIndex) -> dict[str, list[_Decl]]:
    decls: dict[str, list[_Decl]] = {}
    declarator = function.child_by_field_name("declarator")
    while declarator is not None and declarator.type != "function_declarator":
        declarator = declarator.child_by_field_name("declarator")
    params = declarator.child_by_field_name("parameters") if declarator is not None else None
    if params is not None:
        index = 0
        for p in params.named_children:
            if p.type != "parameter_declaration":
                continue
            d = p.child_by_field_name("declarator")
            if d is not None:
                name, depth, arr, _ = _declarator_shape(d)
                if name:
                    decls.setdefault(name, []).append(
                        _Decl(name, _type_text(parsed, p), depth, arr, p.start_byte, index, None,
                              end=p.end_byte, scope_end=function.end_byte))
            index += 1
    body = function.child_by_field_name("body")
    if body is None:
        return decls
    for node in index_.within("declaration", body):
        type_text = _type_text(parsed, node)
        for d in node.children_by_field_name("declarator"):
            name, depth, arr, init = _declarator_shape(d)
            if not name:
                continue
            decls.setdefault(name, []).append(_Decl(name, type_text, depth, arr, node.start_byte, None, init,
                                                    end=node.end_byte, scope_end=_scope_end(node)))
    # Names bound without a `declaration` node: lambda and catch parameters (scope: the lambda or the
    # handler) and range-for variables (scope: the loop). Unknown to the lookup they would pass for
    # globals, and a prefetch outside their scope would name them.
    for node in index_.within("parameter_declaration", body):
        d = node.child_by_field_name("declarator")
        owner = node.parent.parent if node.parent is not None else None
        if d is None or owner is None:
            continue
        name, depth, arr, _ = _declarator_shape(d)
        if name:
            scope = owner.parent if owner.type == "abstract_function_declarator" and owner.parent else owner
            decls.setdefault(name, []).append(_Decl(name, _type_text(parsed, node), depth, arr, node.start_byte,
                                                    None, None, end=node.end_byte, scope_end=scope.end_byte))
    for loop in index_.within("loop", body):
        d = loop.child_by_field_name("declarator") if loop.type == "for_range_loop" else None
        if d is None:
            continue
        name, depth, arr, _ = _declarator_shape(d)
        if name:
            decls.setdefault(name, []).append(_Decl(name, _type_text(parsed, loop), depth, arr, loop.start_byte,
                                                    None, None, end=d.end_byte, scope_end=loop.end_byte))
    # Locals initialized from a parameter (x = vx; q4 = x[i].qs) inherit its index: streams that come from
    # the first pointer argument (the weight row in ggml's vec_dot) are the default site.
    idents: dict[int, list[str]] = {}
    for _ in range(3):
        for items in decls.values():
            for i, d in enumerate(items):
                if d.param_index is None and d.init is not None:
                    if d.byte not in idents:
                        text = parsed.text(d.init)
                        idents[d.byte] = list(dict.fromkeys(_IDENT_RE.findall(text)))
                    for ident in idents[d.byte]:
                        src = _lookup(decls, ident, d.byte)
                        if src is not None and src.param_index is not None and (src.pointer_depth or src.is_array):
                            items[i] = replace(d, param_index=src.param_index)
                            break
    return decls


def _scope_end(declaration: Node) -> int:
    """End of the block a local declaration lives in: its compound statement, or the `for` whose
    initializer it is (`for (int i = 0; ...)`: i dies with the loop)."""
    current = declaration.parent
    if current is not None and current.type == "condition_clause" and current.parent is not None:
        return current.parent.end_byte  # if (int k = n) {...}: k lives in the if statement
    while current is not None:
        if current.type == "for_statement" and current == declaration.parent:
            return current.end_byte
        if current.type in ("compound_statement", "function_definition", "translation_unit"):
            return current.end_byte
        current = current.parent
    return declaration.end_byte


def _lookup(decls: dict[str, list[_Decl]], name: str, byte: int) -> _Decl | None:
    """The declaration of `name` in scope at `byte`: started before it, block not yet closed; the
    innermost (latest) such one wins, as in C's shadowing."""
    best = None
    for d in decls.get(name, ()):
        if d.byte <= byte < d.scope_end and (best is None or d.byte > best.byte):
            best = d
    return best


def _out_of_scope(names: set[str], use_byte: int, at_byte: int, decls: dict[str, list[_Decl]]) -> list[str]:
    """Those of `names` that do not mean the same declaration at `at_byte` (where a prefetch would go)
    as at `use_byte` (where the access is): declared later, in a nested block, or shadowed.
    Names the function never declares (globals, macros, enumerators) mean the same everywhere."""
    bad = []
    for name in sorted(names):
        if name not in decls:
            continue
        use = _lookup(decls, name, use_byte)
        here = _lookup(decls, name, at_byte)
        if use is None:
            continue  # not a local at the access either (a global the grammar saw as an identifier)
        if here is None or here != use or here.end > at_byte:
            bad.append(name)
    return bad


def _int_value(text: str | None) -> int | None:
    if text is None:
        return None
    m = _INT_RE.match(text.strip())
    return int(m.group(1)) if m else None


def _induction(parsed: ParsedFile, loop: Node) -> tuple[str | None, str | None]:
    """(induction variable, step expression) of a loop."""
    if loop.type == "for_statement":
        update = loop.child_by_field_name("update")
        updates = [update] if update is not None else []
        if update is not None and update.type == "comma_expression":
            updates = [c for c in update.named_children]
        for u in updates:
            got = _step_of(parsed, u)
            if got is not None:
                return got
        init = loop.child_by_field_name("initializer")
        if init is not None:
            ids = _identifiers(init)
            if len(ids) == 1:
                return ids.pop(), None
        return None, None
    if loop.type in ("while_statement", "do_statement"):
        cond = loop.child_by_field_name("condition")
        body = loop.child_by_field_name("body")
        if cond is None or body is None:
            return None, None
        names = _identifiers(cond)
        for node in _walk_same_loop(body):
            if node.type in ("update_expression", "assignment_expression"):
                got = _step_of(parsed, node)
                if got is not None and got[0] in names:
                    return got
    return None, None


def _step_of(parsed: ParsedFile, node: Node) -> tuple[str, str] | None:
    if node.type == "update_expression":
        arg = node.child_by_field_name("argument")
        if arg is not None and arg.type == "identifier":
            return parsed.text(arg), ("-1" if "--" in parsed.text(node) else "1")
    if node.type == "assignment_expression":
        left, right = node.child_by_field_name("left"), node.child_by_field_name("right")
        if left is None or right is None or left.type != "identifier":
            return None
        op = _operator(parsed, left, right)
        name = parsed.text(left)
        if op == "+=":
            return name, parsed.text(right)
        if op == "-=":
            return name, f"-({parsed.text(right)})"
        if op == "=" and right.type == "binary_expression":
            rl, rr = right.child_by_field_name("left"), right.child_by_field_name("right")
            rop = _operator(parsed, rl, rr) if rl and rr else ""
            if rop == "+" and rl is not None and rr is not None and parsed.text(rl) == name:
                return name, parsed.text(rr)
    return None


def _walk_same_loop(body: Node):
    """Nodes of a loop body that do not belong to a nested loop."""
    stack = [body]
    while stack:
        node = stack.pop()
        yield node
        for child in reversed(node.children):
            if child.type not in LOOP_TYPES:
                stack.append(child)


def _index_factor(index: str, var: str) -> int | None:
    """1 when `index` is `var` plus or minus a constant-looking term (x[ib], x[ib + 1]); None otherwise."""
    norm = normalize_expression(index)
    if norm == var:
        return 1
    if re.fullmatch(rf"{re.escape(var)}[+-][\w.]+", norm) or re.fullmatch(rf"[\w.]+\+{re.escape(var)}", norm):
        others = _IDENT_RE.findall(norm)
        if others.count(var) == 1:
            return 1
    return None


def _guard(parsed: ParsedFile, node: Node, stop: Node) -> str | None:
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


def _prefetches(parsed: ParsedFile, body: Node, index_: _NodeIndex) -> tuple[ExistingPrefetch, ...]:
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


def _unparenthesized(node: Node) -> Node:
    while node.type == "parenthesized_expression" and node.named_child_count == 1:
        node = node.named_children[0]
    return node


def _chain(parsed: ParsedFile, node: Node, op: str) -> list[Node]:
    """The operands of a chain of one binary operator through parentheses: a + (b + c*d) -> [a, b, c*d]."""
    node = _unparenthesized(node)
    if node.type == "binary_expression":
        left, right = node.child_by_field_name("left"), node.child_by_field_name("right")
        if left is not None and right is not None and \
                _operator(parsed, left, right) == op:
            return _chain(parsed, left, op) + _chain(parsed, right, op)
    return [node]


_BYTE_POINTEE = re.compile(r"(const\s+)?(volatile\s+)?((un)?signed\s+)?(char|void|u?int8_t)(\s+const)?")


def _pointer_scale(parsed: ParsedFile, pointer: Node, decls: dict[str, list[_Decl]]) -> str | None:
    """Bytes per unit of pointer arithmetic on `pointer`: "1" for char/void pointers, `sizeof(T)` for a cast
    to T *, `sizeof(*(p))` for a typed pointer variable; None when the type is not known here."""
    if pointer.type == "cast_expression":
        type_node = pointer.child_by_field_name("type")
        text = " ".join(parsed.text(type_node).split()) if type_node is not None else ""
        if not text.endswith("*") or text.endswith("**"):
            return None
        pointee = text[:-1].strip()
        return "1" if _BYTE_POINTEE.fullmatch(pointee) else f"sizeof({pointee})"
    if pointer.type == "identifier":
        decl = _lookup(decls, parsed.text(pointer), pointer.start_byte)
        if decl is None or decl.pointer_depth != 1 or decl.is_array:
            return None
        if _BYTE_POINTEE.fullmatch(" ".join(decl.type_text.split())):
            return "1"
        return f"sizeof(*({parsed.text(pointer)}))"
    return None


def _row_stride_bytes(parsed: ParsedFile, init: Node, var: str, step_value: int | None,
                      decls: dict[str, list[_Decl]]) -> str | None:
    """C expression of the bytes a row pointer `base + (var*stride + ...)` moves per loop iteration, or None
    unless that is certain: the pointer operand's type is known, `var` appears exactly once, as a plain
    factor of one summand (ic*nbk1, r*ne1*nb1), and the loop counts up by a known step."""
    if step_value is None or step_value <= 0:
        return None
    pointer, offsets = None, []
    for term in _chain(parsed, init, "+"):
        is_pointer = term.type == "cast_expression" or (
            term.type == "identifier" and _is_pointer(_lookup(decls, parsed.text(term), term.start_byte)))
        if pointer is None and is_pointer:
            pointer = term
        else:
            offsets.append(term)
    if pointer is None or var in _identifiers(pointer):
        return None
    stride = None
    for term in offsets:
        if var not in _identifiers(term):
            continue
        factors = _chain(parsed, term, "*")
        own = [f for f in factors if f.type == "identifier" and parsed.text(f) == var]
        rest = [f for f in factors if f not in own]
        if stride is not None or len(own) != 1 or any(var in _identifiers(f) for f in rest):
            return None  # var in two summands, or used another way (division, a call): not a plain stride
        stride = " * ".join(parsed.text(f) for f in rest) or "1"
    scale = _pointer_scale(parsed, pointer, decls)
    if stride is None or scale is None:
        return None
    per_step = stride if scale == "1" else f"({stride}) * {scale}"
    return per_step if step_value == 1 else f"{step_value} * ({per_step})"


def _line_indent(parsed: ParsedFile, node: Node) -> str:
    line_start = parsed.source.rfind(b"\n", 0, node.start_byte) + 1
    prefix = parsed.source[line_start : node.start_byte]
    return prefix.decode() if prefix.strip() == b"" else re.match(r"[ \t]*", prefix.decode()).group(0)


def _body_indent(parsed: ParsedFile, body: Node) -> str:
    for child in body.named_children:
        if child.type == "comment":
            continue
        line_start = parsed.source.rfind(b"\n", 0, child.start_byte) + 1
        prefix = parsed.source[line_start : child.start_byte]
        if prefix.strip() == b"":
            return prefix.decode()
        break
    line_start = parsed.source.rfind(b"\n", 0, body.start_byte) + 1
    lead = re.match(rb"[ \t]*", parsed.source[line_start:]).group(0).decode()
    return lead + "    "


def analyze_loops(parsed: ParsedFile, function: Node) -> list[Loop]:
    """Every loop of `function` with its induction variable, streams and existing prefetches."""
    index_ = _NodeIndex(parsed, function)
    decls = _collect_declarations(parsed, function, index_)
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
                  decls: dict[str, list[_Decl]], function: Node, index_: _NodeIndex) -> Loop:
    var, step = _induction(parsed, node)
    body = node.child_by_field_name("body")
    if node.type == "do_statement" and body is None:
        body = next((c for c in node.named_children if c.type == "compound_statement"), None)
    streams: dict[str, Stream] = {}
    unplaceable: dict[str, str] = {}
    if body is not None and var is not None:
        _find_streams(parsed, node, body, var, step, decls, streams, unplaceable, index_)
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
        step_value=_int_value(step), guard=_guard(parsed, node, function), streams=tuple(ordered),
        prefetches=_prefetches(parsed, body, index_) if body is not None else (), parse_error=parse_error,
        start_byte=node.start_byte, end_byte=node.end_byte,
        body_start_byte=body.start_byte if body is not None else node.end_byte,
        body_end_byte=body.end_byte if body is not None else node.end_byte,
        body_compound=body is not None and body.type == "compound_statement",
        body_indent=_body_indent(parsed, body) if body is not None else "    ",
        unplaceable=tuple(f"{expr}: {why}" for expr, why in unplaceable.items()),
    )


def _is_pointer(decl: _Decl | None) -> bool:
    """A pointer, or an array parameter. Local arrays (accumulators, register tiles) are not streams."""
    return decl is not None and (decl.pointer_depth > 0 or (decl.is_array and decl.param_index is not None))


def _element_type(decl: _Decl) -> str | None:
    if decl.pointer_depth > 1 or (decl.pointer_depth == 1 and decl.is_array):
        return None  # a pointer to pointers: the element is a pointer (size known but rarely a stream)
    t = decl.type_text.strip()
    if not t or t in ("void", "const void"):
        return None
    return t


def _find_streams(parsed: ParsedFile, loop: Node, body: Node, var: str, step: str | None,
                  decls: dict[str, list[_Decl]], streams: dict[str, Stream], unplaceable: dict[str, str],
                  index_: _NodeIndex) -> None:
    step_value = _int_value(step)
    # A prefetch is inserted as the first statement of the body: its address may only use names that
    # mean the same thing there (a stream like dst_col[iir0 + cn] whose dst_col and cn are declared
    # inside the body would not compile, or would silently read another variable if shadowed).
    top = body.start_byte + 1 if body.type == "compound_statement" else body.start_byte

    def placeable(node: Node, expression: str) -> bool:
        bad = _out_of_scope(_identifiers(node), node.start_byte, top, decls)
        if bad:
            unplaceable.setdefault(expression, f"uses {', '.join(bad)}, not declared (or another declaration) "
                                               "at the top of the loop body")
        return not bad

    def add(base: str, kind: str, expression: str, address: str, at: Node, factor: int | None,
            per_iter: str | None, note: str = "") -> None:
        decl = _lookup(decls, base, at.start_byte)
        existing = streams.get(base)
        line = at.start_point[0] + 1
        if existing is not None:
            if existing.kind == kind and expression not in existing.accesses:
                better = existing
                if kind == "indexed" and normalize_expression(expression).endswith(f"[{var}]"):
                    better = replace(existing, expression=expression, address=address)
                streams[base] = replace(better, accesses=(*existing.accesses, expression))
            return
        streams[base] = Stream(
            expression=expression, base=base, kind=kind, address=address, line=line, accesses=(expression,),
            element_type=_element_type(decl) if decl else None,
            elements_per_iteration=per_iter if factor == 1 or kind in ("bump",) else None,
            elements_per_iteration_value=(step_value if kind in ("indexed", "offset") and factor == 1 else None),
            param_index=decl.param_index if decl else None, note=note,
        )

    var_re = re.compile(rf"\b{re.escape(var)}\b")
    candidates = sorted(index_.within("subscript_expression", body) + index_.within("binary_expression", body),
                        key=lambda n: n.start_byte)
    for node in candidates:
        if node.type == "subscript_expression":
            arg = node.child_by_field_name("argument")
            index = node.child_by_field_name("index") or node.child_by_field_name("indices")
            if arg is None or index is None or arg.type != "identifier":
                continue
            index_text = parsed.text(index)
            if index.type == "subscript_argument_list":
                index_text = index_text.strip()[1:-1]
            if var not in _IDENT_RE.findall(index_text):
                continue
            base = parsed.text(arg)
            if base == var or not _is_pointer(_lookup(decls, base, node.start_byte)):
                continue
            expr = parsed.text(node)
            if not placeable(node, expr):
                continue
            add(base, "indexed", expr, f"&{expr}", node, _index_factor(index_text, var), step)
        elif node.type == "binary_expression":
            left, right = node.child_by_field_name("left"), node.child_by_field_name("right")
            if left is None or right is None:
                continue
            op = _operator(parsed, left, right)
            if op != "+":
                continue
            for ptr, off in ((left, right), (right, left)):
                if ptr.type == "identifier" and var_re.search(parsed.text(off)) and parsed.text(ptr) != var:
                    base = parsed.text(ptr)
                    if _is_pointer(_lookup(decls, base, node.start_byte)):
                        expr = parsed.text(node)
                        if not placeable(node, expr):
                            break
                        add(base, "offset", expr, expr, node, _index_factor(parsed.text(off), var), step)
                        break

    # Pointer bumps and row pointers belong to this loop only when they are not inside a nested loop.
    bumps: dict[str, list[tuple[str, Node]]] = {}
    own = sorted((n for kind in ("assignment_expression", "update_expression", "declaration")
                  for n in index_.within(kind, body)), key=lambda n: n.start_byte)
    for node in own:
        if index_.innermost_loop(node) != loop:
            continue  # inside a nested loop: that loop's bump or row pointer
        if node.type == "assignment_expression":
            left, right = node.child_by_field_name("left"), node.child_by_field_name("right")
            if left is None or right is None or left.type != "identifier":
                continue
            op = _operator(parsed, left, right)
            name = parsed.text(left)
            if op == "+=" and name != var and _is_pointer(_lookup(decls, name, node.start_byte)):
                bumps.setdefault(name, []).append((parsed.text(right), node))
        elif node.type == "update_expression":
            arg = node.child_by_field_name("argument")
            if arg is not None and arg.type == "identifier" and "++" in parsed.text(node):
                name = parsed.text(arg)
                if name != var and _is_pointer(_lookup(decls, name, node.start_byte)):
                    bumps.setdefault(name, []).append(("1", node))
        elif node.type == "declaration" and node != body:
            for d in node.children_by_field_name("declarator"):
                name, depth, arr, init = _declarator_shape(d)
                if not name or init is None or (depth == 0 and not arr):
                    continue
                if not var_re.search(parsed.text(init)):
                    continue
                # Derived from an indexed stream of this loop (q4 = x[i].qs): that stream covers it.
                if any(s.kind == "indexed" and s.base in _identifiers(init) for s in streams.values()):
                    continue
                row_decl = _lookup(decls, name, node.start_byte)
                if name not in streams and row_decl is not None:
                    # How far the row moves per iteration is usually a run-time stride (nb01): unknown here.
                    streams[name] = Stream(
                        expression=name, base=name, kind="row", address=name, line=node.start_point[0] + 1,
                        accesses=(parsed.text(init),), element_type=_element_type(row_decl),
                        param_index=row_decl.param_index,
                        note=f"row pointer set from the induction variable: {name} = {parsed.text(init)}",
                        insert_byte=node.end_byte, insert_indent=_line_indent(parsed, node),
                        row_stride=_row_stride_bytes(parsed, init, var, step_value, decls),
                    )
    _lambda_streams(parsed, loop, body, var, step, decls, streams, unplaceable, index_, top)
    for name, items in bumps.items():
        if name in streams:
            continue
        if _out_of_scope({name}, items[0][1].start_byte, top, decls):
            unplaceable.setdefault(name, f"the bumped pointer {name} is declared inside the loop body")
            continue
        decl = _lookup(decls, name, items[0][1].start_byte)
        amounts = [a for a, _ in items]
        total = " + ".join(f"({a})" if not re.fullmatch(r"\w+", a) else a for a in amounts)
        values = [_int_value(a) for a in amounts]
        at = items[0][1]
        streams[name] = Stream(
            expression=name, base=name, kind="bump", address=name, line=at.start_point[0] + 1,
            accesses=tuple(parsed.text(n) for _, n in items),
            element_type=_element_type(decl) if decl else None, elements_per_iteration=total,
            elements_per_iteration_value=sum(v for v in values if v is not None) if None not in values else None,
            param_index=decl.param_index if decl else None,
        )


# ggml's compile-time unroller (amx/common.h): Unroll<N>{}(f, args...) calls f(integral_constant<0>, args...)
# ... f(integral_constant<N-1>, args...). Its count is the template argument; the lambda comes first.
_UNROLL_CALLEE = re.compile(r"Unroll\s*<(?P<count>.+)>\s*\{\s*\}", re.S)
_WORD = re.compile(r"[A-Za-z_]\w*")


def _free_words(text: str):
    """Matches of the identifiers in `text` that are names, not members (after '.' or '->')."""
    return (m for m in _WORD.finditer(text) if not text[: m.start()].rstrip().endswith((".", "->")))


def _rename(text: str, mapping: dict[str, str]) -> str:
    """Replace whole identifiers (not members) by their mapping."""
    out, last = [], 0
    for m in _free_words(text):
        if m.group(0) in mapping:
            out.append(text[last : m.start()])
            out.append(mapping[m.group(0)])
            last = m.end()
    out.append(text[last:])
    return "".join(out)


def _free_names(text: str) -> set[str]:
    return {m.group(0) for m in _free_words(text)}


def _lambda_params(parsed: ParsedFile, lam: Node) -> list[str]:
    declarator = lam.child_by_field_name("declarator")
    params = declarator.child_by_field_name("parameters") if declarator is not None else None
    names = []
    for p in params.named_children if params is not None else []:
        d = p.child_by_field_name("declarator")
        name = _declarator_shape(d)[0] if d is not None else None
        names.append(name or "")
    return names


def _lambda_streams(parsed: ParsedFile, loop: Node, body: Node, var: str, step: str | None,
                    decls: dict[str, list[_Decl]], streams: dict[str, Stream], unplaceable: dict[str, str],
                    index_: _NodeIndex, top: int) -> None:
    """Tile streams: what a lambda called from this loop's body with the induction variable reads."""
    if step is None:
        return
    for call in index_.within("call_expression", body):
        if index_.innermost_loop(call) != loop:
            continue
        fn = call.child_by_field_name("function")
        arg_list = call.child_by_field_name("arguments")
        if fn is None or arg_list is None:
            continue
        args = [a for a in arg_list.named_children if a.type != "comment"]
        count = None
        m = _UNROLL_CALLEE.fullmatch(parsed.text(fn).strip()) if fn.type == "compound_literal_expression" else None
        if m and args and args[0].type == "identifier":
            lambda_name, passed = parsed.text(args[0]), args[1:]
            count = m.group("count").strip()
        elif fn.type == "identifier":
            lambda_name, passed = parsed.text(fn), args
        else:
            continue
        decl = _lookup(decls, lambda_name, call.start_byte)
        lam = decl.init if decl is not None else None
        if lam is None or lam.type != "lambda_expression" or lam.child_by_field_name("body") is None:
            continue
        params = _lambda_params(parsed, lam)
        mapping: dict[str, str] = {}
        if count is not None:
            if not params:
                continue
            mapping[params[0]] = UNROLL_INDEX
            params = params[1:]
        var_param = None
        for pname, arg in zip(params, passed, strict=False):
            text = parsed.text(arg)
            mapping[pname] = text if arg.type == "identifier" else f"({text})"
            if normalize_expression(text) == var:
                var_param = pname
        if var_param is None:
            continue  # the lambda does not get the induction variable: nothing in it moves with the loop
        _streams_in_lambda(parsed, lam, lambda_name, var, var_param, step, count, mapping, decls, streams,
                           unplaceable, top, call.start_byte)


def _streams_in_lambda(parsed: ParsedFile, lam: Node, lambda_name: str, var: str, var_param: str, step: str,
                       count: str | None, mapping: dict[str, str], decls: dict[str, list[_Decl]],
                       streams: dict[str, Stream], unplaceable: dict[str, str], top: int, call_byte: int) -> None:
    lbody = lam.child_by_field_name("body")
    assert lbody is not None
    # The lambda's own locals (constexpr int col = idx % COLS; const char * b_ptr = B + ...): inlined.
    local_inits: dict[str, str] = {}
    locals_seen: set[str] = set()
    for name, items in decls.items():
        for d in items:
            if lbody.start_byte <= d.byte < lbody.end_byte:
                locals_seen.add(name)
                if d.init is not None and name not in local_inits:
                    local_inits[name] = f"({parsed.text(d.init)})"
                elif d.init is None:
                    local_inits.pop(name, None)
    param_re = re.compile(rf"\b{re.escape(var_param)}\b")

    def rewrite(text: str, use_byte: int) -> tuple[str | None, list[str]]:
        """(address in the loop's names, names that would not mean the same at the loop top) — or
        (None, []) when a local of the lambda cannot be inlined."""
        for _ in range(6):  # locals defined from locals: a few rounds reach the lambda's parameters
            names = _free_names(text)
            inner = names & set(local_inits)
            if not inner:
                break
            text = _rename(text, {n: local_inits[n] for n in inner})
        if _free_names(text) & (locals_seen - set(mapping)):
            return None, []
        # captured names are looked up from inside the lambda; the call's arguments from the call site
        captured = _free_names(text) - set(mapping)
        passed = set().union(*(_free_names(v) for k, v in mapping.items() if k in _free_names(text))) - {UNROLL_INDEX}
        bad = _out_of_scope(captured, use_byte, top, decls) + _out_of_scope(passed, call_byte, top, decls)
        return _rename(text, mapping), sorted(set(bad))

    def derived_from_subscript(init: Node) -> bool:
        return any(n.type == "subscript_expression" and param_re.search(
            parsed.text(n.child_by_field_name("index") or n)) for n in walk(init))

    found: list[tuple[str, str, str, Node]] = []  # (base, expression, address in the lambda, node)
    for node in walk(lbody):
        if node.type == "declaration":
            for d in node.children_by_field_name("declarator"):
                name, depth, _arr, init = _declarator_shape(d)
                if name and init is not None and depth > 0 and param_re.search(parsed.text(init)) \
                        and not derived_from_subscript(init):  # q = x[i].qs: the subscript covers it
                    found.append((name, name, parsed.text(init), node))
        elif node.type == "subscript_expression":
            arg = node.child_by_field_name("argument")
            index = node.child_by_field_name("index") or node.child_by_field_name("indices")
            if arg is None or index is None or arg.type != "identifier" or not param_re.search(parsed.text(index)):
                continue
            if _is_pointer(_lookup(decls, parsed.text(arg), node.start_byte)):
                found.append((parsed.text(arg), parsed.text(node), f"&{parsed.text(node)}", node))
        elif node.type == "binary_expression" and not _is_sum_operand(parsed, node):
            terms = _chain(parsed, node, "+")
            first = terms[0]
            if len(terms) > 1 and first.type == "identifier" and \
                    any(param_re.search(parsed.text(t)) for t in terms[1:]) and \
                    _is_pointer(_lookup(decls, parsed.text(first), node.start_byte)):
                found.append((parsed.text(first), parsed.text(node), parsed.text(node), node))
    seen: set[str] = set()
    for base, expression, address, node in found:
        if base in seen or base in streams:
            continue
        if any(other is not node and other.start_byte <= node.start_byte and node.end_byte <= other.end_byte
               for _, _, _, other in found if other.type == "declaration"):
            continue  # the initializer of a row pointer found above (b_ptr = B + ...): one stream
        seen.add(base)
        rewritten, bad = rewrite(address, node.start_byte)
        if rewritten is None:
            unplaceable.setdefault(expression, f"in lambda {lambda_name}: uses its locals that cannot be inlined")
            continue
        if bad:
            unplaceable.setdefault(expression, f"in lambda {lambda_name}: {', '.join(bad)} not in scope at the "
                                               "top of the loop body")
            continue
        # Affine addressing (p + var*stride, PACKED_INDEX(col, i, ...)): the difference between the
        # addresses at var = step and var = 0 is the bytes per iteration, whatever var's actual value.
        at_zero = _rename(rewritten, {var: "0", UNROLL_INDEX: "0"})
        at_step = _rename(rewritten, {var: f"({step})", UNROLL_INDEX: "0"})
        tile_step = f"(long)((const char *)({at_step}) - (const char *)({at_zero}))"
        origin = _lookup(decls, base, node.start_byte)
        # a row pointer declared in the lambda: its parameter index is that of the pointer it derives from
        if origin is not None and lbody.start_byte <= origin.byte < lbody.end_byte:
            sources = [_lookup(decls, n, node.start_byte) for n in sorted(_free_names(address))]
            origin = next((d for d in sources if _is_pointer(d) and d.param_index is not None), origin)
        via = f"Unroll<{count}>{{}}({lambda_name}, ...)" if count is not None else f"{lambda_name}(...)"
        # every unrolled copy reads its own tile only if the address uses the index (A[i] is shared by all)
        copies = count if count is not None and UNROLL_INDEX in _free_names(rewritten) else None
        streams[base] = Stream(
            expression=expression, base=base, kind="tile", address=rewritten, line=node.start_point[0] + 1,
            accesses=(expression,), param_index=origin.param_index if origin is not None else None,
            element_type=_element_type(origin) if origin is not None else None,
            note=f"read by lambda {lambda_name} through {via}"
                 + (f"; one stream per unrolled index {UNROLL_INDEX} < {count}" if copies is not None else ""),
            tile_step=tile_step, unroll=copies,
        )


def _is_sum_operand(parsed: ParsedFile, node: Node) -> bool:
    """`node` is an operand of an enclosing '+' (only the whole sum A + row*K + k is a candidate)."""
    parent = node.parent
    while parent is not None and parent.type == "parenthesized_expression":
        parent = parent.parent
    if parent is None or parent.type != "binary_expression":
        return False
    left, right = parent.child_by_field_name("left"), parent.child_by_field_name("right")
    return left is not None and right is not None and _operator(parsed, left, right) == "+"
