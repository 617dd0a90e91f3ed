"""Which names are in scope where: every declaration of a function (parameters, locals, lambda and catch
parameters, range-for variables) with the block it lives in, looked up by byte offset as C shadowing does.

A prefetch goes at the top of a loop body, away from the access it prefetches: its address may only use
names that mean the same declaration there (`out_of_scope`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tree_sitter import Node

from amppatch.source.parse import ParsedFile
from amppatch.source.syntax import IDENT_RE, NodeIndex, declarator_shape, declared_type


@dataclass(frozen=True)
class Decl:
    """One declaration of a name, with where it starts, where it becomes usable and where its block ends."""

    name: str
    type_text: str
    pointer_depth: int
    is_array: bool
    byte: int  # where the declaration starts
    param_index: int | None
    init: Node | None
    end: int = 0  # where the declaration statement ends (the name is usable after it)
    scope_end: int = 0  # where its block ends (the name is out of scope from there on)


def collect_declarations(parsed: ParsedFile, function: Node, index_: NodeIndex) -> dict[str, list[Decl]]:
    """Every declaration in `function` by name (a name declared in several blocks has several)."""
    decls: dict[str, list[Decl]] = {}
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
                name, depth, arr, _ = declarator_shape(d)
                if name:
                    decls.setdefault(name, []).append(
                        Decl(name, declared_type(parsed, p), depth, arr, p.start_byte, index, None,
                             end=p.end_byte, scope_end=function.end_byte))
            index += 1
    body = function.child_by_field_name("body")
    if body is None:
        return decls
    for node in index_.within("declaration", body):
        type_text = declared_type(parsed, node)
        for d in node.children_by_field_name("declarator"):
            name, depth, arr, init = declarator_shape(d)
            if not name:
                continue
            decls.setdefault(name, []).append(Decl(name, type_text, depth, arr, node.start_byte, None, init,
                                                   end=node.end_byte, scope_end=_scope_end(node)))
    # Names bound without a `declaration` node: lambda and catch parameters (scope: the lambda or the
    # handler) and range-for variables (scope: the loop). Unknown to the lookup they would pass for
    # globals, and a prefetch outside their scope would name them.
    for node in index_.within("parameter_declaration", body):
        d = node.child_by_field_name("declarator")
        owner = node.parent.parent if node.parent is not None else None
        if d is None or owner is None:
            continue
        name, depth, arr, _ = declarator_shape(d)
        if name:
            scope = owner.parent if owner.type == "abstract_function_declarator" and owner.parent else owner
            decls.setdefault(name, []).append(Decl(name, declared_type(parsed, node), depth, arr, node.start_byte,
                                                   None, None, end=node.end_byte, scope_end=scope.end_byte))
    for loop in index_.within("loop", body):
        d = loop.child_by_field_name("declarator") if loop.type == "for_range_loop" else None
        if d is None:
            continue
        name, depth, arr, _ = declarator_shape(d)
        if name:
            decls.setdefault(name, []).append(Decl(name, declared_type(parsed, loop), depth, arr, loop.start_byte,
                                                   None, None, end=d.end_byte, scope_end=loop.end_byte))
    # Locals initialized from a parameter (x = vx; q4 = x[i].qs) inherit its index: streams that come from
    # the first pointer argument (the weight row in ggml's vec_dot) are the default site.
    idents: dict[int, list[str]] = {}
    for _ in range(3):
        for items in decls.values():
            for i, decl in enumerate(items):
                if decl.param_index is None and decl.init is not None:
                    if decl.byte not in idents:
                        text = parsed.text(decl.init)
                        idents[decl.byte] = list(dict.fromkeys(IDENT_RE.findall(text)))
                    for ident in idents[decl.byte]:
                        src = lookup(decls, ident, decl.byte)
                        if src is not None and src.param_index is not None and (src.pointer_depth or src.is_array):
                            items[i] = replace(decl, param_index=src.param_index)
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


def lookup(decls: dict[str, list[Decl]], name: str, byte: int) -> Decl | None:
    """The declaration of `name` in scope at `byte`: started before it, block not yet closed; the
    innermost (latest) such one wins, as in C's shadowing."""
    best = None
    for d in decls.get(name, ()):
        if d.byte <= byte < d.scope_end and (best is None or d.byte > best.byte):
            best = d
    return best


def out_of_scope(names: set[str], use_byte: int, at_byte: int, decls: dict[str, list[Decl]]) -> list[str]:
    """Those of `names` that do not mean the same declaration at `at_byte` (where a prefetch would go)
    as at `use_byte` (where the access is): declared later, in a nested block, or shadowed.
    Names the function never declares (globals, macros, enumerators) mean the same everywhere."""
    bad = []
    for name in sorted(names):
        if name not in decls:
            continue
        use = lookup(decls, name, use_byte)
        here = lookup(decls, name, at_byte)
        if use is None:
            continue  # not a local at the access either (a global the grammar saw as an identifier)
        if here is None or here != use or here.end > at_byte:
            bad.append(name)
    return bad


def is_pointer_decl(decl: Decl | None) -> bool:
    """A pointer, or an array parameter. Local arrays (accumulators, register tiles) are not streams."""
    return decl is not None and (decl.pointer_depth > 0 or (decl.is_array and decl.param_index is not None))


def pointee_type(decl: Decl) -> str | None:
    """The element type a pointer (or array) declaration walks: "const block_q8_0"; None for void and
    pointers to pointers."""
    if decl.pointer_depth > 1 or (decl.pointer_depth == 1 and decl.is_array):
        return None  # a pointer to pointers: the element is a pointer (size known but rarely a stream)
    t = decl.type_text.strip()
    if not t or t in ("void", "const void"):
        return None
    return t
