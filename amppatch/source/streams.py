"""The streams a loop walks with its induction variable, found in its own body: ``indexed`` (``x[ib]``),
``offset`` (``x + i``), ``row`` pointers declared from the induction variable, and ``bump`` pointers
advanced by the body; a lambda called with the induction variable adds ``tile`` streams
(`amppatch.source.lambdas`). Every address is checked to mean the same at the top of the body, where the
prefetch goes; those that do not are reported as unplaceable instead.
"""

from __future__ import annotations

import re
from dataclasses import replace

from tree_sitter import Node

from amppatch.source.context import LoopContext
from amppatch.source.lambdas import tile_streams
from amppatch.source.parse import ParsedFile
from amppatch.source.records import Stream, normalize_expression
from amppatch.source.scope import Decl, is_pointer_decl, lookup, pointee_type
from amppatch.source.syntax import (
    IDENT_RE,
    binary_operator,
    declarator_shape,
    identifiers,
    int_value,
    line_indent,
    operand_chain,
)

_BYTE_POINTEE = re.compile(r"(const\s+)?(volatile\s+)?((un)?signed\s+)?(char|void|u?int8_t)(\s+const)?")


def find_streams(ctx: LoopContext) -> None:
    """Fill `ctx.streams` and `ctx.unplaceable` for the loop. The order is the precedence: an indexed or
    offset access of a base wins over a row pointer or a lambda's tile of it, and any of them over a bump
    (`q4 += 32` of a pointer also read as q4[i])."""
    _indexed_and_offset(ctx)
    bumps = _rows_and_bumps(ctx)
    tile_streams(ctx)
    _bump_streams(ctx, bumps)


def _placeable(ctx: LoopContext, node: Node, expression: str) -> bool:
    """A prefetch is inserted as the first statement of the body: its address may only use names that
    mean the same thing there (a stream like dst_col[iir0 + cn] whose dst_col and cn are declared inside
    the body would not compile, or would silently read another variable if shadowed)."""
    bad = ctx.out_of_scope(identifiers(node), node.start_byte)
    if bad:
        ctx.unplaceable.setdefault(expression, f"uses {', '.join(bad)}, not declared (or another declaration) "
                                               "at the top of the loop body")
    return not bad


def _add(ctx: LoopContext, base: str, kind: str, expression: str, address: str, at: Node, factor: int | None,
         per_iter: str | None, note: str = "") -> None:
    """Record an access of `base`: a new stream, or one more access of the stream already found for it
    (an indexed stream is named by its plain `x[var]` access when it has one)."""
    decl = ctx.lookup(base, at.start_byte)
    existing = ctx.streams.get(base)
    line = at.start_point[0] + 1
    if existing is not None:
        if existing.kind == kind and expression not in existing.accesses:
            better = existing
            if kind == "indexed" and normalize_expression(expression).endswith(f"[{ctx.var}]"):
                better = replace(existing, expression=expression, address=address)
            ctx.streams[base] = replace(better, accesses=(*existing.accesses, expression))
        return
    ctx.streams[base] = Stream(
        expression=expression, base=base, kind=kind, address=address, line=line, accesses=(expression,),
        element_type=pointee_type(decl) if decl else None,
        elements_per_iteration=per_iter if factor == 1 or kind in ("bump",) else None,
        elements_per_iteration_value=(ctx.step_value if kind in ("indexed", "offset") and factor == 1 else None),
        param_index=decl.param_index if decl else None, note=note,
    )


def _indexed_and_offset(ctx: LoopContext) -> None:
    """`x[... var ...]` subscripts and `x + ... var ...` sums of a pointer, anywhere in the body (nested
    loops included: an inner loop's x[ib*4 + j] still moves with ib)."""
    candidates = sorted(ctx.index.within("subscript_expression", ctx.body)
                        + ctx.index.within("binary_expression", ctx.body), key=lambda n: n.start_byte)
    for node in candidates:
        if node.type == "subscript_expression":
            _indexed(ctx, node)
        elif node.type == "binary_expression":
            _offset(ctx, node)


