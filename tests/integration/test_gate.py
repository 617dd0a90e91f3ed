"""The correctness gate on real builds and tiny synthetic models."""

from __future__ import annotations

from pathlib import Path

import pytest

from amppatch.build import Build
from amppatch.errors import CorrectnessError, SubprocessError
from amppatch.gate import GateOptions, parse_perplexity, run_gate

pytestmark = pytest.mark.integration


def test_same_build_passes_the_identical_gate(native_build: Build, tiny_model_q8_0: Path) -> None:
    result = run_gate(native_build, native_build, GateOptions(model=tiny_model_q8_0))
    assert result.passed and result.mode == "identical"
    assert result.tokens_a and result.tokens_a == result.tokens_b
    assert result.ppl_a == result.ppl_b and result.ppl_a > 1.0
    assert len(result.chunks_a) == 2
    assert len(result.commands) == 4
    assert any("llama-perplexity" in c[0] for c in result.commands)


def test_different_kernels_fail_identical_but_pass_tolerance(native_build: Build, tiny_model_q4_0: Path) -> None:
    """Q4_0 with and without weight repacking runs different kernels: their sums differ in the last digits.
    The identical gate must see it (it is what catches a wrong patch); the tolerance gate accepts it."""
    with pytest.raises(CorrectnessError) as err:
        run_gate(native_build, native_build, GateOptions(model=tiny_model_q4_0), args_b=("-nr",))
    assert "differ" in err.value.message
    evidence = err.value.gate_result  # type: ignore[attr-defined]
    assert not evidence.passed and evidence.ppl_a != evidence.ppl_b
    ok = run_gate(native_build, native_build, GateOptions(model=tiny_model_q4_0, mode="tolerance"), args_b=("-nr",))
    assert ok.passed and "relative difference" in ok.detail


def test_gate_runs_with_single_token_micro_batches(native_build: Build, tiny_model_q8_0: Path) -> None:
    # The workaround for CPUs whose AMX tiles fault on batched prompts must be accepted by both tools.
    result = run_gate(native_build, native_build, GateOptions(model=tiny_model_q8_0, extra_args=("-ub", "1")))
    assert result.passed
    assert all("-ub" in c for c in result.commands)


def test_a_failing_is_the_environment_b_failing_is_b(native_build: Build, tiny_model_q8_0: Path) -> None:
    options = GateOptions(model=tiny_model_q8_0)
    with pytest.raises(SubprocessError) as env_err:
        run_gate(native_build, native_build, options, args_a=("--no-such-flag",))
    assert "baseline (A)" in env_err.value.message and "not of B" in env_err.value.message
    with pytest.raises(CorrectnessError) as b_err:
        run_gate(native_build, native_build, options, args_b=("--no-such-flag",))
    assert "B failed where A ran" in b_err.value.message


def test_parse_perplexity_output_format() -> None:
    ppl, chunks = parse_perplexity("[1]33835.9918,[2]33967.4409,\nFinal estimate: PPL = 33967.4409 +/- 1073.09")
    assert ppl == pytest.approx(33967.4409)
    assert chunks == ("33835.9918", "33967.4409")
    with pytest.raises(ValueError):
        parse_perplexity("no result")
