"""`amppatch run --model` end to end: the user's own GGUF in place of the synthetic model.

The default tier runs `--quick` on the tiny Q4_K_M model (Q4_K layers, a Q6_K output matrix: two weight types,
so apply gates on two models); the slow tier runs the 1.1B Q4_K_M model with a small budget.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest

from amppatch.build import Build
from amppatch.cli import cmd_run
from amppatch.gate_sites import model_type_for
from amppatch.gguf_info import read_gguf
from amppatch.model import SynthOptions, synth_model
from amppatch.runstate import STAGES


def _cli(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser()
    cmd_run.add_arguments(parser)
    return cmd_run.run(parser.parse_args(argv))


def _stages(out: Path) -> dict[str, Any]:
    stages: dict[str, Any] = json.loads((out / "run-state.json").read_text())["stages"]
    assert list(stages) == list(STAGES)
    assert all(stages[s]["status"] == "done" for s in ("fetch", "build", "model", "profile", "apply", "tune",
                                                       "report"))
    return stages


def _check_gated_per_type(manifest_path: Path) -> set[str]:
    """Every patched kernel of a weight type ran (breakpoint count) on the tiny model of that type; returns the
    types gated."""
    gate = json.loads(manifest_path.read_text())["gate"]
    assert gate["passed"] is True
    typed: set[str] = set()
    for run in gate["runs"]:
        assert run["passed"] is True
        for f in run["functions"]:
            t = model_type_for(f)
            assert gate["function_hits"][f] > 0, f
            if t is not None:
                assert run["weight_type"] == t and run["model"] and read_gguf(Path(run["model"])).n_layer, f
                typed.add(t)
    return typed


def _check_report_names_types(out: Path, model: Path) -> None:
    report = (out / "report.md").read_text()
    types = list(read_gguf(model).type_histogram)
    line = next(line for line in report.splitlines() if line.startswith("- model:"))
    assert model.name in line and all(t in line for t in types), line


@pytest.fixture(scope="module")
def quick_user_run(llama_repo: Path, native_build: Build, tiny_model_q4_k: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run-model")
    # 1536 tokens (the tiny model's context is 2048): a token takes 0.6-2 ms, so the sampler's 1 kHz sees
    # ~300-900 in-token samples, enough to catch the Q4_K GEMV (3-7 % of them; the Q6_K output matrix takes
    # most) on a fast CPU too, where 256 tokens gave ~50 samples and sometimes none of the GEMV
    report = _cli(["--quick", "--model", str(tiny_model_q4_k), "--repo", str(llama_repo), "-o", str(out),
                   "--profile-tokens", "1536"])
    assert report == out / "report.md"
    return out


def test_quick_run_on_a_users_q4_k_m_model(quick_user_run: Path, tiny_model_q4_k: Path) -> None:
    stages = _stages(quick_user_run)
    model = stages["model"]["outputs"]
    assert model["model"] == str(tiny_model_q4_k) and set(model["user_model"]["types"]) >= {"Q4_K", "Q6_K"}
    # the profile ran the user's model, and its hot functions include a Q4_K kernel (vec_dot or repack GEMV)
    profile = json.loads(Path(stages["profile"]["outputs"]["profile"]).read_text())
    assert profile["options"]["model"] == str(tiny_model_q4_k)
    hot = [h["name"] for h in profile["hot_functions"]]
    assert any(re.search(r"q4_K", name) for name in hot), hot
    # apply gated each patched kernel on the tiny model of its own weight type
    typed = _check_gated_per_type(Path(stages["apply"]["outputs"]["manifest"]))
    assert typed, "no patched kernel of a weight type"
    _check_report_names_types(quick_user_run, tiny_model_q4_k)
    if stages["final"]["status"] == "done":  # tune kept a site: the final gate ran on the dominant type's model
        report = json.loads(Path(stages["final"]["outputs"]["report"], "report.json").read_text())
        assert report["correctness"][0]["passed"] is True


@pytest.mark.slow
def test_run_on_a_1b_q4_k_m_model(llama_repo: Path, native_build: Build, tmp_path: Path) -> None:
    model = synth_model(SynthOptions(shape="1b", type="q4_k_m", build=native_build))
    out = tmp_path / "run"
    report = _cli(["--model", str(model), "--repo", str(llama_repo), "-o", str(out), "--budget", "3",
                   "--final-minutes", "2", "--threads", "1"])
    assert report == out / "report.md"
    stages = _stages(out)
    profile = json.loads(Path(stages["profile"]["outputs"]["profile"]).read_text())
    assert any(re.search(r"q4_K", h["name"]) for h in profile["hot_functions"][:3])
    assert _check_gated_per_type(Path(stages["apply"]["outputs"]["manifest"]))
    if stages["bake"]["status"] == "done":
        assert _check_gated_per_type(Path(stages["bake"]["outputs"]["manifest"]))
        assert stages["final"]["status"] == "done"
    _check_report_names_types(out, model)
