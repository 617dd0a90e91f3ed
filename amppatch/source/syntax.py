"""Tree-sitter helpers every loop analysis shares: one indexed query per function, and small readings of
expressions and declarators (operators, operand chains, declarator shapes, indentation).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from functools import lru_cache

from tree_sitter import Node, Query, QueryCursor

from amppatch.source.parse import LOOP_TYPES, ParsedFile, language, walk
from amppatch.source.records import MARKER_WORD

IDENT_RE = re.compile(r"[A-Za-z_]\w*")
_INT_RE = re.compile(r"^\(?\s*(\d+)[uUlL]*\s*\)?$")

NODE_KINDS = ("subscript_expression", "binary_expression", "call_expression", "declaration",
              "assignment_expression", "update_expression", "parameter_declaration")


@lru_cache(maxsize=4)
def _index_query(grammar: str) -> Query:
    """One query capturing every loop and every node kind of NODE_KINDS (compiled once per grammar)."""
    loops = " ".join(f"({t}) @loop" for t in LOOP_TYPES if t != "for_range_loop" or grammar == "cpp")
    kinds = " ".join(f"({t}) @{t}" for t in NODE_KINDS)
    return Query(language(grammar), f"{loops} {kinds}")


class NodeIndex:
    """Every node of interest in a function, found by one tree-sitter query (C speed, not a Python walk),
    sorted by position so each loop takes its slice with a binary search."""

    def __init__(self, parsed: ParsedFile, function: Node) -> None:
        caps = QueryCursor(_index_query(parsed.grammar)).captures(function)
        self.by_kind: dict[str, list[Node]] = {}
        self.starts: dict[str, list[int]] = {}
        marked = _marked_line_starts(parsed.source, function.start_byte, function.end_byte)
        for kind in ("loop", *NODE_KINDS):
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
        """The nodes of `kind` inside `node` (itself included), in source order."""
        starts = self.starts[kind]
        lo = bisect_left(starts, node.start_byte)
        hi = bisect_left(starts, node.end_byte)
        return [n for n in self.by_kind[kind][lo:hi] if n.end_byte <= node.end_byte]

    def innermost_loop(self, node: Node) -> Node | None:
        """The innermost loop strictly enclosing `node` (None: not inside a loop of the function)."""
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


def binary_operator(parsed: ParsedFile, left: Node, right: Node) -> str:
    """The operator between the two operands of a binary or assignment expression ('+', '+=', ...)."""
    return parsed.source[left.end_byte : right.start_byte].decode().strip()


def identifiers(node: Node) -> set[str]:
    """Every identifier under `node` (members after '.' or '->' are field_identifiers, not counted)."""
    return {n.text.decode() for n in walk(node) if n.type == "identifier" and n.text is not None}


def declarator_shape(node: Node) -> tuple[str | None, int, bool, Node | None]:
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


def declared_type(parsed: ParsedFile, decl: Node) -> str:
    """The type a declaration or parameter names, with its qualifiers: "const block_q8_0"."""
    type_node = decl.child_by_field_name("type")
    if type_node is None:
        return ""
    quals = [parsed.text(c) for c in decl.children if c.type == "type_qualifier" and c.end_byte <= type_node.start_byte]
    quals += [parsed.text(c) for c in decl.children if c.type == "type_qualifier" and c.start_byte >= type_node.end_byte
              and c.start_byte < (decl.child_by_field_name("declarator") or type_node).start_byte]
    return " ".join([*quals, parsed.text(type_node)])


def int_value(text: str | None) -> int | None:
    """The value of an integer literal ("32", "(4u)"), or None for anything else (macros, expressions)."""
    if text is None:
        return None
    m = _INT_RE.match(text.strip())
    return int(m.group(1)) if m else None


def unparenthesized(node: Node) -> Node:
    """`node` without the parentheses around it."""
    while node.type == "parenthesized_expression" and node.named_child_count == 1:
        node = node.named_children[0]
    return node


def operand_chain(parsed: ParsedFile, node: Node, op: str) -> list[Node]:
    """The operands of a chain of one binary operator through parentheses: a + (b + c*d) -> [a, b, c*d]."""
    node = unparenthesized(node)
    if node.type == "binary_expression":
        left, right = node.child_by_field_name("left"), node.child_by_field_name("right")
        if left is not None and right is not None and \
                binary_operator(parsed, left, right) == op:
            return operand_chain(parsed, left, op) + operand_chain(parsed, right, op)
    return [node]


def line_indent(parsed: ParsedFile, node: Node) -> str:
    """The indentation of the line `node` starts on (what a statement inserted after it gets)."""
    line_start = parsed.source.rfind(b"\n", 0, node.start_byte) + 1
    prefix = parsed.source[line_start : node.start_byte]
    if prefix.strip() == b"":
        return prefix.decode()
    text = prefix.decode()
    return text[: len(text) - len(text.lstrip(" \t"))]
