"""Which gate runs prove a patch's kernels: one per weight type, MoE kernels on the tiny MoE model, sites of no
weight type on the default type's model (pure grouping, then gate_sites with its runners faked)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from amppatch import gate_sites as gs
from amppatch.errors import UsageError
from amppatch.gate_sites import GateGroup, gate_groups, kernel_weight_type, model_type_for
from amppatch.model import TYPES

FA = "ggml_compute_forward_flash_attn_ext_f16_one_chunk"
Q4K_REPACK_MMID = "ggml::cpu::repack::tensor_traits<block_q4_K, 8, 8, GGML_TYPE_Q8_K>::forward_mul_mat_id"


def _keys(groups: list[GateGroup]) -> list[tuple[Any, ...]]:
    return [(g.type, g.shape, g.functions, g.args) for g in groups]


def test_each_weight_type_gets_its_own_run() -> None:
    groups = gate_groups(["ggml_vec_dot_q6_K_q8_K", "ggml_gemv_q4_K_8x8_q8_K", "ggml_vec_dot_q4_K_q8_K"])
    assert _keys(groups) == [
        ("q4_k", "tiny", ("ggml_gemv_q4_K_8x8_q8_K",), ()),  # a repack GEMV needs the repack buffer on
        ("q4_k", "tiny", ("ggml_vec_dot_q4_K_q8_K",), ("-nr",)),  # a vec_dot needs it off: another run
        ("q6_k", "tiny", ("ggml_vec_dot_q6_K_q8_K",), ("-nr",)),
    ]
    assert all(g.model is None for g in groups)


def test_expert_kernels_run_on_the_tiny_moe_model_of_their_type() -> None:
    groups = gate_groups([Q4K_REPACK_MMID, "ggml_vec_dot_q4_K_q8_K", "ggml_compute_forward_mul_mat_id_one_chunk"],
                         default_type="q4_k")
    assert _keys(groups) == [
        ("q4_k", "tiny", ("ggml_vec_dot_q4_K_q8_K",), ("-nr",)),
        ("q4_k", "tiny-moe", (Q4K_REPACK_MMID,), ()),
        # the generic mul_mat_id loop has no weight type: the default type's MoE model, plain buffer
        ("q4_k", "tiny-moe", ("ggml_compute_forward_mul_mat_id_one_chunk",), ("-nr",)),
    ]


@pytest.mark.parametrize(("default", "expected"), [(None, "q8_0"), ("q6_k", "q6_k"), ("iq4_xs", "iq4_xs")])
def test_untyped_sites_alone_get_the_default_types_model(default: str | None, expected: str) -> None:
    # flash attention alone used to be refused for want of a model; now it runs on the dominant type's
    groups = gate_groups([FA], default_type=default)
    assert _keys(groups) == [(expected, "tiny", (FA,), ())]


def test_an_untyped_site_joins_a_typed_run_of_its_shape() -> None:
    groups = gate_groups(["ggml_gemv_q4_0_8x8_q8_0", "ggml_vec_dot_q6_K_q8_K", FA], default_type="q6_k")
    assert _keys(groups) == [
        ("q4_0", "tiny", ("ggml_gemv_q4_0_8x8_q8_0",), ()),
        ("q6_k", "tiny", ("ggml_vec_dot_q6_K_q8_K", FA), ("-nr",)),  # the default type's run, preferred
    ]
    groups = gate_groups(["ggml_gemv_q4_0_8x8_q8_0", FA])
    assert _keys(groups) == [("q4_0", "tiny", ("ggml_gemv_q4_0_8x8_q8_0", FA), ())]


def test_a_gate_model_serves_every_run() -> None:
    model = Path("/m/user.gguf")
    groups = gate_groups(["ggml_vec_dot_q8_0_q8_0", "ggml_gemv_q4_0_8x8_q8_0", FA], model=model)
    assert _keys(groups) == [(None, None, (FA, "ggml_gemv_q4_0_8x8_q8_0"), ()),
                             (None, None, ("ggml_vec_dot_q8_0_q8_0",), ("-nr",))]
    assert {g.model for g in groups} == {model}
    # a type amppatch cannot synthesize is fine with a model of its own
    assert gate_groups(["ggml_vec_dot_q5_0_q8_0"], model=model)[0].functions == ("ggml_vec_dot_q5_0_q8_0",)


def test_a_kernel_of_a_type_without_a_synthetic_model_is_refused_by_name() -> None:
    with pytest.raises(UsageError, match=r"Q5_0 weights.*Q4_K.*IQ4_XS") as info:
        gate_groups(["ggml_vec_dot_q5_0_q8_0", "ggml_vec_dot_q8_0_q8_0"])
    assert "--gate-model" in (info.value.next_step or "")


@pytest.mark.parametrize(("function", "weight_type"), [
    ("ggml_vec_dot_q5_K_q8_K", "q5_k"),
    ("ggml_vec_dot_q3_K_q8_K", "q3_k"),
    ("ggml_vec_dot_iq4_xs_q8_K", "iq4_xs"),
    ("ggml_vec_dot_iq4_nl_q8_0", "iq4_nl"),
    ("ggml_gemv_iq4_nl_8x8_q8_0", "iq4_nl"),
    ("gemv_q4_b32_8x8_q8_0_lut_avx<block_iq4_nlx8>", "iq4_nl"),
    ("tinygemm_kernel_vnni<block_q8_K, block_iq4_xs, float, BLOCK_M, BLOCK_N, BLOCK_K>::apply", "iq4_xs"),
    ("tinygemm_kernel_vnni<block_q8_K, block_q5_K>::apply", "q5_k"),
])
def test_the_added_weight_types_map_to_a_synthetic_model(function: str, weight_type: str) -> None:
    assert model_type_for(function) == weight_type
    assert weight_type in TYPES  # `model synth --type` makes it (q3_k, q5_k: the _M mixes)


def test_kernels_of_no_weight_type() -> None:
    assert kernel_weight_type(FA) is None
    assert kernel_weight_type("ggml_vec_dot_f32") is None  # serves activations, not a weight type
    assert kernel_weight_type("ggml_compute_forward_mul_mat_id_one_chunk") is None
    assert kernel_weight_type("ggml_vec_dot_bf16") == "bf16" and model_type_for("ggml_vec_dot_bf16") is None


def _site(function: str) -> Any:
    return SimpleNamespace(function=function)


def test_gate_sites_runs_each_group_on_its_own_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from amppatch import model as model_mod

    synthesized: list[tuple[str, str]] = []
    gated: list[tuple[str, tuple[str, ...]]] = []
    counted: list[tuple[str, str]] = []

    def synth(o: Any) -> Path:
        synthesized.append((o.shape, o.type))
        return Path(f"/m/{o.shape}-{o.type}.gguf")

    def run_gate(a: Any, b: Any, options: Any) -> Any:
        gated.append((options.model.name, options.extra_args))
        return SimpleNamespace(to_json=lambda: {"passed": True, "mode": "identical"})

    def count(build: Any, f: str, model: Path, args: tuple[str, ...], lines: tuple[str, ...] = ()) -> int:
        counted.append((f, model.name))
        return 3

    monkeypatch.setattr(model_mod, "synth_model", synth)
    monkeypatch.setattr(gs, "run_gate", run_gate)
    monkeypatch.setattr(gs, "count_function_hits", count)
    monkeypatch.setattr(gs, "kernel_test", lambda a, b, fs: {"status": "passed"})
    monkeypatch.setattr(gs, "_tree_supported", lambda build, flags: flags)  # the pinned tree takes every flag
    sites = [_site(f) for f in ("ggml_vec_dot_q4_K_q8_K", Q4K_REPACK_MMID, FA)]
    out = gs.gate_sites(object(), object(), sites, default_type="q6_k", extra_args=("-fa", "on"))  # type: ignore[arg-type]
    assert synthesized == [("tiny", "q4_k"), ("tiny-moe", "q4_k")]
    assert gated == [("tiny-q4_k.gguf", ("-nr", "-fa", "on")), ("tiny-moe-q4_k.gguf", ("-fa", "on"))]
    assert dict(counted) == {"ggml_vec_dot_q4_K_q8_K": "tiny-q4_k.gguf", FA: "tiny-q4_k.gguf",
                             Q4K_REPACK_MMID: "tiny-moe-q4_k.gguf"}
    assert [(r["weight_type"], r["shape"]) for r in out["runs"]] == [("q4_k", "tiny"), ("q4_k", "tiny-moe")]
    assert out["passed"] is True and set(out["function_hits"]) == {f.function for f in sites}

    # only flash attention: gated on the default type's tiny model instead of refused
    synthesized.clear()
    out = gs.gate_sites(object(), object(), [_site(FA)], default_type="q6_k")  # type: ignore[arg-type]
    assert synthesized == [("tiny", "q6_k")] and out["runs"][0]["functions"] == [FA]


def test_gdb_is_given_specializations_with_closing_brackets_apart() -> None:
    # the profile's canonical spelling of a repack GEMV specialization; gdb leaves "<block<4, 8>>" pending
    assert gs.gdb_function_name("gemv_q4_b32_8x8_q8_0_lut_avx<block<4, 8>>") == \
        "gemv_q4_b32_8x8_q8_0_lut_avx<block<4, 8> >"
    assert gs.gdb_function_name("f<a<b<c>>>") == "f<a<b<c> > >"
    assert gs.gdb_function_name("gemv_q4_b32_8x8_q8_0_lut_avx<block_q4_0x8>") == \
        "gemv_q4_b32_8x8_q8_0_lut_avx<block_q4_0x8>"
    assert gs.gdb_function_name("ggml_vec_dot_q8_0_q8_0") == "ggml_vec_dot_q8_0_q8_0"
