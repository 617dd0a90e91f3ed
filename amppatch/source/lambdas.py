"""Tile streams: memory a lambda reads when the loop body calls it with the induction variable, directly
(``f(i)``) or once per unrolled index (``Unroll<N>{}(f, i)``, ggml's AMX kernels: one packed tile per
column per iteration).

The address is the lambda's, rewritten in the loop's names: its parameters replaced by the call's
arguments, the unrolled index by ``amppatch_u`` (`UNROLL_INDEX`), its own locals inlined. The bytes one
iteration moves are the difference of that address at induction value `step` and at 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from tree_sitter import Node

from amppatch.source.context import LoopContext
from amppatch.source.parse import ParsedFile, walk
from amppatch.source.records import UNROLL_INDEX, Stream, normalize_expression
from amppatch.source.scope import is_pointer_decl, pointee_type
from amppatch.source.syntax import binary_operator, declarator_shape, operand_chain

# ggml's compile-time unroller (amx/common.h): Unroll<N>{}(f, args...) calls f(integral_constant<0>, args...)
# ... f(integral_constant<N-1>, args...). Its count is the template argument; the lambda comes first.
_UNROLL_CALLEE = re.compile(r"Unroll\s*<(?P<count>.+)>\s*\{\s*\}", re.S)
_WORD = re.compile(r"[A-Za-z_]\w*")


@dataclass(frozen=True)
class LambdaCall:
    """A call in the loop body of a lambda that receives the induction variable."""

    name: str  # the variable holding the lambda
    lam: Node  # its lambda_expression
    body: Node  # the lambda's body
    var_param: str  # the parameter that receives the induction variable
    count: str | None  # Unroll's count (C expression); None: a direct call
    mapping: dict[str, str]  # lambda parameter -> what the call passes (the unrolled index: UNROLL_INDEX)
    call_byte: int  # where the call is (the arguments' names are looked up there)
    local_inits: dict[str, str]  # the lambda's locals -> their parenthesized initializer, to inline
    locals_seen: frozenset[str]  # every name the lambda declares (a local left after inlining: no address)


def tile_streams(ctx: LoopContext) -> None:
    """Add the tile streams of every lambda this loop's own body (not a nested loop) calls with the
    induction variable."""
    if ctx.step is None:
        return
    for call in ctx.index.within("call_expression", ctx.body):
        if ctx.index.innermost_loop(call) != ctx.loop:
            continue
        lambda_call = _lambda_call(ctx, call)
        if lambda_call is not None:
            _streams_in_lambda(ctx, lambda_call)


def _lambda_call(ctx: LoopContext, call: Node) -> LambdaCall | None:
    """`call` as a call of a local lambda that gets the induction variable, or None."""
    parsed = ctx.parsed
    fn = call.child_by_field_name("function")
    arg_list = call.child_by_field_name("arguments")
    if fn is None or arg_list is None:
        return None
    args = [a for a in arg_list.named_children if a.type != "comment"]
    count = None
    m = _UNROLL_CALLEE.fullmatch(parsed.text(fn).strip()) if fn.type == "compound_literal_expression" else None
    if m and args and args[0].type == "identifier":
        lambda_name, passed = parsed.text(args[0]), args[1:]
        count = m.group("count").strip()
    elif fn.type == "identifier":
        lambda_name, passed = parsed.text(fn), args
    else:
        return None
    decl = ctx.lookup(lambda_name, call.start_byte)
    lam = decl.init if decl is not None else None
    lbody = lam.child_by_field_name("body") if lam is not None and lam.type == "lambda_expression" else None
    if lam is None or lbody is None:
        return None
    params = _lambda_params(parsed, lam)
    mapping: dict[str, str] = {}
    if count is not None:
        if not params:
            return None
        mapping[params[0]] = UNROLL_INDEX
        params = params[1:]
    var_param = None
    for pname, arg in zip(params, passed, strict=False):
        text = parsed.text(arg)
        mapping[pname] = text if arg.type == "identifier" else f"({text})"
        if normalize_expression(text) == ctx.var:
            var_param = pname
    if var_param is None:
        return None  # the lambda does not get the induction variable: nothing in it moves with the loop
    local_inits, locals_seen = _lambda_locals(ctx, lbody)
    return LambdaCall(lambda_name, lam, lbody, var_param, count, mapping, call.start_byte, local_inits,
                      frozenset(locals_seen))


def _lambda_params(parsed: ParsedFile, lam: Node) -> list[str]:
    """The lambda's parameter names in order ("" for an unnamed one)."""
    declarator = lam.child_by_field_name("declarator")
    params = declarator.child_by_field_name("parameters") if declarator is not None else None
    names = []
    for p in params.named_children if params is not None else []:
        d = p.child_by_field_name("declarator")
        name = declarator_shape(d)[0] if d is not None else None
        names.append(name or "")
    return names


