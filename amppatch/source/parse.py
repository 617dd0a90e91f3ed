"""Parsing ggml sources with tree-sitter, after same-length blanking of macros that break the grammar.

tree-sitter sees the text before preprocessing, so qualifier-like macros (``GGML_RESTRICT`` between a ``*``
and a parameter name) and statement-like macros written without a semicolon (``GGML_TENSOR_BINARY_OP_LOCALS``)
turn whole declarations into ERROR nodes. Each such macro is overwritten with spaces of the same length:
every byte offset and line number of the parse is then valid for the original text, so edits computed on
the parse are spliced into the untouched original.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import tree_sitter_c
import tree_sitter_cpp
from tree_sitter import Language, Node, Parser, Tree

# Macros replaced by spaces before parsing. Qualifiers/attributes first, then statement-like macros that
# expand to declarations and are written without a trailing semicolon.
BLANKED_MACROS: tuple[str, ...] = (
    "GGML_RESTRICT",
    "RESTRICT",
    "GGML_CACHE_ALIGN",
    "GGML_TENSOR_UNARY_OP_LOCALS",
    "GGML_TENSOR_BINARY_OP_LOCALS",
    "GGML_TENSOR_TERNARY_OP_LOCALS",
    "GGML_TENSOR_LOCALS",
)
_BLANK_RE = re.compile(rb"\b(?:" + b"|".join(re.escape(m.encode()) for m in BLANKED_MACROS) + rb")\b")
# A GGML_TENSOR_LOCALS(...) style invocation carries an argument list that must go too (still same length).
_BLANK_CALL_RE = re.compile(rb"\bGGML_TENSOR_LOCALS\s*\([^()\n]*\)")

LOOP_TYPES = ("for_statement", "while_statement", "do_statement", "for_range_loop")


def blank_macros(source: bytes) -> bytes:
    """`source` with every grammar-breaking macro replaced by spaces of the same length."""
    out = _BLANK_CALL_RE.sub(lambda m: b" " * len(m.group(0)), source)
    out = _BLANK_RE.sub(lambda m: b" " * len(m.group(0)), out)
    assert len(out) == len(source)
    return out


@lru_cache(maxsize=2)
def language(name: str) -> Language:
    if name == "c":
        return Language(tree_sitter_c.language())
    if name == "cpp":
        return Language(tree_sitter_cpp.language())
    raise ValueError(f"unknown grammar {name!r}")


def default_grammar(path: Path) -> str:
    """C++ for .cpp/.cc/.h (ggml headers are shared with C++), C for .c."""
    return "c" if path.suffix == ".c" else "cpp"


@dataclass
class ParsedFile:
    """One parse of one file. `source` is the original text; `tree` is the parse of its blanked copy."""

    path: Path
    source: bytes
    grammar: str
    tree: Tree = field(repr=False)

    @property
    def root(self) -> Node:
        return self.tree.root_node

    def text(self, node: Node) -> str:
        """The node's text in the ORIGINAL source (not the blanked copy)."""
        return self.source[node.start_byte : node.end_byte].decode("utf-8", errors="replace")


def parse_bytes(source: bytes, grammar: str, path: Path = Path("<memory>")) -> ParsedFile:
    tree = Parser(language(grammar)).parse(blank_macros(source))
    return ParsedFile(path=path, source=source, grammar=grammar, tree=tree)


def parse_file(path: Path, grammar: str | None = None) -> ParsedFile:
    return parse_bytes(Path(path).read_bytes(), grammar or default_grammar(Path(path)), Path(path))


def error_nodes(node: Node) -> list[Node]:
    """ERROR and MISSING nodes under `node` (only descends where tree-sitter flags an error)."""
    found: list[Node] = []
    stack = [node]
    while stack:
        current = stack.pop()
        if current.type == "ERROR" or current.is_missing:
            found.append(current)
            continue
        if current.has_error:
            stack.extend(current.children)
    return found


def walk(node: Node) -> Iterator[Node]:
    """Pre-order over `node` and all its descendants (iterative: kernels nest deeply)."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(current.children))


def function_name(definition: Node) -> str | None:
    """The plain name of a function_definition (through pointer/attribute declarators), or None."""
    declarator = definition.child_by_field_name("declarator")
    while declarator is not None and declarator.type != "function_declarator":
        declarator = declarator.child_by_field_name("declarator")
    if declarator is None:
        return None
    inner = declarator.child_by_field_name("declarator")
    if inner is None or inner.type not in ("identifier", "field_identifier", "qualified_identifier"):
        return None
    name = inner.text.decode() if inner.text is not None else None
    if name and "::" in name:
        name = name.rsplit("::", 1)[1]
    return name


def find_function_definitions(parsed: ParsedFile, name: str) -> list[Node]:
    """All function_definition nodes named `name` (several when #if branches define it differently)."""
    return [node for node in function_definitions(parsed.root) if function_name(node) == name]


def function_definitions(root: Node) -> list[Node]:
    """Every function_definition, without descending into function bodies (fast on 10k-line files)."""
    found: list[Node] = []
    stack = [root]
    while stack:
        current = stack.pop()
        for child in current.children:
            if child.type == "function_definition":
                found.append(child)
            elif child.child_count and child.type not in ("compound_statement", "preproc_def",
                                                           "preproc_function_def", "comment"):
                stack.append(child)
    found.sort(key=lambda n: n.start_byte)
    return found