def _indexed(ctx: LoopContext, node: Node) -> None:
    """`x[... var ...]` of a pointer (or array parameter) `x`: an indexed stream of `x`."""
    parsed, var = ctx.parsed, ctx.var
    arg = node.child_by_field_name("argument")
    index = node.child_by_field_name("index") or node.child_by_field_name("indices")
    if arg is None or index is None or arg.type != "identifier":
        return
    index_text = parsed.text(index)
    if index.type == "subscript_argument_list":
        index_text = index_text.strip()[1:-1]
    if var not in IDENT_RE.findall(index_text):
        return
    base = parsed.text(arg)
    if base == var or not is_pointer_decl(ctx.lookup(base, node.start_byte)):
        return
    expr = parsed.text(node)
    if not _placeable(ctx, node, expr):
        return
    _add(ctx, base, "indexed", expr, f"&{expr}", node, _index_factor(index_text, var), ctx.step)


def _offset(ctx: LoopContext, node: Node) -> None:
    """`x + ... var ...` (either operand order) of a pointer `x`: an offset stream of `x`."""
    parsed, var = ctx.parsed, ctx.var
    left, right = node.child_by_field_name("left"), node.child_by_field_name("right")
    if left is None or right is None:
        return
    if binary_operator(parsed, left, right) != "+":
        return
    for ptr, off in ((left, right), (right, left)):
        if ptr.type == "identifier" and ctx.var_re.search(parsed.text(off)) and parsed.text(ptr) != var:
            base = parsed.text(ptr)
            if is_pointer_decl(ctx.lookup(base, node.start_byte)):
                expr = parsed.text(node)
                if not _placeable(ctx, node, expr):
                    break
                _add(ctx, base, "offset", expr, expr, node, _index_factor(parsed.text(off), var), ctx.step)
                break


def _rows_and_bumps(ctx: LoopContext) -> dict[str, list[tuple[str, Node]]]:
    """Row pointers (added to the streams) and pointer bumps (returned: base -> [(amount, node)], added
    last). Both belong to this loop only when they are not inside a nested loop."""
    parsed, var = ctx.parsed, ctx.var
    bumps: dict[str, list[tuple[str, Node]]] = {}
    own = sorted((n for kind in ("assignment_expression", "update_expression", "declaration")
                  for n in ctx.index.within(kind, ctx.body)), key=lambda n: n.start_byte)
    for node in own:
        if ctx.index.innermost_loop(node) != ctx.loop:
            continue  # inside a nested loop: that loop's bump or row pointer
        if node.type == "assignment_expression":
            left, right = node.child_by_field_name("left"), node.child_by_field_name("right")
            if left is None or right is None or left.type != "identifier":
                continue
            op = binary_operator(parsed, left, right)
            name = parsed.text(left)
            if op == "+=" and name != var and is_pointer_decl(ctx.lookup(name, node.start_byte)):
                bumps.setdefault(name, []).append((parsed.text(right), node))
        elif node.type == "update_expression":
            arg = node.child_by_field_name("argument")
            if arg is not None and arg.type == "identifier" and "++" in parsed.text(node):
                name = parsed.text(arg)
                if name != var and is_pointer_decl(ctx.lookup(name, node.start_byte)):
                    bumps.setdefault(name, []).append(("1", node))
        elif node.type == "declaration" and node != ctx.body:
            _row_pointers(ctx, node)
    return bumps


def _row_pointers(ctx: LoopContext, node: Node) -> None:
    """Pointers the declaration `node` sets from the induction variable (row = base + r*stride)."""
    parsed, var = ctx.parsed, ctx.var
    for d in node.children_by_field_name("declarator"):
        name, depth, arr, init = declarator_shape(d)
        if not name or init is None or (depth == 0 and not arr):
            continue
        if not ctx.var_re.search(parsed.text(init)):
            continue
        # Derived from an indexed stream of this loop (q4 = x[i].qs): that stream covers it.
        if any(s.kind == "indexed" and s.base in identifiers(init) for s in ctx.streams.values()):
            continue
        row_decl = ctx.lookup(name, node.start_byte)
        if name not in ctx.streams and row_decl is not None:
            # How far the row moves per iteration is usually a run-time stride (nb01): unknown here.
            ctx.streams[name] = Stream(
                expression=name, base=name, kind="row", address=name, line=node.start_point[0] + 1,
                accesses=(parsed.text(init),), element_type=pointee_type(row_decl),
                param_index=row_decl.param_index,
                note=f"row pointer set from the induction variable: {name} = {parsed.text(init)}",
                insert_byte=node.end_byte, insert_indent=line_indent(parsed, node),
                row_stride=_row_stride_bytes(parsed, init, var, ctx.step_value, ctx.decls),
            )