def _lambda_locals(ctx: LoopContext, lbody: Node) -> tuple[dict[str, str], set[str]]:
    """The lambda's own locals (constexpr int col = idx % COLS; const char * b_ptr = B + ...): their
    initializers, to inline into an address, and every name it declares."""
    local_inits: dict[str, str] = {}
    locals_seen: set[str] = set()
    for name, items in ctx.decls.items():
        for d in items:
            if lbody.start_byte <= d.byte < lbody.end_byte:
                locals_seen.add(name)
                if d.init is not None and name not in local_inits:
                    local_inits[name] = f"({ctx.parsed.text(d.init)})"
                elif d.init is None:
                    local_inits.pop(name, None)
    return local_inits, locals_seen


def _streams_in_lambda(ctx: LoopContext, call: LambdaCall) -> None:
    """One tile stream per base pointer the lambda reads with the parameter that gets the induction
    variable, when its address can be written at the top of the loop body."""
    found = _accesses(ctx, call)
    seen: set[str] = set()
    for base, expression, address, node in found:
        if base in seen or base in ctx.streams:
            continue
        if any(other is not node and other.start_byte <= node.start_byte and node.end_byte <= other.end_byte
               for _, _, _, other in found if other.type == "declaration"):
            continue  # the initializer of a row pointer found above (b_ptr = B + ...): one stream
        seen.add(base)
        rewritten, bad = _rewrite(ctx, call, address, node.start_byte)
        if rewritten is None:
            ctx.unplaceable.setdefault(expression, f"in lambda {call.name}: uses its locals that cannot be inlined")
            continue
        if bad:
            ctx.unplaceable.setdefault(expression, f"in lambda {call.name}: {', '.join(bad)} not in scope at the "
                                                   "top of the loop body")
            continue
        ctx.streams[base] = _tile_stream(ctx, call, base, expression, address, rewritten, node)


def _accesses(ctx: LoopContext, call: LambdaCall) -> list[tuple[str, str, str, Node]]:
    """(base, expression, address in the lambda's names, node) of what the lambda reads with the
    parameter that gets the induction variable: pointers declared from it, subscripts and sums."""
    parsed = ctx.parsed
    param_re = re.compile(rf"\b{re.escape(call.var_param)}\b")

    def derived_from_subscript(init: Node) -> bool:
        return any(n.type == "subscript_expression" and param_re.search(
            parsed.text(n.child_by_field_name("index") or n)) for n in walk(init))

    found: list[tuple[str, str, str, Node]] = []
    for node in walk(call.body):
        if node.type == "declaration":
            for d in node.children_by_field_name("declarator"):
                name, depth, _arr, init = declarator_shape(d)
                if name and init is not None and depth > 0 and param_re.search(parsed.text(init)) \
                        and not derived_from_subscript(init):  # q = x[i].qs: the subscript covers it
                    found.append((name, name, parsed.text(init), node))
        elif node.type == "subscript_expression":
            arg = node.child_by_field_name("argument")
            index = node.child_by_field_name("index") or node.child_by_field_name("indices")
            if arg is None or index is None or arg.type != "identifier" or not param_re.search(parsed.text(index)):
                continue
            if is_pointer_decl(ctx.lookup(parsed.text(arg), node.start_byte)):
                found.append((parsed.text(arg), parsed.text(node), f"&{parsed.text(node)}", node))
        elif node.type == "binary_expression" and not _is_sum_operand(parsed, node):
            terms = operand_chain(parsed, node, "+")
            first = terms[0]
            if len(terms) > 1 and first.type == "identifier" and \
                    any(param_re.search(parsed.text(t)) for t in terms[1:]) and \
                    is_pointer_decl(ctx.lookup(parsed.text(first), node.start_byte)):
                found.append((parsed.text(first), parsed.text(node), parsed.text(node), node))
    return found


