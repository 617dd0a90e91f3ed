"""Planning, rendering and editing (pure: fixture trees without a compile database, no git)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jinja2
import pytest

from amppatch.errors import UsageError
from amppatch.gate_sites import gate_runtime_args, model_type_for
from amppatch.patch import (
    DEFAULT_DISTANCE,
    DEFAULT_HINT,
    Edit,
    SiteRequest,
    analyze_requests,
    commit_message,
    parse_loop_key,
    parse_site_spec,
    plan_sites,
    render_site,
    render_tunables_header,
    request_id,
    sites_from_learned,
    sites_from_profile,
    splice,
    unified_diff,
)
from amppatch.source.parse import error_nodes, parse_bytes

ApplyOnce = Callable[..., tuple]  # the `apply_once` fixture of tests/conftest.py


def test_site_spec_defaults_and_forms() -> None:
    req = parse_site_spec("ggml_vec_dot_q8_0_q8_0", None, None)
    assert (req.loop, req.stream, req.distance_bytes, req.hint) == (None, None, DEFAULT_DISTANCE, DEFAULT_HINT)
    req = parse_site_spec("f:L1330:y[ib + 1]", 4096, 1)
    assert (req.function, req.loop, req.stream, req.distance_bytes, req.hint) == ("f", "L1330", "y[ib + 1]", 4096, 1)
    assert parse_site_spec("f:2", None, None).loop == 2
    assert parse_loop_key("@77") == "L77" and parse_loop_key("") is None
    for bad in ("1f", "f:abc"):
        with pytest.raises(UsageError):
            parse_site_spec(bad, None, None)
    with pytest.raises(UsageError, match="locality"):
        parse_site_spec("f", 64, 7)
    with pytest.raises(UsageError, match="byte count"):
        parse_site_spec("f", 0, 3)
    # methods: the '::' before the method is part of the name, not a field separator
    req = parse_site_spec("X<a, b::c>::apply:3:b_ptr", None, None)
    assert (req.function, req.loop, req.stream) == ("X<a, b::c>::apply", 3, "b_ptr")
    req = parse_site_spec("X<float, T>::apply::B + col * K", None, None)
    assert (req.function, req.loop, req.stream) == ("X<float, T>::apply", None, "B + col * K")
    assert parse_site_spec("X::apply:1", None, None).function == "X::apply"


def test_profile_sites_use_the_same_key(tmp_path: Path) -> None:
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps({"schema_version": 1, "machine": {"cpu_model": "X"}, "sites": [
        {"function": "k", "loop": 1, "stream": "x[ib]", "distance_bytes": 1536, "hint": 2,
         "inputs": {"latency_ns": 90}}]}))
    (req,), profile = sites_from_profile(prof, None, None)
    assert (req.function, req.loop, req.stream, req.distance_bytes, req.hint, req.origin) == (
        "k", 1, "x[ib]", 1536, 2, "profile")
    assert req.inputs == {"latency_ns": 90} and profile.machine["cpu_model"] == "X"
    (req,), _ = sites_from_profile(prof, 512, None)  # --distance overrides the profile
    assert req.distance_bytes == 512
    prof.write_text(json.dumps({"schema_version": 1, "sites": []}))
    with pytest.raises(UsageError, match="no sites"):
        sites_from_profile(prof, None, None)


def test_several_learned_files_combine_and_must_agree(tmp_path: Path) -> None:
    def learned(name: str, *winners: tuple[str, int, int]) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps({"schema_version": 1, "base_commit": "c", "winners": [
            {"function": f, "loop": 0, "stream": "x[ib]", "distance_bytes": d, "hint": h, "ratio": 1.1}
            for f, d, h in winners], "dropped": []}))
        return path

    q8 = learned("q8.json", ("ggml_vec_dot_q8_0_q8_0", 8192, 3))
    f16 = learned("f16.json", ("ggml_vec_dot_f16", 8192, 0), ("ggml_vec_dot_q8_0_q8_0", 8192, 3))
    requests, sources = sites_from_learned([q8, f16])
    # the site both files tuned to the same values is baked once, from the first file
    assert [(r.function, r.distance_bytes, r.hint) for r in requests] == [
        ("ggml_vec_dot_q8_0_q8_0", 8192, 3), ("ggml_vec_dot_f16", 8192, 0)]
    assert requests[0].inputs["learned"] == str(q8) and len(sources) == 2
    other = learned("other.json", ("ggml_vec_dot_q8_0_q8_0", 4096, 0))
    with pytest.raises(UsageError, match=r"tuned in both .*q8.json \(8192 B, hint 3\) and .*other.json"):
        sites_from_learned([q8, other])
    empty = learned("empty.json")
    with pytest.raises(UsageError, match="keeps no site") as info:
        sites_from_learned([q8, empty])
    assert "leave this file out" in info.value.next_step


def test_render_single_multi_line_and_tunable(tree: Path) -> None:
    requests = [parse_site_spec("fx_dot_blocks:0:x", 1024, 2)]
    plan = plan_sites(requests, analyze_requests(tree, requests, None), 64)
    (site,) = plan.sites
    text = render_site(site, tunable=False, line_size=64)
    assert "__builtin_prefetch((const char *)(&x[ib]) + 1024, 0, 2);" in text
    assert all("amppatch: fx_dot_blocks#0 x[ib]" in line for line in text.splitlines())
    # the same site once the compiled probe has said the stream walks 168 B per iteration: 3 lines
    big = dataclasses.replace(site, lines=3)
    text = render_site(big, tunable=False, line_size=64)
    assert [ln.split("+ ")[1].split(",")[0] for ln in text.splitlines() if "__builtin_prefetch" in ln] == [
        "1024", "1088", "1152"]
    tun = render_site(site, tunable=True, line_size=64)
    assert "amppatch_prefetch_fx_dot_blocks_l0_x((const char *)(&x[ib]));" in tun
    header = render_tunables_header([site], 64)
    assert "AMPPATCH_FX_DOT_BLOCKS_L0_X_DISTANCE" in header and "1024" in header
    for hint in range(4):  # the hint picks one of four constant-locality loops, once per call
        assert f"__builtin_prefetch(a + o, 0, {hint}); break;" in header
    assert "if (h < 0) {\n        return;" in header  # off: nothing but one branch


def test_templates_are_strict() -> None:
    from amppatch.patch import environment

    with pytest.raises(jinja2.UndefinedError):
        environment().get_template("prefetch_single.c.j2").render(indent="", marker="m", address="p")


def test_splice_applies_edits_in_reverse_order() -> None:
    assert splice(b"abcdef", [Edit(1, "X"), Edit(4, "Y"), Edit(1, "")]) == b"aXbcdYef"


def test_apply_twice_no_change(tree: Path, apply_once: ApplyOnce) -> None:
    specs = ["fx_dot_blocks", "fx_bumps:1:lo", "fx_vec_dot_half"]
    _, changes, applied = apply_once(tree, specs)
    assert len(applied) == 3 and {c.relpath for c in changes} == {
        "ggml/src/ggml-cpu/fx_kernels.c", "ggml/src/ggml-cpu/fx_vec.cpp"}
    for ch in changes:
        grammar = "c" if ch.relpath.endswith(".c") else "cpp"
        errors_after = len(error_nodes(parse_bytes(ch.after, grammar).root))
        assert errors_after <= len(error_nodes(parse_bytes(ch.before, grammar).root))
        assert ch.inserted_lines
        lines = ch.after.decode().splitlines()
        assert all("amppatch:" in lines[n - 1] for n in ch.inserted_lines)
    diff = unified_diff(changes)
    assert all("amppatch:" in ln for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++"))
    # the analysis of the patched text sees its own prefetches as amppatch's
    plan2, changes2, applied2 = apply_once(tree, specs)
    assert changes2 == [] and applied2 == []
    assert any("already carries" in w for w in plan2.warnings)
    loop = plan2.analyses["fx_dot_blocks"].default_loop()
    assert loop.prefetches and all(p.by_amppatch for p in loop.prefetches)


def test_one_site_spelled_twice_with_different_values_is_refused(tree: Path) -> None:
    """Loop 0 and loop L39 are the same loop: baking one of two tuned values silently would be a guess."""
    same = [parse_site_spec("fx_dot_blocks:0", 4096, 3), parse_site_spec("fx_dot_blocks", 4096, 3)]
    plan = plan_sites(same, analyze_requests(tree, same, None), 64)
    assert len(plan.sites) == 1 and any("requested twice" in w for w in plan.warnings)
    differ = [parse_site_spec("fx_dot_blocks:0", 4096, 3), parse_site_spec("fx_dot_blocks", 8192, 0)]
    with pytest.raises(UsageError, match=r"requested twice with different values: 4096 B hint 3 .* 8192 B hint 0"):
        plan_sites(differ, analyze_requests(tree, differ, None), 64)


def test_tunable_apply_twice_no_change(tree: Path, apply_once: ApplyOnce) -> None:
    _, changes, _ = apply_once(tree, ["fx_rows:0:row"], tunable=True)
    paths = {c.relpath for c in changes}
    assert "ggml/src/ggml-cpu/amppatch-tunables.h" in paths
    kernels = (tree / "ggml/src/ggml-cpu/fx_kernels.c").read_text()
    assert kernels.count('#include "amppatch-tunables.h"') == 1
    _, changes2, _ = apply_once(tree, ["fx_rows:0:row"], tunable=True)
    assert changes2 == []


def test_unplaceable_stream_is_explained_and_ambiguous_wrapper_refused(tree: Path) -> None:
    requests = [parse_site_spec("fx_tiled:0:out[t0 - t0 + c]", None, None)]
    plan = plan_sites(requests, analyze_requests(tree, requests, None), 64)
    (skip,) = plan.skipped
    assert "not placeable at the top of its body: out[t0 - t0 + c]: uses c, out" in skip.reason
    assert "a nested loop may offer it (loops 1, 3)" in skip.reason
    # without a compile database a wrapper calling two specializations cannot be resolved: refused
    with pytest.raises(UsageError, match="which of those calls the build compiles is unknown"):
        analyze_requests(tree, [SiteRequest("fx_gemv_pack8")], None)
    resolved = analyze_requests(tree, [SiteRequest("fx_gemv_pack4")], None)
    assert resolved["fx_gemv_pack4"].function == "fx_gemv_tmpl<fx_pack4, 4>"


def test_braceless_body_is_wrapped_and_still_parses(tree: Path, apply_once: ApplyOnce) -> None:
    _, (change,), _ = apply_once(tree, ["fx_braceless"])
    text = change.after.decode()
    assert "{ /* amppatch: fx_braceless#0 a + i */" in text and "} /* amppatch: fx_braceless#0 a + i */" in text
    from amppatch.source.parse import find_function_definitions

    (fn,) = find_function_definitions(parse_bytes(change.after, "c"), "fx_braceless")
    assert not error_nodes(fn)
    assert "for (int i = 0; i < n; i += FX_STEP)\n        { /* amppatch" in text
    _, again, _ = apply_once(tree, ["fx_braceless"])
    assert again == []


def test_dead_broken_and_streamless_loops_are_skipped(tree: Path) -> None:
    requests = [SiteRequest("fx_dot_blocks", 0), SiteRequest("fx_broken"), SiteRequest("fx_dot_blocks", 4)]
    analyses = analyze_requests(tree, requests, None)
    fa = analyses["fx_dot_blocks"]
    # what the compile command decides (FX_MID): loop 0 dead
    loops = tuple(dataclasses.replace(lp, live=(lp.ordinal != 0 and lp.ordinal != 2)) for lp in fa.loops)
    analyses["fx_dot_blocks"] = dataclasses.replace(fa, loops=loops)
    plan = plan_sites(requests, analyses, 64)
    reasons = [s.reason for s in plan.skipped]
    assert plan.sites == []
    assert "dead" in reasons[0]
    assert "no live loop" in reasons[1]  # the only loop of fx_broken has ERROR nodes
    assert "no stream" in reasons[2]
    # the default loop now is the live FX_MID one
    assert analyses["fx_dot_blocks"].default_loop().ordinal == 1


def test_existing_prefetch_is_kept_and_reported(tree: Path, apply_once: ApplyOnce) -> None:
    plan, (change,), _ = apply_once(tree, ["fx_prefetched"])
    assert any("already prefetches" in w for w in plan.warnings)
    assert "__builtin_prefetch(&a[i] + 64, 0, 1);" in change.after.decode()


def test_request_id_depends_on_every_parameter(tree: Path) -> None:
    requests = [parse_site_spec("fx_dot_blocks", None, None)]
    plan = plan_sites(requests, analyze_requests(tree, requests, None), 64)
    ids = {request_id("a" * 40, plan.sites, tunable=False, line_size=64)}
    assert request_id("a" * 40, plan.sites, tunable=False, line_size=64) in ids  # stable
    other = [dataclasses.replace(plan.sites[0], request=dataclasses.replace(plan.sites[0].request, hint=1))]
    ids |= {request_id("b" * 40, plan.sites, tunable=False, line_size=64),
            request_id("a" * 40, plan.sites, tunable=True, line_size=64),
            request_id("a" * 40, other, tunable=False, line_size=64),
            request_id("a" * 40, [dataclasses.replace(plan.sites[0], guard="std::is_same<T, U>::value")],
                       tunable=False, line_size=64)}
    assert len(ids) == 5  # ... including what the analysis decided (here a specialization guard)
    # ... and where the values came from, which the commit message records: the id fixes the whole commit
    learned = [dataclasses.replace(plan.sites[0], request=dataclasses.replace(plan.sites[0].request,
                                                                                origin="learned"))]
    assert request_id("a" * 40, learned, tunable=False, line_size=64) not in ids


def test_the_commit_does_not_depend_on_the_order_sites_were_asked_for(tree: Path) -> None:
    requests = [parse_site_spec("fx_dot_blocks", None, None), parse_site_spec("fx_prefetched", None, None)]
    plan = plan_sites(requests, analyze_requests(tree, requests, None), 64)
    assert len(plan.sites) == 2
    backwards = list(reversed(plan.sites))
    for tunable in (False, True):
        rid = request_id("a" * 40, plan.sites, tunable=tunable, line_size=64)
        assert request_id("a" * 40, backwards, tunable=tunable, line_size=64) == rid
        assert commit_message(rid, "a" * 40, backwards, tunable=tunable) == \
            commit_message(rid, "a" * 40, plan.sites, tunable=tunable)


def test_gate_helpers_route_kernels_to_model_types() -> None:
    assert model_type_for("ggml_vec_dot_q8_0_q8_0") == "q8_0"
    assert model_type_for("ggml_vec_dot_q4_K_q8_K") == "q4_k"
    assert model_type_for("ggml_vec_dot_q6_K_q8_K") == "q6_k"
    assert model_type_for("ggml_vec_dot_f16") == "f16"
    assert model_type_for("ggml_gemv_q4_0_8x8_q8_0") == "q4_0"
    assert model_type_for("ggml_gemv_q4_K_8x8_q8_K") == "q4_k"
    assert model_type_for("gemv_q4_b32_8x8_q8_0_lut_avx<block_q4_0x8>") == "q4_0"
    assert model_type_for("gemv_q4_b32_8x8_q8_0_lut_avx<block_iq4_nlx8>") == "iq4_nl"
    assert model_type_for("ggml_compute_forward_mul_mat_one_chunk") is None
    assert model_type_for("tinygemm_kernel_vnni<block_q8_0, block_q4_0, float, BLOCK_M, BLOCK_N, BLOCK_K>::apply") \
        == "q4_0"  # the weight type is the last block type of a micro-kernel class
    assert model_type_for("tinygemm_kernel_vnni<block_q8_K, block_q6_K>::apply") == "q6_k"
    assert model_type_for("tinygemm_kernel_avx<float, ggml_fp16_t, float, BLOCK_M, BLOCK_N, BLOCK_K>::apply") == "f16"
    assert gate_runtime_args(["ggml_vec_dot_q4_0_q8_0"]) == ("-nr",)
    assert gate_runtime_args(["ggml_gemv_q4_0_8x8_q8_0"]) == ()


def test_line_breakpoints_count_only_where_they_resolved() -> None:
    """gdb moves a breakpoint on a line without code to the next line that has some, possibly in another
    function: such a breakpoint does not count."""
    from amppatch.gate_sites import line_breakpoint_hits

    info = """Num     Type           Disp Enb Address            What