def _bump_streams(ctx: LoopContext, bumps: dict[str, list[tuple[str, Node]]]) -> None:
    """One stream per bumped pointer not already a stream; it moves by the sum of its bumps."""
    parsed = ctx.parsed
    for name, items in bumps.items():
        if name in ctx.streams:
            continue
        if ctx.out_of_scope({name}, items[0][1].start_byte):
            ctx.unplaceable.setdefault(name, f"the bumped pointer {name} is declared inside the loop body")
            continue
        decl = ctx.lookup(name, items[0][1].start_byte)
        amounts = [a for a, _ in items]
        total = " + ".join(f"({a})" if not re.fullmatch(r"\w+", a) else a for a in amounts)
        values = [int_value(a) for a in amounts]
        at = items[0][1]
        ctx.streams[name] = Stream(
            expression=name, base=name, kind="bump", address=name, line=at.start_point[0] + 1,
            accesses=tuple(parsed.text(n) for _, n in items),
            element_type=pointee_type(decl) if decl else None, elements_per_iteration=total,
            elements_per_iteration_value=sum(v for v in values if v is not None) if None not in values else None,
            param_index=decl.param_index if decl else None,
        )


def _index_factor(index: str, var: str) -> int | None:
    """1 when `index` is `var` plus or minus a constant-looking term (x[ib], x[ib + 1]); None otherwise."""
    norm = normalize_expression(index)
    if norm == var:
        return 1
    if re.fullmatch(rf"{re.escape(var)}[+-][\w.]+", norm) or re.fullmatch(rf"[\w.]+\+{re.escape(var)}", norm):
        others = IDENT_RE.findall(norm)
        if others.count(var) == 1:
            return 1
    return None


def _pointer_scale(parsed: ParsedFile, pointer: Node, decls: dict[str, list[Decl]]) -> str | None:
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
        decl = lookup(decls, parsed.text(pointer), pointer.start_byte)
        if decl is None or decl.pointer_depth != 1 or decl.is_array:
            return None
        if _BYTE_POINTEE.fullmatch(" ".join(decl.type_text.split())):
            return "1"
        return f"sizeof(*({parsed.text(pointer)}))"
    return None


def _row_stride_bytes(parsed: ParsedFile, init: Node, var: str, step_value: int | None,
                      decls: dict[str, list[Decl]]) -> str | None:
    """C expression of the bytes a row pointer `base + (var*stride + ...)` moves per loop iteration, or None
    unless that is certain: the pointer operand's type is known, `var` appears exactly once, as a plain
    factor of one summand (ic*nbk1, r*ne1*nb1), and the loop counts up by a known step."""
    if step_value is None or step_value <= 0:
        return None
    pointer, offsets = None, []
    for term in operand_chain(parsed, init, "+"):
        is_pointer = term.type == "cast_expression" or (
            term.type == "identifier" and is_pointer_decl(lookup(decls, parsed.text(term), term.start_byte)))
        if pointer is None and is_pointer:
            pointer = term
        else:
            offsets.append(term)
    if pointer is None or var in identifiers(pointer):
        return None
    stride = None
    for term in offsets:
        if var not in identifiers(term):
            continue
        factors = operand_chain(parsed, term, "*")
        own = [f for f in factors if f.type == "identifier" and parsed.text(f) == var]
        rest = [f for f in factors if f not in own]
        if stride is not None or len(own) != 1 or any(var in identifiers(f) for f in rest):
            return None  # var in two summands, or used another way (division, a call): not a plain stride
        stride = " * ".join(parsed.text(f) for f in rest) or "1"
    scale = _pointer_scale(parsed, pointer, decls)
    if stride is None or scale is None:
        return None
    per_step = stride if scale == "1" else f"({stride}) * {scale}"
    return per_step if step_value == 1 else f"{step_value} * ({per_step})"
