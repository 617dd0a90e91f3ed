"""`model synth` against the pinned tree: every offered preset quantizes, the MoE shape runs mul_mat_id."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from amppatch.build import Build, run_env
from amppatch.gguf_info import bytes_per_token, read_gguf
from amppatch.model import PRESETS, SynthOptions, synth_model
from amppatch.patch import count_function_hits
from amppatch.paths import cache_dir

# The type llama-quantize gives a layer's ffn_up under each preset (the _M/_S mixes raise other tensors).
FFN_UP_TYPE = {
    "q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K", "q5_k_s": "Q5_K", "q4_k_m": "Q4_K", "q4_k_s": "Q4_K",
    "q4_0": "Q4_0", "iq4_xs": "IQ4_XS", "iq4_nl": "IQ4_NL", "q3_k_m": "Q3_K",
}


def test_every_quantized_preset_is_tested() -> None:
    assert set(FFN_UP_TYPE) == set(PRESETS) - {"f16"}


@pytest.mark.parametrize("preset", sorted(FFN_UP_TYPE))
def test_preset_quantizes_the_tiny_model(native_build: Build, preset: str) -> None:
    model = synth_model(SynthOptions(shape="tiny", type=preset.upper(), build=native_build))
    assert f"-{preset}-" in model.name
    info = read_gguf(model)
    up = info.tensor("blk.0.ffn_up.weight")
    assert up is not None and up.type == FFN_UP_TYPE[preset]
    # the f16 it was made from is gone
    assert not list(cache_dir("models").glob(f".{model.stem}.f16-*"))


def _bench(build: Build, model: Path) -> dict:
    done = subprocess.run(
        [str(build.binary("llama-bench")), "-m", str(model), "-p", "0", "-n", "4", "-r", "1", "-t", "1",
         "-o", "jsonl"],
        capture_output=True, text=True, env=run_env(build), timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("preset", ["q4_k_m", "iq4_xs"])
def test_tiny_moe_generates_through_mul_mat_id(native_build: Build, tiny_model_q8_0: Path, preset: str) -> None:
    model = synth_model(SynthOptions(shape="tiny-moe", type=preset, build=native_build))
    info = read_gguf(model)
    assert (info.n_expert, info.n_expert_used) == (4, 2)
    exps = info.tensor("blk.0.ffn_up_exps.weight")
    assert exps is not None and exps.type == FFN_UP_TYPE[preset] and exps.shape == (256, 512, 4)
    tb = bytes_per_token(info)
    assert 0 < tb.experts_read == tb.experts_total // 2
    row = _bench(native_build, model)
    assert row["n_gen"] == 4 and row["avg_ts"] > 0
    if preset == "q4_k_m":
        # the experts run in ggml's mul_mat_id, which a dense model never calls
        assert count_function_hits(native_build, "ggml_compute_forward_mul_mat_id", model) > 0
        assert count_function_hits(native_build, "ggml_compute_forward_mul_mat_id", tiny_model_q8_0) == 0