def _rewrite(ctx: LoopContext, call: LambdaCall, text: str, use_byte: int) -> tuple[str | None, list[str]]:
    """(address in the loop's names, names that would not mean the same at the loop top) — or
    (None, []) when a local of the lambda cannot be inlined."""
    for _ in range(6):  # locals defined from locals: a few rounds reach the lambda's parameters
        names = _free_names(text)
        inner = names & set(call.local_inits)
        if not inner:
            break
        text = _rename(text, {n: call.local_inits[n] for n in inner})
    if _free_names(text) & (call.locals_seen - set(call.mapping)):
        return None, []
    # captured names are looked up from inside the lambda; the call's arguments from the call site
    captured = _free_names(text) - set(call.mapping)
    passed = set().union(*(_free_names(v) for k, v in call.mapping.items()
                           if k in _free_names(text))) - {UNROLL_INDEX}
    bad = ctx.out_of_scope(captured, use_byte) + ctx.out_of_scope(passed, call.call_byte)
    return _rename(text, call.mapping), sorted(set(bad))


def _tile_stream(ctx: LoopContext, call: LambdaCall, base: str, expression: str, address: str, rewritten: str,
                 node: Node) -> Stream:
    """The stream of `base` read at `address` in the lambda (`rewritten`: the same in the loop's names)."""
    var, step = ctx.var, ctx.step
    # Affine addressing (p + var*stride, PACKED_INDEX(col, i, ...)): the difference between the
    # addresses at var = step and var = 0 is the bytes per iteration, whatever var's actual value.
    at_zero = _rename(rewritten, {var: "0", UNROLL_INDEX: "0"})
    at_step = _rename(rewritten, {var: f"({step})", UNROLL_INDEX: "0"})
    tile_step = f"(long)((const char *)({at_step}) - (const char *)({at_zero}))"
    origin = ctx.lookup(base, node.start_byte)
    # a row pointer declared in the lambda: its parameter index is that of the pointer it derives from
    if origin is not None and call.body.start_byte <= origin.byte < call.body.end_byte:
        sources = [ctx.lookup(n, node.start_byte) for n in sorted(_free_names(address))]
        origin = next((d for d in sources if is_pointer_decl(d) and d is not None and d.param_index is not None),
                      origin)
    count = call.count
    via = f"Unroll<{count}>{{}}({call.name}, ...)" if count is not None else f"{call.name}(...)"
    # every unrolled copy reads its own tile only if the address uses the index (A[i] is shared by all)
    copies = count if count is not None and UNROLL_INDEX in _free_names(rewritten) else None
    return Stream(
        expression=expression, base=base, kind="tile", address=rewritten, line=node.start_point[0] + 1,
        accesses=(expression,), param_index=origin.param_index if origin is not None else None,
        element_type=pointee_type(origin) if origin is not None else None,
        note=f"read by lambda {call.name} through {via}"
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
    return left is not None and right is not None and binary_operator(parsed, left, right) == "+"


def _free_words(text: str) -> Iterator[re.Match[str]]:
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
    """The names (not members) `text` uses."""
    return {m.group(0) for m in _free_words(text)}