1       breakpoint     keep y   <MULTIPLE>
\tbreakpoint already hit 10016 times
\tignore next 99989984 hits
1.1                         y   0x00007ffff6c66930 in k<1>::apply(int) at /w/ggml/src/ggml-cpu/amx/mmq.cpp:1563
1.2                         y   0x00007ffff6c67010 in k<2>::apply(int) at /w/ggml/src/ggml-cpu/amx/mmq.cpp:1563
2       breakpoint     keep y   0x00007ffff6c64340 in q<1>::apply(int) at /w/ggml/src/ggml-cpu/amx/mmq.cpp:1586
\tbreakpoint already hit 7 times
3       breakpoint     keep y   <PENDING>          ggml/src/ggml-cpu/amx/mmq.cpp:1570
4       breakpoint     keep y   <MULTIPLE>
\tbreakpoint already hit 80 times
4.1                         y   0x00007ffff6c66930 in amppatch_prefetch_k at /w/ggml/src/ggml-cpu/amppatch-tunables.h:61
"""
    specs = ["ggml/src/ggml-cpu/amx/mmq.cpp:1563", "ggml/src/ggml-cpu/amx/mmq.cpp:1569",
             "ggml/src/ggml-cpu/amx/mmq.cpp:1570", "amppatch_prefetch_k"]
    assert line_breakpoint_hits(info, specs) == {"ggml/src/ggml-cpu/amx/mmq.cpp:1563": 10016, "amppatch_prefetch_k": 80}
