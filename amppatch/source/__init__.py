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

The package is split by question; this module only re-exports the names other modules import:
``names`` (how sites spell functions), ``specialization`` (template and class specializations in the
source), ``analyze`` (finding the live definition), ``function`` (its result and the defaults a bare site
takes), ``sizes`` (the compiled probe), ``lookup`` (which method a source line is in), ``loops`` (loops and
their streams: ``scope``, ``induction``, ``streams``, ``lambdas``, ``records``), ``parse`` and
``compiledb``.
"""

from __future__ import annotations

from amppatch.source.analyze import _ARCH_DIRS as _ARCH_DIRS  # the tests pick another ISA's directory from it
from amppatch.source.analyze import SOURCE_SUFFIXES, analyze_function, find_function_files
from amppatch.source.function import Call, FunctionAnalysis, default_stream
from amppatch.source.lookup import IN_LAMBDA, member_site_at
from amppatch.source.loops import analyze_loops
from amppatch.source.names import canonical_name, closing_angle, split_member, split_specialization
from amppatch.source.records import MARKER_WORD, UNROLL_INDEX, ExistingPrefetch, Loop, Stream, normalize_expression
from amppatch.source.specialization import member_site_name

__all__ = [
    "IN_LAMBDA",
    "MARKER_WORD",
    "SOURCE_SUFFIXES",
    "UNROLL_INDEX",
    "Call",
    "ExistingPrefetch",
    "FunctionAnalysis",
    "Loop",
    "Stream",
    "analyze_function",
    "analyze_loops",
    "canonical_name",
    "closing_angle",
    "default_stream",
    "find_function_files",
    "member_site_at",
    "member_site_name",
    "normalize_expression",
    "split_member",
    "split_specialization",
]
